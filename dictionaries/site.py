"""`Site`: one dictionary attached at one hook point, used inside an nnsight trace or generation.

Made by `attach.attach` (the module that imports nnsight); a Site only reads and writes the envoy it is
given. Each property or edit reads the hook's current activation x (batch, pos, d) from the envoy, so it
must be used in the order the model computes its modules (nnsight 0.8 raises OutOfOrderError otherwise).
Within one forward every call shares one state (x, its features, the edited features); a new forward
(the next trace, the next generation step) starts a new one.

Edits keep the error term by default: the written activation is x + (f_edited - f) W_dec, so an unedited
splice writes x back exactly and an edit changes x by exactly the decoder contribution it adds or removes
(Marks et al. 2024, *Sparse Feature Circuits*, keep the error term the same way). With `error=False` the
activation becomes the reconstruction decode(f_edited). Pad positions (attention mask 0) are never changed
and their features read as 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dictionaries.errors import FeatureIndexError, OutsideTraceError

if TYPE_CHECKING:
    from dictionaries.architectures import Dictionary


def first_tensor(value: Any) -> Tensor:
    """The activation in a module's output: the value itself or the first element of a tuple."""
    return value[0] if isinstance(value, (tuple, list)) else value


def replace_first(value: Any, new: Tensor) -> Any:
    """`value` with its activation replaced by `new` (tuple outputs keep their other elements)."""
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    return new


SPARSE_DECODE_DENSITY = 0.02
"""Below this fraction of non-zero features, decode gathers decoder rows instead of a dense matmul."""


def decode(dictionary: Dictionary, f: Tensor) -> Tensor:
    """dictionary.decode(f) for f (..., F); for sparse f, as a weighted sum of the active decoder rows.

    A trained dictionary has L0 in the tens to hundreds of 32768 features (under 1%), so summing only the
    active rows of W_dec (`embedding_bag`, O(L0 d) per token) is several times cheaper on CPU than the dense
    (F, d) matmul; above SPARSE_DECODE_DENSITY the dense matmul wins.
    """
    flat = f.reshape(-1, f.shape[-1])                                          # (tokens, F)
    if flat.numel() == 0 or int(torch.count_nonzero(flat)) > SPARSE_DECODE_DENSITY * flat.numel():
        return dictionary.decode(f)
    nz = flat.nonzero()                                                        # (nnz, 2), row-major
    counts = torch.bincount(nz[:, 0], minlength=flat.shape[0])
    offsets = counts.cumsum(0) - counts
    rows = torch.nn.functional.embedding_bag(nz[:, 1], dictionary.W_dec, offsets, mode="sum",
                                             per_sample_weights=flat[nz[:, 0], nz[:, 1]])  # (tokens, d)
    return (rows + dictionary.b_dec).reshape(*f.shape[:-1], -1)


@dataclass
class _State:
    """One activation seen at a site: x (batch, pos, d) and its features f (batch, pos, F).

    Edits are kept sparse: `idx` (k,) the sorted indices of edited features, `vals` (batch, pos, k) their
    new values, so an edit costs O(k d) per token instead of a dense (F, d) decode.
    """

    x: Tensor
    real: Tensor | None
    f: Tensor
    idx: Tensor | None = None
    vals: Tensor | None = None
    written: Tensor | None = None


class Site:
    """A dictionary at a hook point of a traced model: read features, splice, ablate, steer, set."""

    def __init__(self, model: Any, dictionary: Dictionary, hook: Any, masks: Any):
        self.model = model
        self.dictionary = dictionary
        self.hook = hook              # attach.ResolvedHook: path, io, module, width
        self._masks = masks           # attach._MaskRecorder: the latest forward's attention mask
        self._envoy = model.get(hook.path) if hook.path else model
        self._state: _State | None = None

    def __repr__(self) -> str:
        card = getattr(self.dictionary, "card", None)
        name = card.name if card is not None else type(self.dictionary).__name__
        return f"Site({name!r} at {self.hook.path}:{self.hook.io})"

    # ---- reading ---------------------------------------------------------------------------------
    def _read(self) -> Any:
        if not self._masks.inside():
            raise OutsideTraceError(f"{self!r}")
        return self._envoy.output if self.hook.io == "output" else self._envoy.input

    def _current(self) -> _State:
        """The state of the activation now at the hook, computing features when it is a new one."""
        x = first_tensor(self._read())
        st = self._state
        if st is not None and (x is st.x or x is st.written):
            return st
        real = self._masks.real(x)
        f = self.dictionary.encode(x.to(self.dictionary.W_enc.dtype))   # (batch, pos, F), the dictionary's dtype
        if real is not None:
            f = f * real.unsqueeze(-1).to(f.dtype)
        self._state = _State(x=x, real=real, f=f)
        return self._state

    @property
    def features(self) -> Tensor:
        """Features f (batch, pos, d_dict) of the activation at the hook (0 at pad positions)."""
        return self._current().f

    @property
    def reconstruction(self) -> Tensor:
        """decode(f) (batch, pos, d_in); pad positions hold the activation itself."""
        st = self._current()
        x_hat = decode(self.dictionary, st.f).to(st.x.dtype)
        return x_hat if st.real is None else torch.where(st.real.unsqueeze(-1), x_hat, st.x)

    @property
    def error(self) -> Tensor:
        """x - reconstruction (batch, pos, d_in): what the dictionary misses (0 at pad positions)."""
        st = self._current()
        return st.x - self.reconstruction

    # ---- writing ---------------------------------------------------------------------------------
    def _write(self, st: _State, error: bool) -> None:
        W_dec = self.dictionary.W_dec
        delta = None if st.idx is None else (st.vals - st.f[..., st.idx]) @ W_dec[st.idx]   # (batch, pos, d)
        if error:
            new = st.x if delta is None else st.x + delta.to(st.x.dtype)   # exactly x when nothing was edited
        else:
            new = decode(self.dictionary, st.f)
            new = (new if delta is None else new + delta).to(st.x.dtype)
        if st.real is not None and new is not st.x:
            new = torch.where(st.real.unsqueeze(-1), new, st.x)
        if self.hook.io == "output":
            self._envoy.output = replace_first(self._read(), new)
        else:
            self._envoy.input = new
        st.written = new

    def _edit(self, features: int | Sequence[int] | Tensor, value: float | None, add: float | None,
              error: bool) -> None:
        st = self._current()
        index = torch.as_tensor(features, dtype=torch.long, device=st.f.device).reshape(-1).unique()
        if index.numel() and (int(index[0]) < 0 or int(index[-1]) >= self.dictionary.d_dict):
            raise FeatureIndexError(index.tolist(), self.dictionary.d_dict)
        idx = index if st.idx is None else torch.cat([st.idx, index]).unique()      # sorted
        vals = st.f[..., idx].clone()                                              # (batch, pos, k)
        if st.idx is not None:  # earlier edits of this forward carry over
            vals[..., torch.searchsorted(idx, st.idx)] = st.vals
        at = torch.searchsorted(idx, index)
        if value is not None:
            vals[..., at] = value
        if add is not None:
            vals[..., at] += add
        st.idx, st.vals = idx, vals
        self._write(st, error)

    def splice(self, error: bool = True) -> None:
        """Replace the activation by the reconstruction (plus the error term unless error=False)."""
        self._write(self._current(), error)

    def ablate(self, features: int | Sequence[int] | Tensor, value: float = 0.0, error: bool = True) -> None:
        """Set the given features to `value` (default 0) at every real position and write the result."""
        self._edit(features, value, None, error)

    def steer(self, feature: int | Sequence[int] | Tensor, amount: float, error: bool = True) -> None:
        """Add `amount` to a feature's activation (moves x by amount * W_dec[feature]) at every real position."""
        self._edit(feature, None, amount, error)

    def set(self, feature: int | Sequence[int] | Tensor, value: float, error: bool = True) -> None:
        """Set a feature's activation to `value` at every real position."""
        self._edit(feature, value, None, error)
