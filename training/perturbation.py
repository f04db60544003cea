"""The sensitivity test's perturbed forwards: KL curves of the next-token distribution when a direction is added,
step by step, to the hook's activation at one position (what `sensitivity.measure_sensitivity` calls).

Three paths, equal within float rounding:
- `curves_full`: whole-context forwards, any positions and padding (the reference);
- `curves_from_prefix` with `skip_before_hook=False`: where every perturbed position is the last and nothing is
  padded, the P - 1 earlier tokens run once per base into a KV cache and each perturbed forward runs the last
  token alone over it (causal attention: the earlier positions do not see the last one);
- `curves_from_prefix` (default): as above, and the blocks wholly before the hook (the decoder blocks of
  layers < L for a hook inside or at the input of block L; of layers <= L for block L's output) run only in
  the clean forward (batch = bases); in the perturbed forwards (batch = bases x steps) their forward is
  replaced by one returning that recorded (rows, 1, d) output (`replaying`). The model's own forward still
  builds masks, positions and rotary embeddings and runs the embedding, the hook's block and all later ones
  over the cache. The skipped layers' cache entries are not extended by the last token, which nothing reads:
  the cache length is taken before the first block, and the copy is dropped after the forward (no family of
  the table shares keys and values across layers).

Skipping needs a causal family of `model_families.py` (its block list `<base>.<layers>`) with the hook inside
that list, and blocks returning a tensor or a tuple whose other elements are None (transformers 5: every
family returns a tensor but Falcon, whose block returns (hidden, None)). Elsewhere (a family not in the table,
a hook outside the blocks, such as the embedding or the final norm, or another return convention) the
perturbed forwards run every layer, as the plain prefix path does.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from dictionaries.recipe import HookPoint


def final_logprobs(model, contexts: Tensor, mask: Tensor | None, positions: Tensor, hook: HookPoint,
                   deltas: Tensor | None) -> Tensor:
    """Log-probs (R, V) at each row's position, with deltas (R, d) added to the hook's activation there."""
    from dictionaries.hooks import run_patched

    rows = torch.arange(contexts.shape[0])
    patches = None
    if deltas is not None:
        def perturb(x: Tensor) -> Tensor:
            out = x.clone()
            out[rows, positions] = out[rows, positions] + deltas.to(x.dtype).to(x.device)
            return out
        patches = {hook: perturb}
    logits = run_patched(model, contexts, mask, patches)               # (R, P, V)
    return torch.log_softmax(logits[rows, positions.to(logits.device)].float(), -1).cpu()


def add_at_last(model, hook: HookPoint, deltas: Tensor, shape: tuple[int, ...]):
    """A torch hook adding deltas (R, d) to the hook's activation at the last position of a forward of token
    ids `shape` (R, P); returns its handle. Here rather than hooks.run_patched, which runs without a KV cache."""
    from dictionaries.hooks import as_tokens, find_hook, first_tensor, replace_first

    found = find_hook(model, hook)

    def shifted(x: Tensor) -> Tensor:
        t = as_tokens(x, shape)                                          # (R, P, d)
        out = t.clone()
        out[:, -1] += deltas.to(t.dtype).to(t.device)
        return out.reshape(x.shape)

    if found.io == "output":
        return found.module.register_forward_hook(
            lambda _m, args, output: replace_first(output, shifted(first_tensor(output))))

    def on_input(_m, args, kwargs):
        if args:
            return (shifted(args[0]), *args[1:]), kwargs
        name = next(iter(kwargs))
        return args, {**kwargs, name: shifted(kwargs[name])}

    return found.module.register_forward_pre_hook(on_input, with_kwargs=True)


def prefix_cache(hf, contexts: Tensor):
    """The KV cache of every context's first P - 1 tokens (N rows), or None for a model that keeps none."""
    with torch.no_grad():
        out = hf(contexts[:, :-1], use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)  # transformers >= 5.24: `cache`
    needed = ("batch_repeat_interleave", "batch_select_indices")
    return cache if all(hasattr(cache, m) for m in needed) else None


def _cache_argument(hf, cache) -> dict:
    """The forward's keyword for a KV cache: `cache` from transformers 5.24, `past_key_values` before."""
    return {"cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values": cache}


# ---- the blocks wholly before the hook -----------------------------------------------------------------
def find_blocks_before(hf: nn.Module, hook: HookPoint) -> list[nn.Module] | None:
    """The decoder blocks whose output at the last token does not depend on the hook's perturbation, in order:
    blocks 0..L-1 for a hook inside block L or at its input, 0..L for block L's output. None where the model
    is not a causal family of model_families.py or the hook is not inside its block list."""
    from dictionaries.hooks import find_hook
    from dictionaries.model_families import family_of

    fam = family_of(getattr(getattr(hf, "config", None), "model_type", None))
    if fam is None or not fam.causal:
        return None
    base = fam.base if isinstance(getattr(hf, fam.base, None), nn.Module) else ""   # head model or bare base
    list_path = ".".join(p for p in (base, fam.layers) if p)
    found = find_hook(hf, hook)
    if not found.path.startswith(list_path + "."):
        return None                                                      # embedding, final norm, head...
    index, _, inner = found.path[len(list_path) + 1:].partition(".")
    blocks = hf.get_submodule(list_path)
    if not index.isdigit() or not isinstance(blocks, nn.ModuleList):
        return None
    stop = int(index) + (1 if not inner and found.io == "output" else 0)
    return list(blocks)[:stop]


def _replayable(output: Any) -> bool:
    """Whether a block's output can be rebuilt from its first tensor: a tensor, or a tuple/list whose other
    elements are None (a tensor there, such as attention weights, would need the perturbed batch too)."""
    if isinstance(output, Tensor):
        return True
    return isinstance(output, (tuple, list)) and isinstance(output[0], Tensor) and all(o is None for o in output[1:])


@contextmanager
def recording(blocks: Sequence[nn.Module]) -> Iterator[list[Any]]:
    """For the forward run inside it: each block's output object, in block order (its tensors (N, 1, d) for a
    last-token forward of N rows), the activation copied (a later block may add into its input in place). An
    empty list when a block did not run."""
    from dictionaries.hooks import first_tensor, replace_first

    outputs: dict[int, Any] = {}

    def keep(i: int, out: Any) -> None:
        outputs[i] = replace_first(out, first_tensor(out).clone()) if _replayable(out) else out

    # prepend: the forward's own output, before any other hook on the block (those run again on the replay)
    handles = [b.register_forward_hook(lambda _m, _a, out, i=i: keep(i, out), prepend=True)
               for i, b in enumerate(blocks)]
    recorded: list[Any] = []
    try:
        yield recorded
    finally:
        for h in handles:
            h.remove()
    if len(outputs) == len(blocks):
        recorded.extend(outputs[i] for i in range(len(blocks)))


@contextmanager
def replaying(blocks: Sequence[nn.Module], outputs: Sequence[Any], rows: Tensor) -> Iterator[None]:
    """Inside it, block i's forward returns outputs[i] (recorded over N rows) at row indices `rows` (R,), without
    computing anything: its first tensor becomes (R, 1, d). The forward hooks on the blocks still fire."""
    from dictionaries.hooks import first_tensor, replace_first

    saved = []
    for block, out in zip(blocks, outputs):
        picked = replace_first(out, first_tensor(out)[rows.to(first_tensor(out).device)])   # (R, 1, d)
        saved.append(block.__dict__.get("forward"))
        block.forward = lambda *_args, _out=picked, **_kwargs: _out
    try:
        yield
    finally:
        for block, old in zip(blocks, saved):
            del block.forward                                            # the class's forward again
            if old is not None:
                block.forward = old


# ---- the perturbed forwards ----------------------------------------------------------------------------
def _last_logprobs(hf, hook: HookPoint, cache, last: Tensor, bases: Tensor, repeats: int,
                   deltas: Tensor | None) -> Tensor:
    """Log-probs (len(bases) * repeats, V) at the last position, each base's row repeated `repeats` times
    (ordered base, then repeat) with deltas (rows, d) added to the hook's activation there.

    Causal attention: the P - 1 earlier positions do not see the last one, so their keys and values come
    from `cache` (computed once per base) and only the last token runs through the model, which also
    computes the LM head at one position instead of P (the head dominates Pythia-70m's cost per token)."""
    c = copy.deepcopy(cache)                                             # the forward appends to its cache
    c.batch_select_indices(bases.to(last.device))
    if repeats > 1:
        c.batch_repeat_interleave(repeats)
    ids = last[bases].repeat_interleave(repeats)[:, None]                # (R, 1)
    handle = add_at_last(hf, hook, deltas, tuple(ids.shape)) if deltas is not None else None
    try:
        with torch.no_grad():
            logits = hf(ids, **_cache_argument(hf, c), use_cache=True).logits[:, -1]   # (R, V)
    finally:
        if handle is not None:
            handle.remove()
    return torch.log_softmax(logits.float(), -1).cpu()


def kl_divergence(ref: Tensor, lp: Tensor) -> Tensor:
    """KL(ref || lp) per row of log-probs (R, V), clamped at 0 (rounding)."""
    return (ref.exp() * (ref - lp)).sum(-1).clamp_min(0)


def curves_from_prefix(hf, hook: HookPoint, contexts: Tensor, cache, directions: dict[str, Tensor],
                       steps: Tensor, rows_per_forward: int, bar, *, skip_before_hook: bool = True
                       ) -> dict[str, Tensor]:
    """kind -> (N, S) KL, every step and base of a kind in one forward of the last token over `cache`
    (more forwards only when N * S rows of logits exceed the budget). With `skip_before_hook`, the blocks
    before the hook run in the clean forward only and are replayed in the perturbed ones (module docstring)."""
    n, s = contexts.shape[0], len(steps)
    last = contexts[:, -1]
    everyone = torch.arange(n)
    blocks = (find_blocks_before(hf, hook) if skip_before_hook else None) or []
    with recording(blocks) as outputs:
        clean = _last_logprobs(hf, hook, cache, last, everyone, 1, None)          # (N, V)
    if len(outputs) != len(blocks) or not all(_replayable(o) for o in outputs):
        blocks, outputs = [], []                                                 # every layer, as without skipping
    per = max(1, rows_per_forward // s)                                          # bases per forward
    kls = {}
    for kind, u in directions.items():
        out = torch.empty(n, s)
        for lo in range(0, n, per):
            bases = everyone[lo:lo + per]
            deltas = (steps[None, :, None] * u[bases, None, :]).reshape(-1, u.shape[1])   # (b*S, d)
            with replaying(blocks, outputs, bases.repeat_interleave(s)):
                lp = _last_logprobs(hf, hook, cache, last, bases, s, deltas)
            out[bases] = kl_divergence(clean[bases].repeat_interleave(s, 0), lp).view(len(bases), s)
            bar.update(len(bases) * s)
        kls[kind] = out
    return kls


def curves_full(model, hook: HookPoint, contexts: Tensor, mask: Tensor | None, positions: Tensor,
                directions: dict[str, Tensor], steps: Tensor, rows_per_forward: int, bar) -> dict[str, Tensor]:
    """kind -> (N, S) KL from whole-context forwards (any positions, padding): the reference path."""
    n = contexts.shape[0]
    with torch.no_grad():
        clean = final_logprobs(model, contexts, mask, positions, hook, None)           # (N, V)
    kls = {}
    for kind, u in directions.items():
        # rows ordered (base, step): delta = t * u
        deltas = (steps[None, :, None] * u[:, None, :]).reshape(-1, u.shape[1])          # (N*S, d)
        which = torch.arange(n).repeat_interleave(len(steps))
        out = torch.empty(n * len(steps))
        for lo in range(0, len(which), rows_per_forward):
            idx = which[lo:lo + rows_per_forward]
            m = mask[idx] if mask is not None else None
            with torch.no_grad():
                lp = final_logprobs(model, contexts[idx], m, positions[idx], hook, deltas[lo:lo + len(idx)])
            out[lo:lo + len(idx)] = kl_divergence(clean[idx], lp)
            bar.update(len(idx))
        kls[kind] = out.view(n, len(steps))
    return kls
