"""Feature density: per-feature firing frequency, its text summary, its histogram PNG and its file.

The density of feature i is the fraction of eval tokens on which f_i > 0 (DESIGN.md section 7). The
histogram is of log10 density with dead features (never fired) placed at -10, as in Anthropic's
*Towards Monosemanticity* (Bricken et al. 2023) feature-density plots.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import Tensor

from dictionaries.constants import DENSITY_FILE
from dictionaries.files import write_atomic

DEAD_LOG10 = -10.0
"""Where a feature that never fired is placed on the log10-density axis."""
HIGH_DENSITY = 1e-1
"""Features firing on more than this fraction of tokens are counted as high-density."""


def log10_density(frequency: Tensor) -> Tensor:
    """log10 of each feature's firing frequency (F,), dead features at DEAD_LOG10."""
    freq = frequency.double()
    return torch.where(freq > 0, freq.clamp_min(1e-300).log10(), torch.full_like(freq, DEAD_LOG10))


def summarize_density(frequency: Tensor) -> dict[str, float]:
    """The card's density summary: features, dead count, count above 1e-1, median log10 density (dead at -10)."""
    logs = log10_density(frequency)
    return {
        "features": float(frequency.numel()),
        "dead": float((frequency <= 0).sum().item()),
        "above_1e-1": float((frequency > HIGH_DENSITY).sum().item()),
        "median_log10": float(logs.median().item()),
    }


def format_density(summary: dict[str, float]) -> str:
    """One readable line of a density summary (what `dictctl show` prints)."""
    return (f"{int(summary.get('dead', 0))} dead of {int(summary.get('features', 0))} features, "
            f"{int(summary.get('above_1e-1', 0))} above 1e-1, median log10 density "
            f"{summary.get('median_log10', float('nan')):.2f}")


def save_density(frequency: Tensor, folder: str | Path) -> Path:
    """Write `density.safetensors` (tensor `frequency`, float32 (F,)) into `folder`."""
    from safetensors.torch import save

    return write_atomic(Path(folder) / DENSITY_FILE, save({"frequency": frequency.detach().float().cpu().contiguous()}))


def read_density(folder: str | Path) -> Tensor:
    """The per-feature firing frequency saved by `save_density`."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / DENSITY_FILE))["frequency"]


def plot_density(frequency: Tensor, path: str | Path, *, title: str = "") -> Path:
    """Histogram of log10 feature density (dead at -10) as a PNG, with the summary in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = log10_density(frequency).cpu().numpy()
    summary = summarize_density(frequency)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    bins = [DEAD_LOG10 - 0.25 + 0.1 * i for i in range(int((0.5 - DEAD_LOG10) / 0.1) + 1)]
    ax.hist(logs, bins=bins, color="tab:blue", label=format_density(summary).replace(", median", ",\nmedian"))
    ax.axvline(DEAD_LOG10, color="tab:red", lw=0.8, ls=":")
    ax.set_xlabel("log10 feature density (fraction of tokens with f > 0; dead at -10)")
    ax.set_ylabel("features")
    ax.set_title(title or "feature density", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    return write_atomic(path, png.getvalue())
