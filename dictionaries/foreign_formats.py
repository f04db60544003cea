"""What every reader of a foreign dictionary folder shares: the `Foreign` result and the tensor-layout check.

Each reader (dictionary_learning_format.py, saelens_format.py, sparsify_format.py; dispatched by formats.py)
returns the tensors under native names and layout (`W_enc [d, F]`, `b_enc [F]`, `W_dec [F, d]`, `b_dec [d]`,
extras) such that the native module's outputs equal the original implementation's, plus what the folder's
config says about the model and hook point. Anything the native kinds cannot represent is a FormatError that
says why. Pickles are loaded with `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from dictionaries.errors import FormatError, ShapeMismatchError


@dataclass
class Foreign:
    """What a foreign reader found."""

    architecture: str
    state: dict[str, Tensor]  # native names and layout
    k: int | None
    pre_encoder_bias: bool
    weights: Path
    files: list[Path]
    model: str | None = None
    hook: dict[str, Any] | None = None  # HookPoint fields
    transcoder: bool = False  # reads `hook`, predicts `output_hook` (W_dec [F, d_out], b_dec [d_out], W_skip)
    output_hook: dict[str, Any] | None = None  # HookPoint fields of the predicted activation, where known
    notes: list[str] = field(default_factory=list)


# ---- tensor layouts ---------------------------------------------------------------------------------
# A layout: tensor name -> (shape in named dimensions, required). d = d_in, F = d_dict; () is a scalar.
Layout = dict[str, tuple[tuple[str, ...], bool]]


def check_layout(state: dict[str, Tensor], layout: Layout, path: Path, dims: dict[str, int] | None = None,
                 sizes_from: str = "") -> dict[str, int]:
    """Check names and shapes of `state` against `layout`; the sizes of the named dimensions.

    `dims` may hold sizes the config states (`sizes_from` names it); otherwise the first tensor of the
    layout fixes them. Errors name the file, the tensor and both shapes.
    """
    dims = dict(dims or {})
    missing = [k for k, (_, required) in layout.items() if required and k not in state]
    unexpected = sorted(k for k in state if k not in layout)
    if missing or unexpected:
        raise FormatError(str(path), f"expected tensors {sorted(layout)}; missing {missing}, unexpected "
                                     f"{unexpected} (the file holds {sorted(state)})")
    for key, (spec, _) in layout.items():
        if key not in state:
            continue
        shape = tuple(state[key].shape)
        if len(shape) == len(spec):
            for name, n in zip(spec, shape):
                dims.setdefault(name, n)
        expected = tuple(dims.get(name, name) for name in spec)
        if shape != expected:
            hint = f"Sizes taken from {sizes_from}." if sizes_from else ""
            raise ShapeMismatchError(f"{path}: tensor {key!r}", expected, shape, hint=hint)
    return dims
