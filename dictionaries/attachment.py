"""Dictionaries inside nnsight traces: `attach(model, *dictionaries)` and the `Attachment`s it yields.

The only module of the package that imports nnsight. Inside `model.trace(...)` / `model.generate(...)`
(nnsight 0.8: the trace body runs on real tensors, and module values must be read in the order the model
computes them) an Attachment reads features, splices the reconstruction in, ablates, steers or sets
features. Each property or edit reads the hook's current activation x (batch, pos, d) from the envoy;
within one forward every call shares one state (x, its features, the edited features), and a new forward
(the next trace, the next generation step) starts a new one.

Edits keep the error term by default: the written activation is x + (f_edited - f) W_dec, so an unedited
splice writes x back exactly and an edit changes x by exactly the decoder contribution it adds or removes
(Marks et al. 2024, *Sparse Feature Circuits*, keep the error term the same way). With `error=False` the
activation becomes the reconstruction decode(f_edited). Pad positions (attention mask 0) are never changed
and their features read as 0. Plain-torch hooks (what training uses) are in `hooks.py`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nnsight
import torch
from torch import Tensor, nn

from dictionaries.errors import (
    FeatureIndexError,
    HookPointError,
    ModelMismatchError,
    NotWrappedError,
    OutsideTraceError,
    ShapeMismatchError,
)
from dictionaries.hooks import (
    ResolvedHook,
    as_tokens,
    check_hook,
    find_hook,
    first_tensor,
    is_site_ref,
    load_model,
    model_name,
    replace_first,
    torch_model,
)
from dictionaries.recipe import HookPoint

if TYPE_CHECKING:
    from dictionaries.architectures import Dictionary


class ModelMismatchWarning(UserWarning):
    """A dictionary whose card names another model, attached where the width still matches."""


def wrap_model(model: Any, tokenizer: Any = None) -> Any:
    """An nnsight-wrapped model from a wrapped model (returned as is), a transformers model or a HF id/folder.

    `TransformersModel` (nnsight 0.8's successor of `LanguageModel`) needs a tokenizer for text inputs and
    `generate`; a model object without one is wrapped with plain `NNsight` (token-id traces only). nnsight
    sets the tokenizer's padding side to left (and pad = eos where it has no pad token).
    """
    if isinstance(model, nnsight.Envoy):
        return model
    if isinstance(model, str):
        model, tokenizer = load_model(model, tokenizer=tokenizer)
    if tokenizer is None:
        return nnsight.NNsight(model)
    return nnsight.TransformersModel(model, tokenizer=tokenizer, task="text-generation")


def resolve_hook(model: Any, hook: HookPoint | str, *, d_in: int | None = None) -> Any:
    """The nnsight envoy (for a wrapped model) or torch module (for a raw one) at a hook point.

    Raises HookPointError for a missing module and ShapeMismatchError when `d_in` is not the module's width.
    """
    found = check_hook(model, hook, d_in)
    if isinstance(model, nnsight.Envoy):
        return envoy_at(model, found)
    return found.module


def envoy_at(model: Any, found: ResolvedHook) -> Any:
    """The envoy of a resolved hook's module, found by module identity through the envoy tree.

    `model.get(path)` walks attributes, and nnsight serves a child whose name collides with its own
    attributes under another name (BERT's `encoder.layer.L.output` becomes `E_output`), so a path alone
    cannot reach it; the torch module found by path can, whatever it is called.
    """
    if not found.path:
        return model
    stack = [model]
    while stack:
        envoy = stack.pop()
        if envoy._module is found.module:
            return envoy
        stack.extend(getattr(envoy, "_children", ()))
    raise HookPointError(found.path, problem="nnsight serves no envoy for this module.")


class _MaskRecorder:
    """Keeps the attention mask and (batch, pos) of the model's latest forward (a pre-hook on the root module)."""

    def __init__(self, hf: nn.Module):
        self.mask: Tensor | None = None
        self.batch_shape: tuple[int, ...] | None = None   # (batch, pos) of this forward's tokens
        self.handle = hf.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], Tensor):
            mask = args[1]
        self.mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, Tensor):
            ids = kwargs.get("inputs_embeds")
        self.batch_shape = tuple(ids.shape[:2]) if isinstance(ids, Tensor) and ids.dim() >= 2 else None

    @staticmethod
    def inside() -> bool:
        """Whether the caller runs inside an nnsight trace (a worker of the interleaver)."""
        from nnsight.intervention.interleaver import Mediator

        try:
            Mediator.current("an attachment")
        except ValueError:
            return False
        return True

    def real(self, x: Tensor) -> Tensor | None:
        """(batch, pos) bool of real tokens for activation x, None when all are real or it cannot tell.

        The mask covers the whole sequence (cache included in generation), so x's positions are its last
        columns. With several invokes batched together x holds one invoke's rows: those of its batch group.
        """
        mask = self.mask
        if mask is not None and x.dim() == 3 and mask.shape[0] != x.shape[0]:
            mask = _invoke_rows(mask, x.shape[0])
        if mask is None or x.dim() != 3 or mask.shape[0] != x.shape[0] or mask.shape[1] < x.shape[1]:
            return None
        real = mask[:, mask.shape[1] - x.shape[1]:].to(device=x.device, dtype=torch.bool)
        return None if bool(real.all()) else real


def _same_model(card_model: str, name: str) -> bool:
    """Whether a card's model id names this model (an id or a local folder of the same name)."""
    a, b = card_model.rstrip("/").lower(), name.rstrip("/").lower()
    return a == b or a.rsplit("/", 1)[-1] == b.rsplit("/", 1)[-1]


def _check_fit(model: Any, dictionary: Dictionary, found: ResolvedHook) -> None:
    """Width against d_in, and the card's model against the model's name (warning or error)."""
    card = getattr(dictionary, "card", None)
    card_model = card.model.id if card is not None and card.model is not None else ""
    name = model_name(model)
    other = bool(card_model and name and not _same_model(card_model, name))
    if found.width is not None and found.width != dictionary.d_in:
        if other:
            raise ModelMismatchError(card_model, name, found.key, dictionary.d_in, found.width)
        raise ShapeMismatchError(f"dictionary width at {found.key}", f"(..., {dictionary.d_in})",
                                 f"(..., {found.width})",
                                 hint="Attach it at a hook point of that width (`at=`), "
                                      "or use a dictionary made for it.")
    if other:
        warnings.warn(f"the card of {card.name!r} names model {card_model!r}, attached to {name!r} "
                      f"(width {found.width} matches); features may mean nothing here.",
                      ModelMismatchWarning, stacklevel=4)


def _invoke_rows(mask: Tensor, rows: int) -> Tensor | None:
    """The mask rows of the invoke running now (nnsight's batch group [start, size]); None if unknown."""
    try:
        from nnsight.intervention.interleaver import Mediator

        start, size = Mediator.current("attention mask").batch_group
    except Exception:  # outside a worker, a whole-batch worker, or another nnsight layout
        return None
    return mask[start:start + size] if size == rows else None


@contextmanager
def attach(model: Any, *dictionaries: Dictionary, at: Any = None) -> Iterator[Attachment | tuple[Attachment, ...]]:
    """Attach dictionaries to an nnsight-wrapped model: yields an Attachment (one) or a tuple of them (several).

    `at` overrides the card's hook point: a module path ("model.layers.3.mlp", "...:input"), a HookPoint or
    a (site, layer) pair such as ("resid_post", 3) (model_families.SITES), one for every dictionary or a
    list with one per dictionary. Every hook point and width is checked here, before anything runs.
    """
    if not isinstance(model, nnsight.Envoy):
        raise NotWrappedError(type(model).__name__)
    one = at is None or isinstance(at, (str, HookPoint)) or is_site_ref(at)
    ats = [at] * len(dictionaries) if one else list(at)
    if len(ats) != len(dictionaries):
        raise HookPointError(str(at), problem=f"{len(ats)} hook points given for {len(dictionaries)} dictionaries.")
    found_hooks = []
    for dictionary, where in zip(dictionaries, ats):
        card = getattr(dictionary, "card", None)
        hook = where if where is not None else (card.hook if card is not None else None)
        if hook is None:
            name = card.name if card is not None else "the dictionary"
            raise HookPointError("<none>", problem=f"the card of {name!r} names no hook point.")
        found = find_hook(model, hook)
        _check_fit(model, dictionary, found)
        found_hooks.append(found)
    recorder = _MaskRecorder(torch_model(model))
    try:
        made = tuple(Attachment(model, d, f, recorder) for d, f in zip(dictionaries, found_hooks))
        yield made[0] if len(made) == 1 else made
    finally:
        recorder.handle.remove()


SPARSE_DECODE_DENSITY = 0.02
"""Below this fraction of non-zero features, decode gathers decoder rows instead of a dense matmul."""


def decode(dictionary: Dictionary, f: Tensor) -> Tensor:
    """dictionary.decode(f) for f (..., F); for sparse f, as a weighted sum of the active decoder rows.

    A trained dictionary has L0 in the tens to hundreds of 32768 features (under 1%), so summing only the
    active rows of W_dec (`embedding_bag`, O(L0 d) per token) is several times cheaper on CPU than the dense
    (F, d) matmul; above SPARSE_DECODE_DENSITY the dense matmul wins.
    """
    flat = f.reshape(-1, f.shape[-1])                                          # (tokens, F)
    probe = flat[: max(1, flat.shape[0] // 16)]   # the density from a slice: a full count is one more pass
    if flat.numel() == 0 or int(torch.count_nonzero(probe)) > SPARSE_DECODE_DENSITY * probe.numel():
        return dictionary.decode(f)
    nz = flat.nonzero()                                                        # (nnz, 2), row-major
    if nz.shape[0] > SPARSE_DECODE_DENSITY * flat.numel():                     # the slice was not typical
        return dictionary.decode(f)
    counts = torch.bincount(nz[:, 0], minlength=flat.shape[0])
    offsets = counts.cumsum(0) - counts
    rows = torch.nn.functional.embedding_bag(nz[:, 1], dictionary.W_dec, offsets, mode="sum",
                                             per_sample_weights=flat[nz[:, 0], nz[:, 1]])  # (tokens, d)
    return (rows + dictionary.b_dec).reshape(*f.shape[:-1], -1)


RECONSTRUCT_BLOCK_BYTES = 16 * 2**20
"""On CPU, `reconstruct` encodes at most this many bytes of features at a time."""


def reconstruct(dictionary: Dictionary, x: Tensor) -> Tensor:
    """decode(encode(x)) (..., d) for activations x (..., d), without the dense (tokens, F) features.

    Every architecture encodes each token on its own, so the tokens go through in blocks: on CPU a
    (tokens, F) tensor of one forward (1024 x 32768 floats, 128 MiB) is fresh memory from the system each
    time, whose first-touch page faults cost as much as a third of its encoder GEMM; a 16 MiB block is
    reused from the allocator's free list and stays in cache through its sparse decode. Accelerators
    (a caching allocator, no per-block launch savings to lose) take the tokens in one block.
    """
    flat = x.reshape(-1, x.shape[-1]).to(dictionary.W_enc.dtype)                   # (tokens, d)
    rows = flat.shape[0]
    if flat.device.type == "cpu":
        rows = max(1, RECONSTRUCT_BLOCK_BYTES // (dictionary.d_dict * flat.element_size()))
    if rows >= flat.shape[0]:
        return decode(dictionary, dictionary.encode(flat)).reshape(*x.shape[:-1], -1)
    out = torch.empty(flat.shape[0], dictionary.d_in, dtype=flat.dtype, device=flat.device)
    for start in range(0, flat.shape[0], rows):
        block = flat[start:start + rows]                                           # (rows, d)
        out[start:start + rows] = decode(dictionary, dictionary.encode(block))
    return out.reshape(*x.shape[:-1], -1)


@dataclass
class _State:
    """One activation seen at a hook: x (batch, pos, d) and its features f (batch, pos, F), computed on first
    use (a splice of the error term alone needs none, a plain splice only the reconstruction: `reconstruct`).

    Edits are kept sparse: `idx` (k,) the sorted indices of edited features, `vals` (batch, pos, k) their
    new values, so an edit costs O(k d) per token instead of a dense (F, d) decode.
    """

    x: Tensor
    real: Tensor | None
    f: Tensor | None = None
    raw: Tensor | None = None     # the module's own tensor when x is a (batch, pos, d) view of it (OPT's MLP)
    idx: Tensor | None = None
    vals: Tensor | None = None
    written: Tensor | None = None


class Attachment:
    """A dictionary at a hook point of a traced model: read features, splice, ablate, steer, set."""

    def __init__(self, model: Any, dictionary: Dictionary, hook: Any, masks: Any):
        self.model = model
        self.dictionary = dictionary
        self.hook = hook              # hooks.ResolvedHook: path, io, module, width
        self._masks = masks           # _MaskRecorder: the latest forward's attention mask
        self._envoy = envoy_at(model, hook)
        self._state: _State | None = None

    def __repr__(self) -> str:
        card = getattr(self.dictionary, "card", None)
        name = card.name if card is not None else type(self.dictionary).__name__
        return f"Attachment({name!r} at {self.hook.path}:{self.hook.io})"

    # ---- reading ---------------------------------------------------------------------------------
    def _read(self) -> Any:
        if not self._masks.inside():
            raise OutsideTraceError(f"{self!r}")
        return self._envoy.output if self.hook.io == "output" else self._envoy.input

    def _current(self) -> _State:
        """The state of the activation now at the hook, computing features when it is a new one."""
        raw = first_tensor(self._read())
        st = self._state
        if st is not None and (raw is st.raw or raw is st.x or raw is st.written):
            return st
        x = as_tokens(raw, self._masks.batch_shape)                    # (batch, pos, d)
        self._state = _State(x=x, real=self._masks.real(x), raw=raw)
        return self._state

    def _features(self, st: _State) -> Tensor:
        """st.f, encoded on first use: (batch, pos, F) in the dictionary's dtype, 0 at pad positions."""
        if st.f is None:
            f = self.dictionary.encode(st.x.to(self.dictionary.W_enc.dtype))
            st.f = f if st.real is None else f * st.real.unsqueeze(-1).to(f.dtype)
        return st.f

    @property
    def features(self) -> Tensor:
        """Features f (batch, pos, d_dict) of the activation at the hook (0 at pad positions)."""
        return self._features(self._current())

    @property
    def reconstruction(self) -> Tensor:
        """decode(f) (batch, pos, d_in); pad positions hold the activation itself."""
        st = self._current()
        x_hat = reconstruct(self.dictionary, st.x) if st.f is None else decode(self.dictionary, st.f)
        x_hat = x_hat.to(st.x.dtype)
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
        elif st.f is None:      # nothing edited and the features never read: no dense (batch, pos, F)
            new = reconstruct(self.dictionary, st.x)
        else:
            new = decode(self.dictionary, st.f)
            new = (new if delta is None else new + delta).to(st.x.dtype)
        if st.real is not None and new is not st.x:
            new = torch.where(st.real.unsqueeze(-1), new, st.x)
        if st.raw is not None and new is st.x:
            new = st.raw                                   # the module's own tensor, untouched
        elif st.raw is not None:
            new = new.reshape(st.raw.shape)
        if self.hook.io == "output":
            self._envoy.output = replace_first(self._read(), new)
        else:
            self._envoy.input = new
        st.written = new

    def _edit(self, features: int | Sequence[int] | Tensor, value: float | None, add: float | None,
              error: bool) -> None:
        st = self._current()
        f = self._features(st)
        index = torch.as_tensor(features, dtype=torch.long, device=f.device).reshape(-1).unique()
        if index.numel() and (int(index[0]) < 0 or int(index[-1]) >= self.dictionary.d_dict):
            raise FeatureIndexError(index.tolist(), self.dictionary.d_dict)
        idx = index if st.idx is None else torch.cat([st.idx, index]).unique()      # sorted
        vals = f[..., idx].clone()                                                 # (batch, pos, k)
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
