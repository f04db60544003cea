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

A transcoder (a card with `output_hook`; Dunefsky et al. 2024) reads its features at its input hook and
writes at its output hook: there the written activation is y + (f_edited - f) W_dec with the error term
(y the output hook's true value, so an unedited splice leaves the model unchanged), and the prediction
decode(f_edited) + x W_skip without it.
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
    InvalidArgumentError,
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
from dictionaries.placement import model_dtype
from dictionaries.recipe import HookPoint
from dictionaries.sparse_decoding import decode_mostly_zero, reconstruct

if TYPE_CHECKING:
    from dictionaries.architectures import Dictionary


class ModelMismatchWarning(UserWarning):
    """A dictionary whose card names another model, attached where the width still matches."""


def wrap_model(model: Any, tokenizer: Any = None, *, dtype: Any = None, device_map: Any = None) -> Any:
    """An nnsight-wrapped model from a wrapped model (returned as is), a transformers model or a HF id/folder.

    `TransformersModel` (nnsight 0.8's successor of `LanguageModel`) needs a tokenizer for text inputs and
    `generate`; a model object without one is wrapped with plain `NNsight` (token-id traces only). nnsight
    sets the tokenizer's padding side to left (and pad = eos where it has no pad token). A model that cannot
    generate (a `BertModel`, a masked LM) is wrapped for feature extraction. `dtype` (fp32, bf16, fp16) and
    `device_map` load a HF id/folder so (hooks.load_model); `dtype` casts a model object in place, and a
    device map, which places weights as they load, needs an id or folder.
    """
    if isinstance(model, str):
        model, tokenizer = load_model(model, tokenizer=tokenizer, dtype=dtype, device_map=device_map)
    elif device_map is not None:
        raise InvalidArgumentError("device_map", str(device_map), "a device map places weights as they load: "
                                                                  "give a HF id or folder, not a loaded model")
    elif dtype is not None:
        torch_model(model).to(model_dtype(dtype))
    if isinstance(model, nnsight.Envoy):
        return model
    if tokenizer is None:
        return nnsight.NNsight(model)
    task = "text-generation" if getattr(model, "can_generate", lambda: False)() else "feature-extraction"
    return nnsight.TransformersModel(model, tokenizer=tokenizer, task=task)


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


def _output_hook(model: Any, dictionary: Dictionary) -> ResolvedHook | None:
    """A transcoder's output hook, found and checked against d_out; None for an SAE."""
    card = getattr(dictionary, "card", None)
    if card is None or card.output_hook is None:
        return None
    return check_hook(model, card.output_hook, dictionary.d_out)


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
        found_hooks.append((found, _output_hook(model, dictionary)))
    recorder = _MaskRecorder(torch_model(model))
    try:
        made = tuple(Attachment(model, d, f, recorder, output=o) for d, (f, o) in zip(dictionaries, found_hooks))
        yield made[0] if len(made) == 1 else made
    finally:
        recorder.handle.remove()


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

    def __init__(self, model: Any, dictionary: Dictionary, hook: Any, masks: Any, output: Any = None):
        self.model = model
        self.dictionary = dictionary
        self.hook = hook              # hooks.ResolvedHook: path, io, module, width
        self.output_hook = output     # a transcoder's ResolvedHook where it writes; None: it writes at `hook`
        self._masks = masks           # _MaskRecorder: the latest forward's attention mask
        self._envoy = envoy_at(model, hook)
        self._out_envoy = envoy_at(model, output) if output is not None else self._envoy
        self._state: _State | None = None

    def __repr__(self) -> str:
        card = getattr(self.dictionary, "card", None)
        name = card.name if card is not None else type(self.dictionary).__name__
        out = "" if self.output_hook is None else f" -> {self.output_hook.key}"
        return f"Attachment({name!r} at {self.hook.path}:{self.hook.io}{out})"

    # ---- reading ---------------------------------------------------------------------------------
    def _read(self, output_side: bool = False) -> Any:
        if not self._masks.inside():
            raise OutsideTraceError(f"{self!r}")
        hook, envoy = (self.output_hook, self._out_envoy) if output_side and self.output_hook else \
            (self.hook, self._envoy)
        return envoy.output if hook.io == "output" else envoy.input

    def _target(self, st: _State) -> tuple[Tensor, Tensor | None]:
        """What edits are written over, (batch, pos, d_out), and the module's own tensor: x for an SAE; for a
        transcoder the output hook's current value y (read after the input: the order the model runs them)."""
        if self.output_hook is None:
            return st.x, st.raw
        raw = first_tensor(self._read(output_side=True))
        return as_tokens(raw, self._masks.batch_shape), raw

    def _prediction(self, st: _State) -> Tensor:
        """decode(f), plus x W_skip for a skip-transcoder (Paulo et al. 2025): (batch, pos, d_out)."""
        out = decode_mostly_zero(self.dictionary, self._features(st))
        W_skip = self.dictionary.W_skip
        return out if W_skip is None else out + st.x.to(W_skip.device, W_skip.dtype) @ W_skip

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
            W = self.dictionary.W_enc  # cast at the boundary: a bf16 model (or a device map), an fp32 dictionary
            f = self.dictionary.encode(st.x.to(W.device, W.dtype))
            st.f = f if st.real is None else f * st.real.unsqueeze(-1).to(f.device, f.dtype)
        return st.f

    @property
    def features(self) -> Tensor:
        """Features f (batch, pos, d_dict) of the activation at the hook (0 at pad positions)."""
        return self._features(self._current())

    @property
    def reconstruction(self) -> Tensor:
        """decode(f) (batch, pos, d_in), a transcoder's prediction (batch, pos, d_out); pad positions hold the
        activation itself (a transcoder's: its output hook's)."""
        st = self._current()
        if self.output_hook is None:   # an SAE: without the dense features when none were read (`reconstruct`)
            y = st.x
            x_hat = (reconstruct(self.dictionary, st.x) if st.f is None else
                     decode_mostly_zero(self.dictionary, st.f))
        else:
            y = self._target(st)[0]
            x_hat = self._prediction(st)
        x_hat = x_hat.to(y.device, y.dtype)
        return x_hat if st.real is None else torch.where(st.real.unsqueeze(-1), x_hat, y)

    @property
    def error(self) -> Tensor:
        """x - reconstruction (batch, pos, d_in), for a transcoder y - prediction at the output hook: what the
        dictionary misses (0 at pad positions)."""
        st = self._current()
        return self._target(st)[0] - self.reconstruction

    # ---- writing ---------------------------------------------------------------------------------
    def _write(self, st: _State, error: bool) -> None:
        W_dec = self.dictionary.W_dec
        y, raw = self._target(st)                          # x, or a transcoder's output y: (batch, pos, d_out)
        delta = None if st.idx is None else (st.vals - st.f[..., st.idx]) @ W_dec[st.idx]   # (batch, pos, d_out)
        if error:
            new = y if delta is None else y + delta.to(y.device, y.dtype)   # exactly y when nothing was edited
        elif st.f is None and self.output_hook is None:   # nothing edited, features never read: no (batch, pos, F)
            new = reconstruct(self.dictionary, st.x).to(y.device, y.dtype)
        else:
            new = self._prediction(st)
            new = (new if delta is None else new + delta).to(y.device, y.dtype)
        if st.real is not None and new is not y:
            new = torch.where(st.real.unsqueeze(-1), new, y)
        if raw is not None and new is y:
            new = raw                                      # the module's own tensor, untouched
        elif raw is not None:
            new = new.reshape(raw.shape)
        hook, envoy = (self.output_hook, self._out_envoy) if self.output_hook is not None else (self.hook, self._envoy)
        if hook.io == "output":
            envoy.output = replace_first(self._read(output_side=True), new)
        else:
            envoy.input = new
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
