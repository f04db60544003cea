"""TopK and BatchTopK training (with AuxK) through the kept features only (dictionaries/sparse_decoding.py).

The choosing forward, (x - b_dec) @ W_enc + b_enc, runs without a graph one block of features at a time: each
(B, width) block of pre-activations gives its own top candidates (per token for TopK and AuxK, over the
flattened block for BatchTopK), and the kept entries are the top of the candidates, the same entries as a top
over the whole (B, F) (the best k of a union are among the best k of its parts). No (B, F) tensor is made:
a 128 MiB one at B 1024, F 32768, fresh pages every step (glibc maps allocations above 32 MiB anew, and the
kernel zeroes them), where a 16 MiB block is reused from the heap. Then the kept values become differentiable
(`gathered_pre_activations`) and are decoded by an embedding bag: of the dense step's five (B, d) x (d, F)
products, the choosing one remains. Same loss and gradients as `compute_loss(sparse=False)` (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dictionaries.architectures import Dictionary
from dictionaries.recipe import Recipe
from dictionaries.sparse_decoding import decode_code, flat_code, gathered_pre_activations, topk_code
from training.loss_result import LossOutput, reconstruction_loss

CHOOSE_BLOCK_ELEMENTS = 1 << 22
"""Pre-activations computed per block of features: this many elements (16 MiB in float32), under glibc's
32 MiB threshold for mapping an allocation afresh."""


SAMPLE_SIZE = 1 << 16
"""`flat_top` bounds its threshold from about this many evenly spaced values."""


def flat_top(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest of a 1-d `values` and their indices: the entries of `values.topk(k, sorted=False)` (which of
    tied values aside), found through a threshold, 10x faster on CPU for BatchTopK's k = 32 B of B F.

    A top over every value costs about 80 ms for 32768 of 4M on this project's 2-core CPU. Here the top 1.5 k n / m
    (plus 16) of m ~ SAMPLE_SIZE evenly spaced values give a bound; every value not below it is a candidate (one
    pass and a nonzero), and the answer is the top k of the candidates, about 1.5 k of them: exact whenever at least
    k values reach the bound, since the k largest all do; else (an unrepresentative sample) the whole top runs.
    The stride is odd, so over a row-major (B, width) block with a power-of-two width it visits every feature.
    NaN counts as largest, as in topk: `not (v < bound)` keeps it. On a GPU, topk (a radix select) stays: there the
    candidates' nonzero would wait on the device once per block.
    """
    n = values.numel()
    if k >= n or n < 8 * SAMPLE_SIZE or values.device.type != "cpu":
        return values.topk(k, sorted=False)
    sample = values[::(n // SAMPLE_SIZE) | 1]
    bound = sample.topk(min(sample.numel(), int(1.5 * k * sample.numel() / n) + 16), sorted=False).values.min()
    where = values.lt(bound).logical_not_().nonzero().squeeze(1)                # (about 1.5 k,)
    if where.numel() < k:
        return values.topk(k, sorted=False)
    top = values[where].topk(k, sorted=False)
    return top.values, where[top.indices]


@dataclass(frozen=True)
class Kept:
    """Entries of a code chosen without a graph: each (n,), rows ascending."""

    rows: Tensor
    """Token of each entry."""
    features: Tensor
    """Feature of each entry."""
    known: Tensor | None
    """Their pre-activations from the choosing product, where it ran at W_enc's precision (else None: recomputed
    at full precision, since under autocast the product ran in bf16)."""


@dataclass(frozen=True)
class Choice:
    """What the choosing forward keeps: the code, BatchTopK's smallest kept value and AuxK's dead picks."""

    kept: Kept
    """The TopK / BatchTopK entries."""
    smallest: Tensor | None
    """BatchTopK: the smallest positive kept pre-activation (inf if none); None for TopK."""
    aux: Kept | None
    """AuxK: each token's top aux_k dead features; None when nothing is dead or there is no AuxK."""


def _candidates(values: list[Tensor], indices: list[Tensor], k: int, full: bool) -> Kept:
    """The top k per row of per-block candidates (B, c) each: a Kept in topk_code's order."""
    merged, where = torch.cat(values, 1).topk(k, dim=-1, sorted=False)        # (B, k)
    rows, features = topk_code(torch.cat(indices, 1).gather(1, where))
    return Kept(rows, features, merged.reshape(-1) if full else None)


@torch.no_grad()
def choose(module: Dictionary, x: Tensor, recipe: Recipe, dead: Tensor, aux_k: int | None) -> Choice:
    """The kept entries of x (B, d) under the recipe's TopK or BatchTopK, and AuxK's over `dead` (F,) bool."""
    b, n_features = x.shape[0], module.d_dict
    shifted = x - module.b_dec if module.pre_encoder_bias else x                 # (B, d)
    n_dead = int(dead.sum()) if aux_k is not None else 0
    width = max(1, CHOOSE_BLOCK_ELEMENTS // max(b, 1))
    batch = recipe.architecture == "batchtopk"
    picks = min(recipe.k * b, b * n_features) if batch else recipe.k
    top: tuple[list, list] = ([], [])
    aux: tuple[list, list] = ([], [])
    full = True
    for first in range(0, n_features, width):
        last = min(first + width, n_features)
        pre = torch.addmm(module.b_enc[first:last], shifted, module.W_enc[:, first:last])   # (B, width)
        full = pre.dtype == module.W_enc.dtype
        if n_dead:  # AuxK first: BatchTopK's ReLU below is in place
            masked = pre.masked_fill(~dead[first:last], float("-inf"))
            values, indices = masked.topk(min(aux_k, last - first), dim=-1, sorted=False)
            aux[0].append(values)
            aux[1].append(indices + first)
        if batch:
            values, indices = flat_top(pre.relu_().view(-1), min(picks, pre.numel()))
            top[0].append(values)
            top[1].append(indices // (last - first) * n_features + indices % (last - first) + first)
        else:
            values, indices = pre.topk(min(recipe.k, last - first), dim=-1, sorted=False)
            top[0].append(values)
            top[1].append(indices + first)
    aux_kept = _candidates(*aux, min(aux_k, n_dead), full) if n_dead else None
    if not batch:
        return Choice(_candidates(*top, recipe.k, full), None, aux_kept)
    values, where = flat_top(torch.cat(top[0]), picks)                          # over the flattened batch
    flat = torch.cat(top[1])[where]
    order = flat.argsort()                                                      # rows ascending, as flat_code
    rows, features = flat_code(flat, n_features)
    positive = values[values > 0]
    smallest = positive.min() if positive.numel() else torch.tensor(float("inf"), device=x.device)
    return Choice(Kept(rows, features, values[order] if full else None), smallest, aux_kept)


def _values(module: Dictionary, x: Tensor, kept: Kept) -> Tensor:
    """The kept entries' features (n,), differentiable in W_enc, b_enc and b_dec."""
    b_dec = module.b_dec if module.pre_encoder_bias else None
    return torch.relu(gathered_pre_activations(x, module.W_enc, module.b_enc, b_dec, kept.rows, kept.features,
                                               kept.known))


def sparse_topk_loss(module: Dictionary, x: Tensor, recipe: Recipe, dead: Tensor, y: Tensor) -> LossOutput:
    """TopK / BatchTopK (with AuxK) whose decode and backward touch the kept features only: a LossOutput without
    dense features (its `code` holds them)."""
    p = recipe.penalty
    aux_k = None if p.aux_k is None else p.aux_k if isinstance(p.aux_k, int) else x.shape[-1] // 2
    choice = choose(module, x, recipe, dead, aux_k)                             # no graph
    kept, b = choice.kept, x.shape[0]
    values = _values(module, x, kept)                                          # (n,)
    x_hat = decode_code(module.W_dec, module.b_dec, kept.rows, kept.features, values, b)   # (B, d_out)
    if module.W_skip is not None:  # a skip-transcoder's skip term, dense (d_in x d_out, no F)
        x_hat = x_hat + x @ module.W_skip
    mse = reconstruction_loss(y, x_hat, recipe.mse)
    terms, loss = {}, mse
    if aux_k is not None:  # Gao et al. 2024 AuxK, as losses.auxk_loss, through the dead features' code
        terms["auxk"] = _auxk(module, x, choice.aux, y - x_hat)
        loss = loss + p.aux_coefficient * terms["auxk"]
    terms.update(mse=mse, sparsity=x_hat.new_zeros(()))
    return LossOutput(loss, x_hat, None, terms, None, choice.smallest, (kept.rows, kept.features, values.detach()))


def _auxk(module: Dictionary, x: Tensor, aux: Kept | None, residual: Tensor) -> Tensor:
    """`auxk_loss` through the dead picks' code: e_hat decoded by an embedding bag; 0 when nothing is dead."""
    if aux is None:
        return residual.new_zeros(())
    values = _values(module, x, aux)
    e_hat = decode_code(module.W_dec, torch.zeros_like(module.b_dec), aux.rows, aux.features, values, x.shape[0])
    e = residual.detach()
    return (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(1e-12)
