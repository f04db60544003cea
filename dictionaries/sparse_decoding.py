"""Decoding through the active features only, for dictionaries whose features are mostly zero (TopK and
BatchTopK by construction, Gao et al. 2024 and Bussmann et al. 2024; any other kind where few fire).

x_hat = b_dec + sum over the active (row, feature) pairs of f W_dec[feature]: an embedding bag over W_dec's
rows weighted by the feature values, B * k * d multiply-adds where the dense f @ W_dec costs B * F * d.
The encoder side for training, `gathered_pre_activations`, gives the kept pre-activations as differentiable
dot products, so W_enc's gradient reaches the k columns per token by an index-add instead of the dense
(d, B) @ (B, F) product. Gao et al. 2024 (appendix D) describe the same kernels for their TopK training.

Shapes: a "code" is (rows (n,), features (n,), values (n,)), rows ascending: token r's active features.
"""

from __future__ import annotations

import torch
from torch import Tensor


def topk_code(indices: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, features), each (B * k,), of per-token indices (B, k): row b repeated k times."""
    b, k = indices.shape
    return torch.arange(b, device=indices.device).repeat_interleave(k), indices.reshape(-1)


def flat_code(flat_indices: Tensor, d_dict: int) -> tuple[Tensor, Tensor]:
    """(rows, features) of indices into a flattened (B, F) array, sorted by row (BatchTopK's selection)."""
    flat = flat_indices.sort().values
    return flat // d_dict, flat % d_dict


class _DecodeRows(torch.autograd.Function):
    """x (n_rows, d) = sum_j values[j] W_dec[features[j]] into row rows[j]; the backward touches the n active rows
    of W_dec only: dW_dec[features] += values * g[rows] (index-add), dvalues = <W_dec[features], g[rows]>."""

    @staticmethod
    def forward(ctx, W_dec: Tensor, rows: Tensor, features: Tensor, values: Tensor, n_rows: int) -> Tensor:
        counts = torch.bincount(rows, minlength=n_rows)
        offsets = counts.cumsum(0) - counts                                     # (n_rows,): bag starts
        ctx.save_for_backward(W_dec, rows, features, values)
        return torch.nn.functional.embedding_bag(features, W_dec, offsets, mode="sum",
                                                 per_sample_weights=values.to(W_dec.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        W_dec, rows, features, values = ctx.saved_tensors
        g = grad.index_select(0, rows)                                          # (n, d)
        grad_w = grad_v = None
        if ctx.needs_input_grad[0]:
            grad_w = torch.zeros_like(W_dec).index_add_(0, features, g * values.to(g.dtype)[:, None])
        if ctx.needs_input_grad[3]:
            grad_v = (W_dec.index_select(0, features).to(g.dtype) * g).sum(-1).to(values.dtype)
        return grad_w, None, None, grad_v, None


def decode_code(W_dec: Tensor, b_dec: Tensor, rows: Tensor, features: Tensor, values: Tensor, n_rows: int) -> Tensor:
    """x_hat (n_rows, d) = b_dec + the active features' values times their decoder rows; differentiable in
    W_dec, b_dec and values, equal to the dense f @ W_dec + b_dec for the f the code describes."""
    return _DecodeRows.apply(W_dec, rows, features, values, n_rows) + b_dec


def decode_dense(W_dec: Tensor, b_dec: Tensor, f: Tensor) -> Tensor:
    """x_hat (..., d) of features f (..., F) through their nonzero entries only (no gradient to f's zeros:
    for inference; `Dictionary.decode` uses it when nothing needs a gradient)."""
    flat = f.reshape(-1, f.shape[-1])
    rows, features = flat.nonzero(as_tuple=True)                               # row-major: rows ascending
    x = decode_code(W_dec, b_dec, rows, features, flat[rows, features], flat.shape[0])
    return x.view(*f.shape[:-1], W_dec.shape[1])


class _GatherDot(torch.autograd.Function):
    """(n,) dots x[rows] . W_enc[:, features], kept in W_enc's (d, F) layout: the kept columns gathered as a
    (d, n) block (each of the d rows gathers from one contiguous row of F, cache-friendly where gathering W_enc^T's
    rows would stride by F), and W_enc's gradient index-added back into its columns."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, rows: Tensor, features: Tensor) -> Tensor:
        x_cols = x.t().contiguous().index_select(1, rows)                       # (d, n)
        w_cols = W_enc.index_select(1, features)                                # (d, n)
        ctx.save_for_backward(x_cols, w_cols, rows, features)
        ctx.batch, ctx.width = x.shape[0], W_enc.shape[1]
        return (x_cols * w_cols).sum(0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_cols, w_cols, rows, features = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = w_cols.new_zeros(w_cols.shape[0], ctx.batch).index_add_(1, rows, w_cols * grad).t()
        if ctx.needs_input_grad[1]:
            grad_w = x_cols.new_zeros(x_cols.shape[0], ctx.width).index_add_(1, features, x_cols * grad)
        return grad_x, grad_w, None, None


def gathered_pre_activations(x: Tensor, W_enc: Tensor, bias: Tensor, rows: Tensor, features: Tensor) -> Tensor:
    """(n,) pre-activations x[rows] . W_enc[:, features] + bias[features], differentiable, for the kept
    entries only: W_enc's gradient is an index-add of n columns instead of a (d, B) @ (B, F) matmul."""
    return _GatherDot.apply(x, W_enc, rows, features) + bias[features]
