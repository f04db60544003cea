"""The transformers model under any wrapper, and plain-torch forward hooks on it: what training and evaluation use.

Load a model (`load_model`), find a hook point and its width without running the model (`find_hook`),
collect the activations at several hook points from one forward that stops right after the deepest one
(`collect_activations`: an exception raised from the last hook that fires), and run a forward with
activations replaced (`run_patched`). Everything accepts a raw `PreTrainedModel` or an nnsight-wrapped one
and is independent of the order hooks are listed in; nothing here imports nnsight (`attachment.py` does).

A hook point is a module path ("gpt_neox.layers.3.mlp", "...:input") or a (site, layer) pair such as
("resid_post", 3), mapped through the per-architecture table of `model_families.py` (`find_hook` is the one
resolver that attachment, harvesting, evaluation and inspection use).

Activations are (batch, pos, d). A module whose output is a tuple (attention in transformers 5) is read
and written through its first element; one that sees the tokens flattened to (batch * pos, d) (OPT's MLP)
is viewed as (batch, pos, d) (`as_tokens`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dictionaries.errors import (
    HookPointError,
    ModelLoadError,
    NotWrappedError,
    ShapeMismatchError,
)
from dictionaries.model_families import SiteHook, family_of, site_path
from dictionaries.placement import (
    input_device,
    may_offload,
    model_dtype,
    offload_folder,
    parse_device_map,
    resolve_device,
)
from dictionaries.recipe import HookPoint

SiteRef = tuple[str, int]
"""A (site, layer) pair, e.g. ("mlp_out", 3): see model_families.SITES."""


def is_site_ref(hook: Any) -> bool:
    """Whether `hook` is a (site, layer) pair rather than a path, a HookPoint or a list of hook points."""
    return isinstance(hook, tuple) and len(hook) == 2 and isinstance(hook[0], str) and isinstance(hook[1], int)


def first_tensor(value: Any) -> Tensor:
    """The activation in a module's output: the value itself or the first element of a tuple."""
    return value[0] if isinstance(value, (tuple, list)) else value


def as_tokens(x: Tensor, batch_shape: Sequence[int] | None) -> Tensor:
    """x as (batch, pos, d): a (batch * pos, d) activation of a block that flattens the tokens is viewed with
    the forward's (batch, pos); anything else is returned as is."""
    if batch_shape is not None and x.dim() == 2 and len(batch_shape) == 2 \
            and x.shape[0] == batch_shape[0] * batch_shape[1]:
        return x.view(batch_shape[0], batch_shape[1], x.shape[-1])
    return x


def replace_first(value: Any, new: Tensor) -> Any:
    """`value` with its activation replaced by `new` (tuple outputs keep their other elements)."""
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    return new



def load_model(ref: str, *, revision: str | None = None, device: torch.device | str | None = None,
               tokenizer: Any = None, dtype: Any = None, device_map: Any = None) -> tuple[nn.Module, Any]:
    """A model (eval mode, on `device`) and its tokenizer from a HF id or a local `save_pretrained` folder, at
    `revision`, in the class its config names (`model_class`); ModelLoadError saying why when either cannot
    be loaded. `dtype` (fp32 by default, bf16, fp16: placement.model_dtype) is the weights' precision, whatever
    the checkpoint's (transformers 5 would otherwise load the dtype its config names, fp16 for Pythia);
    `device_map` (placement.parse_device_map) places the model instead of `device` as it loads."""
    from transformers import AutoConfig, AutoTokenizer

    if ref.startswith(("/", "./", "../", "~")) and not Path(ref).expanduser().is_dir():  # a path, never a Hub id
        raise ModelLoadError(ref, "there is no folder at this path")
    torch_dtype, placed = model_dtype(dtype), parse_device_map(device_map)  # bad values before any loading
    device = resolve_device(device if device is not None else "cpu")
    where: dict[str, Any] = {"device_map": placed} if placed is not None else {}
    if may_offload(placed):
        where["offload_folder"] = offload_folder()
    try:
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(ref, revision=revision)
        config = AutoConfig.from_pretrained(ref, revision=revision)
        model = model_class(config).from_pretrained(ref, revision=revision, dtype=torch_dtype, **where)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(ref, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    return (model if placed is not None else model.to(device)).eval(), tokenizer


def model_class(config: Any) -> Any:
    """The transformers class to load a checkpoint in: the first of `config.architectures` that transformers has
    (`BertForMaskedLM`, `BertModel`, `LlamaForCausalLM`), so an encoder keeps its own head (or none) instead of
    getting a randomly initialised causal-LM head; without one, AutoModelForCausalLM for a causal family
    (model_families' `causal`; for types not in the table, when transformers maps the type to a causal LM,
    which it does for BERT too, as BertLMHeadModel), else AutoModel (the bare base model)."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    fam = family_of(config.model_type)
    causal = fam.causal if fam is not None else config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return AutoModelForCausalLM if causal else AutoModel


def torch_model(model: Any) -> nn.Module:
    """The underlying torch module of a raw model or of an nnsight-wrapped one (an Envoy keeps it as `_module`;
    read without importing nnsight, which only `attachment.py` does)."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "_module", None)
    if isinstance(inner, nn.Module):
        return inner
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


def site_hook(model: Any, site: str, layer: int) -> SiteHook:
    """The module path and io of (site, layer) in this model, from the table of its `config.model_type`.

    HookPointError when the architecture is not in the table or has no module carrying that site (saying
    why, e.g. a parallel block's resid_mid)."""
    hf = torch_model(model)
    model_type = getattr(getattr(hf, "config", None), "model_type", None)
    fam = family_of(model_type)
    where = f"{site}@{layer}"
    if fam is None:
        raise HookPointError(where, problem=f"model type {model_type!r} is not in the table of "
                                            "dictionaries/model_families.py; give its module path instead.")
    base = fam.base if isinstance(getattr(hf, fam.base, None), nn.Module) else ""   # head model or bare base
    found = site_path(fam, site, int(layer), config=hf.config, base=base)
    if isinstance(found, str):
        raise HookPointError(where, problem=f"{found}.")
    return found


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


def find_hook(model: Any, hook: HookPoint | str | SiteRef) -> ResolvedHook:
    """The torch module and width of a hook point (a path or a (site, layer) pair); HookPointError naming
    close module names if absent."""
    if is_site_ref(hook):
        found = site_hook(model, *hook)
        path, io = found.module, found.io
    else:
        path, io = parse_hook(hook)
    hf = torch_model(model)
    try:
        module = hf.get_submodule(path) if path else hf
    except AttributeError:
        names = [n for n, _ in hf.named_modules() if n]
        close = difflib.get_close_matches(path, names, n=5, cutoff=0.6)
        raise HookPointError(path, close) from None
    return ResolvedHook(path, io, module, module_width(hf, module, io))


def check_hook(model: Any, hook: HookPoint | str | SiteRef, d_in: int | None) -> ResolvedHook:
    """`find_hook`, then ShapeMismatchError when `d_in` is given and is not the module's width."""
    found = find_hook(model, hook)
    if d_in is not None and found.width is not None and found.width != d_in:
        raise ShapeMismatchError(f"dictionary width at {found.key}", f"(..., {d_in})", f"(..., {found.width})",
                                 hint="Attach it at a hook point of that width, or use a dictionary made for it.")
    return found


# ---- plain-torch primitives --------------------------------------------------------------------------
class _StopForward(Exception):
    """Raised from the deepest hook to end a forward early (no later module runs)."""


def _position_ids(attention_mask: Tensor | None) -> Tensor | None:
    """Positions counted from each row's first real token, for left-padded rows; None without padding."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _forward(hf: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> Any:
    device = input_device(hf)  # with a device map: where the embedding is, not necessarily the caller's device
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device) if attention_mask is not None else None
    kwargs: dict[str, Any] = {"use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
        positions = _position_ids(attention_mask)
        if positions is not None:
            kwargs["position_ids"] = positions
    return hf(input_ids, **kwargs)


def _register(found: ResolvedHook, fn: Callable[[Tensor], Tensor | None], batch_shape: Sequence[int]) -> Any:
    """A torch hook calling fn(activation as (batch, pos, d)); a returned tensor replaces the activation."""
    def call(x: Tensor) -> Tensor | None:
        new = fn(as_tokens(x, batch_shape))
        return None if new is None else new.reshape(x.shape)

    if found.io == "output":
        def on_output(_module, _args, output):
            new = call(first_tensor(output))
            return None if new is None else replace_first(output, new)

        return found.module.register_forward_hook(on_output)

    def on_input(_module, args, kwargs):
        if args:
            new = call(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        name = next(iter(kwargs))  # the activation passed by keyword (hidden_states=...)
        new = call(kwargs[name])
        return None if new is None else (args, {**kwargs, name: new})

    return found.module.register_forward_pre_hook(on_input, with_kwargs=True)


def collect_activations(model: Any, hooks: Sequence[HookPoint | str | SiteRef], input_ids: Tensor,
                        attention_mask: Tensor | None = None) -> list[Tensor]:
    """Activations (batch, pos, d) at every hook, in `hooks` order, from one no-grad forward.

    The forward stops as soon as the last of the hooks has fired, so nothing deeper is computed. The others
    are copied: the forward goes on past them and may change their tensor in place (Falcon adds the
    attention output into the MLP's output, `mlp_output += attention_output`).
    """
    found = [find_hook(model, h) for h in hooks]
    keys = list(dict.fromkeys(f.key for f in found))
    saved: dict[str, Tensor] = {}

    def saver(key: str) -> Callable[[Tensor], None]:
        def save(x: Tensor) -> None:
            last = len(saved | {key: x}) == len(keys)
            saved[key] = x if last else x.clone()
            if last:
                raise _StopForward

        return save

    handles = [_register(f, saver(f.key), input_ids.shape) for f in {f.key: f for f in found}.values()]
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
                patches: Mapping[HookPoint | str | SiteRef, Callable[[Tensor], Tensor]] | None = None) -> Tensor:
    """Logits (batch, pos, vocab) of one no-grad forward where each hook's x becomes patches[hook](x); for a
    model without an LM head, its final hidden state (batch, pos, d)."""
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
            handles.append(_register(found, checked(fn, found.key), input_ids.shape))
        with torch.no_grad():
            out = _forward(torch_model(model), input_ids, attention_mask)
    finally:
        for h in handles:
            h.remove()
    if hasattr(out, "logits"):
        return out.logits
    hidden = getattr(out, "last_hidden_state", None)  # a base model without a head (BertModel): its final state
    return hidden if hidden is not None else first_tensor(out)
