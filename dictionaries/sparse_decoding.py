"""Decoding through the active features only, for dictionaries whose features are mostly zero (TopK and
BatchTopK by construction, Gao et al. 2024 and Bussmann et al. 2024; any other kind where few fire).

x_hat = b_dec + sum over the active (row, feature) pairs of f W_dec[feature]: an embedding bag over W_dec's
rows weighted by the feature values, B * k * d multiply-adds where the dense f @ W_dec costs B * F * d.
The encoder side for training, `gathered_pre_activations`, gives the kept pre-activations as differentiable
dot products, so W_enc's gradient reaches the k columns per token by an index-add instead of the dense
(d, B) @ (B, F) product. Gao et al. 2024 (appendix D) describe the same kernels for their TopK training.

At inference (attach, eval) `encode_code` gives the active features of encode(x) without the dense (tokens, F)
features, block by block of tokens and features, and `reconstruct` decodes them.

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


# ---- whole dictionaries at inference (attach, eval): what the nnsight side calls -----------------------
ACTIVE_ROWS_DENSITY = 0.02
"""Below this fraction of non-zero features, decode gathers decoder rows instead of a dense matmul."""


def decode_mostly_zero(dictionary: torch.nn.Module, f: Tensor) -> Tensor:
    """dictionary.decode(f) for f (..., F); for sparse f, as a weighted sum of the active decoder rows.

    A trained dictionary has L0 in the tens to hundreds of 32768 features (under 1%), so summing only the
    active rows of W_dec (`embedding_bag`, O(L0 d) per token) is several times cheaper on CPU than the dense
    (F, d) matmul; above ACTIVE_ROWS_DENSITY the dense matmul wins.
    """
    flat = f.reshape(-1, f.shape[-1])                                          # (tokens, F)
    probe = flat[: max(1, flat.shape[0] // 16)]   # the density from a slice: a full count is one more pass
    if flat.numel() == 0 or int(torch.count_nonzero(probe)) > ACTIVE_ROWS_DENSITY * probe.numel():
        return dictionary.decode(f)
    nz = flat.nonzero()                                                        # (nnz, 2), row-major
    if nz.shape[0] > ACTIVE_ROWS_DENSITY * flat.numel():                     # the slice was not typical
        return dictionary.decode(f)
    counts = torch.bincount(nz[:, 0], minlength=flat.shape[0])
    offsets = counts.cumsum(0) - counts
    rows = torch.nn.functional.embedding_bag(nz[:, 1], dictionary.W_dec, offsets, mode="sum",
                                             per_sample_weights=flat[nz[:, 0], nz[:, 1]])  # (tokens, d)
    return (rows + dictionary.b_dec).reshape(*f.shape[:-1], -1)


ENCODE_BLOCK = (1024, 1024)
"""(tokens, features) of one block of `encode_code` on CPU: 4 MiB of fp32 pre-activations, cache-resident."""


def encode_code(dictionary: torch.nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The active features of dictionary.encode(x) for x (tokens, d) as a code (rows, features, values), rows
    ascending and features ascending within a row, without the dense (tokens, F) features.

    A columnwise architecture (each feature from its own pre-activation) encodes in blocks of ENCODE_BLOCK:
    each block's GEMM, nonlinearity and nonzero run on 4 MiB that stay in cache, where the dense encode writes
    a (1024, 32768) fp32 tensor (128 MiB of fresh pages from the system, first-touch faults included) and
    reads it back once per elementwise pass (bias, ReLU, threshold, nonzero, gather); row blocks alone would
    read W_enc (d x F, 64 MiB) from memory once per block. TopK (a token's k largest over all F) encodes
    row blocks densely.
    """
    x = x.to(dictionary.W_enc.device, dictionary.W_enc.dtype)
    xc = x - dictionary.b_dec if dictionary.pre_encoder_bias else x                # (tokens, d)
    step_rows, step_cols = ENCODE_BLOCK
    if not dictionary.columnwise:
        step_rows, step_cols = max(1, RECONSTRUCT_BLOCK_BYTES // (dictionary.d_dict * x.element_size())), None
    buffer = None if step_cols is None or torch.is_grad_enabled() else x.new_empty(step_rows * step_cols)
    rows, features, values = [], [], []
    for r0 in range(0, x.shape[0], step_rows):
        block_rows, block_features, block_values = [], [], []
        for c0 in range(0, dictionary.d_dict, step_cols or dictionary.d_dict):
            if step_cols is None:
                f = dictionary.encode(x[r0:r0 + step_rows])                              # (rows, F)
            else:
                xb, cols = xc[r0:r0 + step_rows], slice(c0, min(c0 + step_cols, dictionary.d_dict))
                out = None if buffer is None else buffer[:xb.shape[0] * (cols.stop - c0)].view(xb.shape[0], -1)
                f = dictionary.encode_columns(xb, cols, out)                             # (rows, cols)
            # a flat nonzero (a 1-d index, then // and %) is cheaper than the 2-d one on CPU
            flat = f.reshape(-1).nonzero().squeeze(1)                                     # row-major
            block_rows.append(flat // f.shape[1] + r0)
            block_features.append(flat % f.shape[1] + c0)
            block_values.append(f.reshape(-1)[flat])
        r, c, v = torch.cat(block_rows), torch.cat(block_features), torch.cat(block_values)
        if len(block_rows) > 1:  # column blocks: row-major within each, so a stable sort by row keeps c ascending
            order = r.argsort(stable=True)
            r, c, v = r[order], c[order], v[order]
        rows.append(r)
        features.append(c)
        values.append(v)
    return torch.cat(rows), torch.cat(features), torch.cat(values)


RECONSTRUCT_BLOCK_BYTES = 16 * 2**20
"""On CPU, TopK's rows of `encode_code` encode at most this many bytes of features at a time."""


def reconstruct(dictionary: torch.nn.Module, x: Tensor) -> Tensor:
    """decode(encode(x)) (..., d) for activations x (..., d), without the dense (tokens, F) features on CPU.

    On CPU through `encode_code` and the active decoder rows (`decode_code`). Accelerators (a caching
    allocator; a nonzero per block would synchronise with the host) encode densely in one go.
    """
    flat = x.reshape(-1, x.shape[-1]).to(dictionary.W_enc.device, dictionary.W_enc.dtype)   # (tokens, d)
    if flat.device.type != "cpu" or flat.shape[0] == 0:
        return decode_mostly_zero(dictionary, dictionary.encode(flat)).reshape(*x.shape[:-1], -1)
    rows, features, values = encode_code(dictionary, flat)
    out = decode_code(dictionary.W_dec, dictionary.b_dec, rows, features, values, flat.shape[0])
    return out.reshape(*x.shape[:-1], -1)


def encode_and_predict(dictionary: torch.nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """dictionary(x) for x (..., d): the prediction (..., d_out) (decode, plus x W_skip for a skip-transcoder)
    and the dense features f (..., F); on CPU without a gradient, encoded through `encode_code` (the dense f
    is then only written, once, from the code) and decoded through the active rows."""
    flat = x.reshape(-1, x.shape[-1])                                                # (tokens, d)
    if flat.device.type != "cpu" or flat.shape[0] == 0 or (
            torch.is_grad_enabled() and (x.requires_grad or dictionary.W_enc.requires_grad)):
        return tuple(dictionary(x))
    rows, features, values = encode_code(dictionary, flat)
    f = torch.zeros(flat.shape[0], dictionary.d_dict, dtype=values.dtype, device=values.device)
    f[rows, features] = values
    out = decode_code(dictionary.W_dec, dictionary.b_dec, rows, features, values, flat.shape[0])
    if dictionary.W_skip is not None:
        out = out + flat @ dictionary.W_skip
    return out.reshape(*x.shape[:-1], -1), f.reshape(*x.shape[:-1], -1)
