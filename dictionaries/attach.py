"""Dictionaries inside models: hook points, activation collection, patched forwards, and `attach`.

The only module of the package that imports nnsight. Two layers:
- primitives for training and evaluation (`wrap_model`, `resolve_hook`, `collect_activations`,
  `run_patched`): plain torch forward hooks on the underlying transformers module, so they accept a raw
  `PreTrainedModel` or an nnsight-wrapped one, are independent of the order hooks are listed in, and stop
  the forward right after the deepest hook (an exception raised from the last hook that fires);
- the researcher-facing `attach(model, *dictionaries)`, yielding `Site`s used inside `model.trace(...)` /
  `model.generate(...)` (nnsight 0.8: the trace body runs on real tensors, and module values must be
  read in the order the model computes them).

Activations are (batch, pos, d). A module whose output is a tuple (attention in transformers 5) is read
and written through its first element. `features_of` and `inspect_feature` live in `features.py`.
"""

from __future__ import annotations

import difflib
import sys
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nnsight
import torch
from torch import Tensor, nn

from dictionaries.card import HookPoint
from dictionaries.errors import (HookPointError, ModelLoadError, ModelMismatchError, NotWrappedError,
                                 ShapeMismatchError)
from dictionaries.site import Site, first_tensor, replace_first

if TYPE_CHECKING:
    from dictionaries.architectures import Dictionary


class ModelMismatchWarning(UserWarning):
    """A dictionary whose card names another model, attached where the width still matches."""


# ---- models ------------------------------------------------------------------------------------------
def wrap_model(model: Any, tokenizer: Any = None) -> Any:
    """An nnsight-wrapped model from a wrapped model (returned as is), a transformers model or a HF id/folder.

    `TransformersModel` (nnsight 0.8's successor of `LanguageModel`) needs a tokenizer for text inputs and
    `generate`; a model object without one is wrapped with plain `NNsight` (token-id traces only). nnsight
    sets the tokenizer's padding side to left (and pad = eos where it has no pad token).
    """
    if isinstance(model, nnsight.Envoy):
        return model
    if isinstance(model, str):
        model, tokenizer = _load(model, tokenizer)
    if tokenizer is None:
        return nnsight.NNsight(model)
    return nnsight.TransformersModel(model, tokenizer=tokenizer, task="text-generation")


def _load(name: str, tokenizer: Any) -> tuple[nn.Module, Any]:
    """A causal LM and its tokenizer from a HF id or a local folder; ModelLoadError when that fails."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(name)
        return AutoModelForCausalLM.from_pretrained(name).eval(), tokenizer
    except (OSError, ValueError) as exc:
        raise ModelLoadError(name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def torch_model(model: Any) -> nn.Module:
    """The underlying torch module of a wrapped or raw model."""
    if isinstance(model, nnsight.Envoy):
        return model._module
    if isinstance(model, nn.Module):
        return model
    raise NotWrappedError(type(model).__name__, "a transformers model or an nnsight-wrapped one")


def model_name(model: Any) -> str:
    """The model's `name_or_path` ('' for a model built in-process)."""
    hf = torch_model(model)
    return str(getattr(getattr(hf, "config", None), "_name_or_path", "") or getattr(hf, "name_or_path", "") or "")


def hidden_size(hf: nn.Module) -> int | None:
    """The residual width from the config (`hidden_size`, GPT-2's `n_embd` maps to it), None if unknown."""
    config = getattr(hf, "config", None)
    return getattr(config, "hidden_size", None) if config is not None else None


# ---- hook points -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResolvedHook:
    """A hook point found in a model: its path, input or output, torch module and width."""

    path: str
    io: str
    module: nn.Module
    width: int | None

    @property
    def key(self) -> str:
        return f"{self.path}:{self.io}"


def parse_hook(hook: HookPoint | str) -> tuple[str, str]:
    """(module path, "output" | "input") of a HookPoint or a "module.path[:input|:output]" string."""
    if isinstance(hook, HookPoint):
        return hook.module, hook.io
    path, _, io = str(hook).partition(":")
    io = io or "output"
    if io not in ("input", "output"):
        raise HookPointError(str(hook), problem=f"the part after ':' must be 'input' or 'output', not {io!r}.")
    return path, io


def module_width(hf: nn.Module, module: nn.Module, io: str) -> int | None:
    """Width of a module's input or output, read from its parameters or the config, without running it.

    Linear-like layers and embeddings give their exact sizes; norms their normalised width; any other module
    with children (blocks, MLPs, attention) reads and writes the residual stream, so the config's hidden
    size. Leaf modules without parameters (activations, dropout) are unknown (None): checked at run time.
    """
    if isinstance(module, nn.Linear):
        return module.out_features if io == "output" else module.in_features
    if type(module).__name__ == "Conv1D":  # GPT-2's transposed linear: weight (in, out)
        return module.weight.shape[1] if io == "output" else module.weight.shape[0]
    if isinstance(module, nn.Embedding):
        return module.embedding_dim if io == "output" else None
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 1 and not list(module.children()):  # RMSNorm
        return weight.shape[0]
    if list(module.children()):
        return hidden_size(hf)
    return None


def find_hook(model: Any, hook: HookPoint | str) -> ResolvedHook:
    """The torch module and width of a hook point; HookPointError naming close module names if absent."""
    path, io = parse_hook(hook)
    hf = torch_model(model)
    try:
        module = hf.get_submodule(path) if path else hf
    except AttributeError:
        names = [n for n, _ in hf.named_modules() if n]
        close = difflib.get_close_matches(path, names, n=5, cutoff=0.6)
        raise HookPointError(path, close) from None
    return ResolvedHook(path, io, module, module_width(hf, module, io))


def resolve_hook(model: Any, hook: HookPoint | str, *, d_in: int | None = None) -> Any:
    """The nnsight envoy (for a wrapped model) or torch module (for a raw one) at a hook point.

    Raises HookPointError for a missing module and ShapeMismatchError when `d_in` is not the module's width.
    """
    found = find_hook(model, hook)
    if d_in is not None and found.width is not None and found.width != d_in:
        raise ShapeMismatchError(f"dictionary width at {found.key}", f"(..., {d_in})", f"(..., {found.width})",
                                 hint="Attach it at a hook point of that width, or use a dictionary made for it.")
    if isinstance(model, nnsight.Envoy):
        return model.get(found.path) if found.path else model
    return found.module


# ---- plain-torch primitives --------------------------------------------------------------------------
class _StopForward(Exception):
    """Raised from the deepest hook to end a forward early (no later module runs)."""


def _position_ids(attention_mask: Tensor | None) -> Tensor | None:
    """Positions counted from each row's first real token, for left-padded rows; None without padding."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _forward(hf: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> Any:
    kwargs: dict[str, Any] = {"use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
        positions = _position_ids(attention_mask)
        if positions is not None:
            kwargs["position_ids"] = positions
    return hf(input_ids, **kwargs)


def _register(found: ResolvedHook, fn: Callable[[Tensor], Tensor | None]) -> Any:
    """A torch hook calling fn(activation); a returned tensor replaces the activation."""
    if found.io == "output":
        def on_output(_module, _args, output):
            new = fn(first_tensor(output))
            return None if new is None else replace_first(output, new)

        return found.module.register_forward_hook(on_output)

    def on_input(_module, args, kwargs):
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        name = next(iter(kwargs))  # the activation passed by keyword (hidden_states=...)
        new = fn(kwargs[name])
        return None if new is None else (args, {**kwargs, name: new})

    return found.module.register_forward_pre_hook(on_input, with_kwargs=True)


def collect_activations(model: Any, hooks: Sequence[HookPoint | str], input_ids: Tensor,
                        attention_mask: Tensor | None = None) -> list[Tensor]:
    """Activations (batch, pos, d) at every hook, in `hooks` order, from one no-grad forward.

    The forward stops as soon as the last of the hooks has fired, so nothing deeper is computed.
    """
    found = [find_hook(model, h) for h in hooks]
    keys = list(dict.fromkeys(f.key for f in found))
    saved: dict[str, Tensor] = {}

    def saver(key: str) -> Callable[[Tensor], None]:
        def save(x: Tensor) -> None:
            saved[key] = x
            if len(saved) == len(keys):
                raise _StopForward

        return save

    handles = [_register(f, saver(f.key)) for f in {f.key: f for f in found}.values()]
    try:
        with torch.no_grad():
            _forward(torch_model(model), input_ids, attention_mask)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [k for k in keys if k not in saved]
    if missing:
        raise HookPointError(missing[0], problem="the module never ran in the forward.")
    return [saved[f.key] for f in found]


def run_patched(model: Any, input_ids: Tensor, attention_mask: Tensor | None = None,
                patches: Mapping[HookPoint | str, Callable[[Tensor], Tensor]] | None = None) -> Tensor:
    """Logits (batch, pos, vocab) of one no-grad forward where each hook's x becomes patches[hook](x)."""
    handles = []

    def checked(fn: Callable[[Tensor], Tensor], key: str) -> Callable[[Tensor], Tensor]:
        def patch(x: Tensor) -> Tensor:
            new = fn(x)
            if not isinstance(new, Tensor) or new.shape != x.shape:
                raise ShapeMismatchError(f"patch at {key}", tuple(x.shape), tuple(getattr(new, "shape", ())))
            return new

        return patch

    try:
        for hook, fn in (patches or {}).items():
            found = find_hook(model, hook)
            handles.append(_register(found, checked(fn, found.key)))
        with torch.no_grad():
            out = _forward(torch_model(model), input_ids, attention_mask)
    finally:
        for h in handles:
            h.remove()
    return out.logits if hasattr(out, "logits") else first_tensor(out)


# ---- attach: sites inside nnsight traces -------------------------------------------------------------
class _MaskRecorder:
    """Keeps the attention mask of the model's latest forward (a torch pre-hook on the root module)."""

    def __init__(self, hf: nn.Module):
        self.mask: Tensor | None = None
        self.handle = hf.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], Tensor):
            mask = args[1]
        self.mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None

    @staticmethod
    def inside() -> bool:
        """Whether the caller runs inside an nnsight trace (a worker of the interleaver)."""
        from nnsight.intervention.interleaver import Mediator

        try:
            Mediator.current("a site")
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


def _check_site(model: Any, dictionary: Dictionary, found: ResolvedHook) -> None:
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
def attach(model: Any, *dictionaries: Dictionary, at: HookPoint | str | Sequence[HookPoint | str] | None = None
           ) -> Iterator[Site | tuple[Site, ...]]:
    """Attach dictionaries to an nnsight-wrapped model: yields a Site (one) or a tuple of Sites (several).

    `at` overrides the card's hook point (one value for every dictionary, or one per dictionary). Every
    hook point and width is checked here, before anything runs.
    """
    if not isinstance(model, nnsight.Envoy):
        raise NotWrappedError(type(model).__name__)
    ats = list(at) if isinstance(at, (list, tuple)) else [at] * len(dictionaries)
    if len(ats) != len(dictionaries):
        raise HookPointError(str(at), problem=f"{len(ats)} hook points given for {len(dictionaries)} dictionaries.")
    sites = []
    for dictionary, where in zip(dictionaries, ats):
        card = getattr(dictionary, "card", None)
        hook = where if where is not None else (card.hook if card is not None else None)
        if hook is None:
            name = card.name if card is not None else "the dictionary"
            raise HookPointError("<none>", problem=f"the card of {name!r} names no hook point.")
        found = find_hook(model, hook)
        _check_site(model, dictionary, found)
        sites.append(found)
    recorder = _MaskRecorder(torch_model(model))
    try:
        made = tuple(Site(model, d, f, recorder) for d, f in zip(dictionaries, sites))
        yield made[0] if len(made) == 1 else made
    finally:
        recorder.handle.remove()


class _CallableModule(types.ModuleType):
    """This module, callable as `attach(...)`.

    `from dictionaries import attach` must give the function (DESIGN.md section 1), but once
    `dictionaries.attach` is imported Python binds the package attribute `attach` to this module, whatever
    `dictionaries/__init__.py` does; calling the module therefore calls the function.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return attach(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


def __getattr__(name: str) -> Any:
    # features_of / inspect_feature live in features.py (kept apart for size); exported here too.
    if name in ("features_of", "inspect_feature", "FeatureReport"):
        from dictionaries import features

        return getattr(features, name)
    raise AttributeError(f"module 'dictionaries.attach' has no attribute {name!r}")
