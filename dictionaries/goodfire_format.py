"""Reader of Goodfire's SAE releases (a `.pth` state dict named `<model>-SAE-l<L>.pth`) into native tensors.

Goodfire published `Goodfire/Llama-3.1-8B-Instruct-SAE-l19` (`Llama-3.1-8B-Instruct-SAE-l19.pth`) and
`Goodfire/Llama-3.3-70B-Instruct-SAE-l50` (`...-l50.pt`): the state dict of a module with two `nn.Linear`s,
`encoder_linear.weight [F, d]`, `encoder_linear.bias [F]`, `decoder_linear.weight [d, F]`, `decoder_linear.bias
[d]`, read at the residual stream after block L (the model cards' example code; SAELens'
`get_goodfire_config_from_hf`: architecture standard, `apply_b_dec_to_input: False`, hook `blocks.L.hook_resid_post`).
The forward, from the model card's `SparseAutoEncoder`:

    f     = ReLU(encoder_linear(x)) = ReLU(x @ encoder_linear.weight.T + encoder_linear.bias)    (..., F)
    x_hat = decoder_linear(f)       = f @ decoder_linear.weight.T + decoder_linear.bias           (..., d)

that is native relu without pre-encoder bias. The pickle is loaded with `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import re
from pathlib import Path

from dictionaries.errors import FormatError, MissingFileError
from dictionaries.files import load_pickle
from dictionaries.foreign_formats import Foreign, Layout, check_layout
from dictionaries.hookpoints import saelens_hook

GOODFIRE_PATTERN = "*-SAE-l*.pt*"
GOODFIRE_LAYOUT: Layout = {"encoder_linear.weight": (("F", "d"), True), "encoder_linear.bias": (("F",), True),
                           "decoder_linear.weight": (("d", "F"), True), "decoder_linear.bias": (("d",), True)}
_NAME = re.compile(r"^(?P<model>.+)-SAE-l(?P<layer>\d+)\.pth?$")


def goodfire_file(folder: Path) -> Path:
    """The one `<model>-SAE-l<L>.pt(h)` file of a Goodfire folder."""
    files = sorted(p for p in folder.glob(GOODFIRE_PATTERN) if p.is_file() and _NAME.match(p.name))
    if len(files) != 1:
        problem = "holds several" if files else "has no"
        raise MissingFileError(str(folder), f"A Goodfire folder holds one <model>-SAE-l<L>.pth file; this one "
                                            f"{problem} ({', '.join(p.name for p in files) or 'none'}).")
    return files[0]


def read_goodfire(folder: Path, *, architecture: str | None = None) -> Foreign:
    """The `.pth` state dict; model and hook point from its file name (`Llama-3.1-8B-Instruct-SAE-l19.pth`)."""
    path = goodfire_file(folder)
    state = load_pickle(path)
    if set(state) == {"state_dict"} or "model_state_dict" in state:
        raise FormatError(str(path), "a training checkpoint, not the released state dict of encoder_linear / "
                                     "decoder_linear")
    check_layout(state, GOODFIRE_LAYOUT, path)
    native = {"W_enc": state["encoder_linear.weight"].T, "b_enc": state["encoder_linear.bias"],
              "W_dec": state["decoder_linear.weight"].T, "b_dec": state["decoder_linear.bias"]}
    found = Foreign("relu", native, None, False, path, [path])
    m = _NAME.match(path.name)
    model, layer = m.group("model"), int(m.group("layer"))
    found.model = model if "/" in model else f"meta-llama/{model}"
    found.hook = saelens_hook(found.model, f"blocks.{layer}.hook_resid_post")
    found.notes.append(f"Goodfire SAE: residual stream after block {layer} of {found.model} (from the file name)")
    return found
