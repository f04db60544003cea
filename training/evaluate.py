"""The card's stats (DESIGN.md section 7) for several dictionaries of one model in one pass over an eval set.

One batch of B contexts is measured with ONE forward: the batch is repeated 1 + 2K times for K dictionaries
(segment 0 clean; segment 1+2j with dictionary j's reconstruction spliced in at its hook; segment 2+2j
with zeros there), so clean, spliced and zero-ablated logits share a forward (dictionary_learning's
`evaluation.loss_recovered` runs five traces per batch for one dictionary). Each patch touches only its own
segments, so every dictionary sees clean activations at its hook even when dictionaries sit at different
depths. `max_rows` caps the rows per forward (default: logits of at most LOGITS_BUDGET bytes); dictionaries
are then split into groups, each group re-running the clean segment, and a batch whose three segments exceed it
into slices of contexts; log-softmax, CE and KL run a few contexts at a time, so the evaluation's memory is
bounded by the budget whatever the vocabulary, context length or batch size.

Token positions: a position counts when it is a real token (attention mask 1) and, with `exclude_bos`,
not the BOS id (with Pythia's tokenizer BOS = EOS, so the separators between packed documents too; see
training/harvest.py). Only counted positions are spliced or zeroed (the others keep their activation) and
enter MSE, L1, L0, density and FVU. CE and KL are averaged over counted positions whose next token is real;
KL is KL(clean || spliced) = sum_v p_clean (log p_clean - log p_spliced), the clean model as reference.
Reconstruction sums are streamed in float64; FVU uses Chan et al.'s pairwise merge of the running mean and
centred sum of squares, so no second pass and no cancellation (training/tally.py). A model without an LM
head gets the final hidden state's relative change instead of CE, KL and loss recovered (tally.py says how).
"""

from __future__ import annotations

import datetime
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dictionaries.architectures import Dictionary
from dictionaries.errors import EvalInputError, InvalidArgumentError
from dictionaries.recipe import DatasetSpec, HookPoint
from dictionaries.sparse_decoding import encode_and_predict
from training.sensitivity import SensitivityCurves, sensitivity_on_eval_set
from training.tally import EvalResult, Tally, add_hidden_changes, add_losses, has_lm_head

LOGITS_BUDGET = 64 << 20
"""Bytes of float32 logits one forward may produce by default; at least one context's three segments go
through a forward (Pythia-70m, context 128: 3 rows, 77 MB), and log-softmax runs one context at a time."""


def _check_dictionaries(dictionaries: Sequence[Dictionary]) -> list[HookPoint]:
    if not dictionaries:
        raise EvalInputError("dictionaries", "none were given", "Pass at least one dictionary.")
    hooks = []
    for d in dictionaries:
        if d.card is None or d.card.hook is None:
            name = d.card.name if d.card is not None else repr(d)
            raise EvalInputError(name, "its card names no hook point, so it cannot be spliced into the model",
                                 "Add `hook` (module, io, site, layer) to the card.")
        hooks.append(d.card.hook)
    return hooks


def _segment_patches(group: list[tuple[int, Dictionary]], hooks: list[HookPoint], b: int, keep: Tensor,
                     captured: dict[int, tuple[Tensor, Tensor, Tensor]]) -> dict[HookPoint, Any]:
    """One patch per hook: segment 1+2s gets dictionary s's x_hat, segment 2+2s zeros (counted positions).

    A transcoder writes at its output hook (the MLP's output: its prediction, or zeros, the zero-ablation
    baseline) from the clean rows of its input hook, read by a patch there that changes nothing; its
    reconstruction stats compare the prediction with the output hook's clean rows.
    """
    by_hook: dict[HookPoint, list[tuple[int, int, Dictionary]]] = defaultdict(list)
    reads: dict[HookPoint, list[int]] = defaultdict(list)
    inputs: dict[int, Tensor] = {}                           # transcoder j's clean input rows (B, pos, d_in)
    for s, (j, d) in enumerate(group):
        out_hook = d.card.output_hook if d.card is not None else None
        by_hook[out_hook or hooks[j]].append((s, j, d))
        if out_hook is not None:
            reads[hooks[j]].append(j)

    def read(js: list[int], then: Any = None):
        def patch(x: Tensor) -> Tensor:
            inputs.update({j: x[:b] for j in js})           # segment 0 is never patched: clean everywhere
            return x if then is None else then(x)
        return patch

    def make(items: list[tuple[int, int, Dictionary]]):
        def patch(x: Tensor) -> Tensor:                      # x (nseg * B, pos, d)
            out = x.clone()
            clean = x[:b]
            mask = keep.to(x.device)[..., None]              # (B, pos, 1)
            for s, j, d in items:
                x_d = inputs.get(j, clean).to(d.W_dec.device, d.W_dec.dtype)   # the dictionary's dtype, device
                x_hat, f = encode_and_predict(d, x_d)            # d(x_d), without dense passes on CPU
                captured[j] = (clean.to(d.W_dec.device, d.W_dec.dtype), x_hat, f)
                lo = (1 + 2 * s) * b
                out[lo:lo + b] = torch.where(mask, x_hat.to(x.device, x.dtype), clean)
                out[lo + b:lo + 2 * b] = torch.where(mask, torch.zeros_like(clean), clean)
            return out
        return patch

    patches = {hook: make(items) for hook, items in by_hook.items()}
    for hook, js in reads.items():  # reading first where a transcoder reads what another dictionary writes
        patches[hook] = read(js, patches.get(hook))
    return patches


def measure_batch(model, dictionaries: Sequence[Dictionary], hooks: list[HookPoint], tallies: list[Tally],
                  input_ids: Tensor, attention_mask: Tensor | None, keep: Tensor,
                  max_rows: int | None) -> tuple[float, int]:
    """Measure one batch for every dictionary; returns (sum of clean CE, predictions counted).

    At most `max_rows` rows go through one forward: dictionaries are split into groups (each re-running the
    clean segment) and, when even one dictionary's three segments of B rows are too many, the batch into
    slices of contexts (the sums add up the same; only their float64 order changes).
    """
    b = input_ids.shape[0]
    if max_rows is not None and max_rows < 3 * b and b > 1:
        sub = max(1, max_rows // 3)                            # contexts per forward: clean, spliced, zeroed
        ce_clean, predictions = 0.0, 0
        for lo in range(0, b, sub):
            part = slice(lo, lo + sub)
            mask = attention_mask[part] if attention_mask is not None else None
            ce, n = measure_batch(model, dictionaries, hooks, tallies, input_ids[part], mask, keep[part], max_rows)
            ce_clean, predictions = ce_clean + ce, predictions + n
        return ce_clean, predictions
    return _measure_groups(model, dictionaries, hooks, tallies, input_ids, attention_mask, keep, max_rows)


def _measure_groups(model, dictionaries: Sequence[Dictionary], hooks: list[HookPoint], tallies: list[Tally],
                    input_ids: Tensor, attention_mask: Tensor | None, keep: Tensor,
                    max_rows: int | None) -> tuple[float, int]:
    """`measure_batch` for a batch whose three segments fit `max_rows`: one forward per group of dictionaries."""
    from dictionaries.hooks import run_patched, torch_model

    b, head = input_ids.shape[0], has_lm_head(torch_model(model))
    real = torch.ones_like(keep) if attention_mask is None else attention_mask.bool()
    predicts = (keep[:, :-1] & real[:, 1:]).double()          # (B, pos-1): position t predicts token t+1
    per_forward = len(dictionaries) if max_rows is None else max(1, (max_rows // b - 1) // 2)
    # contexts per log-softmax: each (chunk, pos-1, V) temporary is at most an eighth of the forward's logits
    chunk = b if max_rows is None else max(1, max_rows // 8)
    order = list(enumerate(dictionaries))
    ce_clean = 0.0
    for start in range(0, len(order), per_forward):
        group = order[start:start + per_forward]
        nseg = 1 + 2 * len(group)
        captured: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        patches = _segment_patches(group, hooks, b, keep, captured)
        ids = input_ids.repeat(nseg, 1)
        mask = attention_mask.repeat(nseg, 1) if attention_mask is not None else None
        logits = run_patched(model, ids, mask, patches)       # (nseg * B, pos, V), or hidden states (no head)
        if head:
            ce = add_losses(logits, b, group, tallies, input_ids[:, 1:].to(logits.device),
                             predicts.to(logits.device), chunk)
            ce_clean = ce if start == 0 else ce_clean
        else:
            add_hidden_changes(logits, b, group, tallies, keep)
        del logits
        _add_reconstructions(group, tallies, captured, keep)
    return ce_clean, int(predicts.sum().item())


def _add_reconstructions(group: list, tallies: list[Tally], captured: dict, keep: Tensor) -> None:
    for j, _ in group:
        x, x_hat, f = captured[j]
        k = keep.to(x.device)
        tallies[j].add_reconstruction(x[k].to(x_hat.dtype), x_hat[k], f[k])


def pack_batches(data: Any, *, tokenizer=None, tokens: int, context_length: int, batch_size: int,
                 seed: int = 0, prepend_bos: bool = False) -> list[tuple[Tensor, Tensor | None]]:
    """The eval set as (input_ids (B, C), attention_mask or None) batches, ceil(tokens / C) contexts in all.

    `data`: a DatasetSpec, dataset path or Hub id (read by training.data.TokenStream, seeded, BOS first when
    `prepend_bos`), a list of texts (EOS-joined and packed), a LongTensor (N, C), or an iterable of tensors /
    (ids, mask) pairs (taken as they are).
    """
    want = -(-tokens // context_length)
    if isinstance(data, (str, DatasetSpec)) or (isinstance(data, Sequence) and data and isinstance(data[0], str)):
        contexts = _stream_contexts(data, tokenizer, context_length, seed, want, prepend_bos)
        return [(contexts[i:i + batch_size], None) for i in range(0, len(contexts), batch_size)]
    if isinstance(data, Tensor):
        data = [data[i:i + batch_size] for i in range(0, min(len(data), want), batch_size)]
    batches, have = [], 0
    for item in data:
        ids, mask = item if isinstance(item, (tuple, list)) else (item, None)
        batches.append((ids, mask))
        have += ids.shape[0]
        if have >= want:
            break
    if not batches:
        raise EvalInputError("eval data", "it holds no token batches", "Pass texts, a dataset or token tensors.")
    return batches


def _stream_contexts(data: str | DatasetSpec | Sequence[str], tokenizer, context_length: int, seed: int, want: int,
                     prepend_bos: bool) -> Tensor:
    """Contexts (m, C): a dataset via training.data.TokenStream (seeded), texts EOS-joined in order."""
    if tokenizer is None:
        raise EvalInputError("eval data", "texts need a tokenizer", "Pass `tokenizer=` (the model's).")
    if isinstance(data, (str, DatasetSpec)):
        from training.data import TokenStream

        spec = data if isinstance(data, DatasetSpec) else DatasetSpec(path=data)
        contexts = TokenStream(spec, tokenizer, context_length=context_length, prepend_bos=prepend_bos,
                               seed=seed).next_contexts(want)
    else:
        flat: list[int] = []
        for ids in tokenizer(list(data), add_special_tokens=False)["input_ids"]:
            flat += [*ids, tokenizer.eos_token_id]
        m = min(want, len(flat) // context_length)
        contexts = torch.tensor(flat[:m * context_length], dtype=torch.long).view(m, context_length)
    if len(contexts) == 0:
        raise EvalInputError("eval data", f"it holds fewer than {context_length} tokens",
                             "Use more text or a shorter --context-length.")
    return contexts


def _meta(data: Any, dataset_name: str | None, batches: list, *, context_length: int, exclude_bos: bool,
          seed: int, prepend_bos: bool, held_out: str | None) -> dict:
    """The Stats fields that say how the stats were measured (the whole dataset spec when data is one)."""
    from dictionaries import __version__
    from dictionaries.card import EvalSet

    spec = data if isinstance(data, DatasetSpec) else DatasetSpec(path=data) if isinstance(data, str) else None
    contexts = sum(ids.shape[0] for ids, _ in batches)
    eval_set = None if spec is None else EvalSet(dataset=spec, seed=seed, prepend_bos=prepend_bos,
                                                  contexts=contexts, held_out=held_out)
    return dict(dataset=dataset_name or (spec.path if spec is not None else None), eval_set=eval_set,
                context_length=context_length, exclude_bos=exclude_bos, package_version=__version__,
                date=datetime.date.today().isoformat())


def check_sizes(*, tokens: int, context_length: int, batch_size: int) -> None:
    """InvalidArgumentError for an eval size that measures nothing: tokens or batch size below 1, contexts
    shorter than 2 tokens (one prediction needs two)."""
    for name, value, least in (("tokens", tokens, 1), ("context_length", context_length, 2),
                               ("batch_size", batch_size, 1)):
        if value < least:
            raise InvalidArgumentError(name, value, f"expected a whole number >= {least}")


def evaluate(model, dictionaries: Sequence[Dictionary], data: Any, *, tokenizer=None, tokens: int = 16384,
             context_length: int = 128, batch_size: int = 8, exclude_bos: bool = True, device=None, seed: int = 0,
             sensitivity: bool = True, sensitivity_samples: int = 32, dataset_name: str | None = None,
             max_rows: int | None = None, progress: bool = True, prepend_bos: bool = False,
             held_out: str | None = None) -> list[EvalResult]:
    """Measure every stat of DESIGN.md section 7 (and the sensitivity test) for dictionaries of one model.

    The eval set is the first ceil(tokens / context_length) contexts of `data` (see `pack_batches`);
    the same seed gives the same set and the same sensitivity samples. For a dataset, the stats record the
    whole spec, order and BOS setting (`Stats.eval_set`), and `held_out` says how it relates to training.
    """
    from tqdm.auto import tqdm

    from dictionaries.hooks import torch_model
    from dictionaries.placement import input_device, is_dispatched
    from training.harvest import token_mask

    check_sizes(tokens=tokens, context_length=context_length, batch_size=batch_size)
    hooks = _check_dictionaries(dictionaries)
    hf = torch_model(model)                                   # a transformers model, wrapped by nnsight or not
    device = torch.device(device) if device is not None else input_device(hf)
    if not is_dispatched(hf):  # a model spread by a device map stays where the map put it
        hf.to(device)
    dicts = [d.to(device) for d in dictionaries]
    batches = pack_batches(data, tokenizer=tokenizer, tokens=tokens, context_length=context_length,
                           batch_size=batch_size, seed=seed, prepend_bos=prepend_bos)
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    bos = bos if bos is not None else getattr(hf.config, "bos_token_id", None)
    tallies = [Tally(d.d_out, d.d_dict) for d in dicts]   # a transcoder's stats are of its output hook
    ce_clean, predictions = 0.0, 0
    bar = tqdm(total=sum(ids.numel() for ids, _ in batches), desc="eval", unit="tok", unit_scale=True,
               disable=not progress)
    with torch.no_grad():
        for ids, mask in batches:
            ids = ids.to(device)
            mask = mask.to(device) if mask is not None else None
            keep = token_mask(ids, mask, bos_id=bos, exclude_bos=exclude_bos)
            rows = max_rows or max(1, LOGITS_BUDGET // (4 * ids.shape[1] * hf.config.vocab_size))
            ce, n = measure_batch(model, dicts, hooks, tallies, ids, mask, keep, rows)
            ce_clean, predictions = ce_clean + ce, predictions + n
            bar.update(ids.numel())
    bar.close()
    meta = _meta(data, dataset_name, batches, context_length=context_length, exclude_bos=exclude_bos, seed=seed,
                 prepend_bos=prepend_bos, held_out=held_out)
    curves: list[SensitivityCurves | None] = [None] * len(dicts)
    saes = [i for i, d in enumerate(dicts) if d.card.output_hook is None]  # Apollo's test perturbs x along the
    if sensitivity and has_lm_head(hf) and saes:  # decoder at the hook read; KL between next-token distributions
        found = sensitivity_on_eval_set(hf, [dicts[i] for i in saes], [hooks[i] for i in saes], batches, bos_id=bos,
                                        exclude_bos=exclude_bos, samples=sensitivity_samples, seed=seed,
                                        progress=progress)
        for i, c in zip(saes, found):
            curves[i] = c
    results = []
    for d, t, c in zip(dicts, tallies, curves):
        stats = t.stats(ce_clean, predictions, d.d_out, **meta)
        if c is not None:
            stats = stats.model_copy(update={"sensitivity": c.to_card()})
        results.append(EvalResult(d.card.name, stats, (t.fired / max(t.tokens, 1)).float(), c))
    return results


# ---- folders and the command line ---------------------------------------------------------------------
def write_evaluated(folder: str | Path, dictionary: Dictionary, result: EvalResult, *, in_place: bool = False) -> Any:
    """Write an evaluated dictionary: its card with the stats, density.safetensors and the plots; the new card.

    The folder is written once: a new native folder (weights and card together, `formats.write_native`), or,
    `in_place`, the dictionary's own native folder whose card.json alone is replaced (atomically).
    """
    from dictionaries.constants import CARD_FILE, DENSITY_PNG, SENSITIVITY_PNG
    from dictionaries.files import write_atomic
    from dictionaries.formats import write_native
    from training.density import plot_density, save_density
    from training.sensitivity import plot_sensitivity

    folder = Path(folder)
    card = dictionary.card.model_copy(update={"stats": result.stats})
    if in_place:
        write_atomic(folder / CARD_FILE, card.to_json())
    else:
        card = write_native(dictionary, folder, card=card)
    save_density(result.density, folder)
    plot_density(result.density, folder / DENSITY_PNG, title=f"{card.name}: feature density")
    if result.sensitivity is not None:
        plot_sensitivity(result.sensitivity, folder / SENSITIVITY_PNG, title=f"{card.name}: sensitive directions")
    return card


def evaluate_and_write(refs: Any, *, model: Any = None, tokenizer=None, dataset: Any = None, tokens: int = 16384,
                       context_length: int = 128, batch_size: int = 8, device=None, out: str | None = None,
                       sensitivity: bool = True, sensitivity_samples: int = 32, exclude_bos: bool = True,
                       seed: int = 0, progress: bool = True, hook: Any = None, model_dtype: Any = None,
                       device_map: Any = None) -> list[tuple[str, Any]]:
    """`dictctl eval`: evaluate what `refs` names (registry names, native folders, globs of either, or a list
    of them) in one pass; write stats, density and plots.

    `model`: a folder or HF id (default: the cards' model), or a loaded model object given with its
    `tokenizer`. A native folder (with card.json) is updated in place unless `out` is given; a registry entry
    (or a foreign folder) becomes an evaluated native folder `out/<card name>` (default out: `evaluated`).
    Returns (folder written, new card) per dictionary; `hook` (hook_choice.py) supplies or replaces card hooks.
    A model loaded here is in `model_dtype` (default: the cards' recipe `model_dtype`, else float32) and placed
    by `device_map` (placement.py) when one is given; each dictionary keeps its own dtype.
    """
    from dictionaries.hook_choice import set_hooks
    from dictionaries.hooks import load_model, resolve_device
    from dictionaries.loader import load_dictionary
    from dictionaries.placement import model_dtype as as_dtype
    from dictionaries.placement import parse_device_map
    from dictionaries.references import resolve
    from training.data import check_dataset

    check_sizes(tokens=tokens, context_length=context_length, batch_size=batch_size)  # bad input before any work
    device = resolve_device(device) if device is not None else None
    model_dtype, device_map = as_dtype(model_dtype) if model_dtype is not None else None, parse_device_map(device_map)
    if isinstance(dataset, (str, Path)):
        check_dataset(DatasetSpec(path=str(dataset)))
    found = resolve(refs)
    dicts = [load_dictionary(r.folder if r.folder is not None else r.text, device=device) for r in found]
    places = [_output_folder(r, d, out) for r, d in zip(found, dicts)]  # checked before any work is done
    models = {(d.card.model.id, d.card.model.revision) if d.card.model else None for d in dicts}
    if model is None and (len(models) != 1 or None in models):
        raise EvalInputError(str(refs), f"its dictionaries name models {sorted(map(str, models))}",
                             "Evaluate dictionaries of one model together, or pass --model.")
    ref, revision = (model, None) if model is not None else next(iter(models))
    recipe_data = dicts[0].card.recipe.dataset.path if dicts[0].card.recipe else None
    data = dataset or recipe_data
    if data is None:
        raise EvalInputError(str(refs), "no eval dataset given and the card has no recipe dataset",
                             "Pass --dataset (a local text file or a dataset id).")
    lm = ref
    if isinstance(ref, (str, Path)):
        trained_in = {d.card.recipe.model_dtype for d in dicts if d.card.recipe is not None}
        dtype = model_dtype or (trained_in.pop() if len(trained_in) == 1 else None)
        lm, tokenizer = load_model(str(ref), revision=revision, device=device, dtype=dtype, device_map=device_map)
    set_hooks(lm, dicts, hook)  # a hook given, or the foreign config's placed by the loaded model's family
    local = isinstance(data, (str, Path)) and Path(data).expanduser().exists()
    name = str(Path(data).expanduser().resolve()) if local else (data if isinstance(data, str) else None)
    results = evaluate(lm, dicts, str(data) if local else data, tokenizer=tokenizer, dataset_name=name,
                       tokens=tokens, context_length=context_length, batch_size=batch_size, exclude_bos=exclude_bos,
                       device=device, seed=seed, sensitivity=sensitivity, sensitivity_samples=sensitivity_samples,
                       progress=progress)
    return [(str(folder), write_evaluated(folder, d, result, in_place=in_place))
            for (folder, in_place), d, result in zip(places, dicts, results)]


def _output_folder(found: Any, dictionary: Dictionary, out: str | None) -> tuple[Path, bool]:
    """(where an evaluated dictionary goes, whether that is its own folder): a native folder in place unless
    `out` is given, else `out/<card name>`, the name checked to stay inside `out` (a card is free text)."""
    from dictionaries.constants import CARD_FILE
    from dictionaries.errors import CardError
    from dictionaries.files import relative_path_problem

    if found.folder is not None and (found.folder / CARD_FILE).is_file() and out is None:
        return found.folder, True
    problem = relative_path_problem(dictionary.card.name)
    if problem:
        raise CardError(found.text, "name", f"{problem}; the card's name is the output folder under --out")
    return Path(out or "evaluated") / dictionary.card.name, False
