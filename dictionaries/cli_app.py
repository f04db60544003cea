"""The `dictctl` application object and what its command modules share: the consoles, option help texts and
the cell formatter. The commands live in cli_cards.py (card-only), cli_hub.py (Hub) and cli_models.py
(anything that runs a model); cli.py wires them together and turns errors into one line.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

app = typer.Typer(help="Pretrained sparse-autoencoder dictionaries: browse, load, train, evaluate, publish.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
# Wide enough for the `list` table even when piped (rich falls back to 80 columns without a terminal).
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

HOOK_HELP = "MODULE_PATH[:input|:output] to use instead of the card's hook point."
MODEL_DTYPE_HELP = "Model weights' dtype: fp32, bf16 or fp16 (the dictionary keeps its own; activations are cast)."
DEVICE_MAP_HELP = ("Place the model as it loads (needs accelerate): auto, balanced, sequential, a device, or a JSON "
                   "object of module -> device.")
SITE_HELP = "resid_pre/mid/post, mlp_in/out, attn_out, attn_z, mlp_post, with --layer (via the model's family)."


def fmt_value(v: object) -> str:
    """A stat for a table cell: '-' for missing, 3 significant digits for floats."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)
