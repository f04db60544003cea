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


ENTRIES_PER_BLOCK_ELEMENTS = 1 << 22
"""The gathered (n, d) blocks of a code's entries are made this many elements at a time (16 MiB in float32):
TopK's 32 kept of 32768 features on 1024 tokens gather 32768 rows, AuxK's 256 picks a token 262144 (1 GiB at
d = 512 if gathered whole), where the dense path's (B, F) is 128 MiB."""


TRANSPOSED_BLOCK_ELEMENTS = 1 << 17
"""W_enc's gradient is written from (features, d) blocks of this many elements (512 KiB in float32, within a
core's L2): transposing 4 blocks of 8192 x 512 into W_enc's (d, F) layout took 52 ms, 128 blocks of 256 x 512
26 ms (AVX2 EPYC, d 512, F 32768)."""


def _blocks(n: int, d: int):
    """(start, stop) of consecutive entry blocks of at most ENTRIES_PER_BLOCK_ELEMENTS / d entries."""
    size = max(1, ENTRIES_PER_BLOCK_ELEMENTS // max(d, 1))
    return ((start, min(start + size, n)) for start in range(0, n, size))


class _DecodeRows(torch.autograd.Function):
    """x (n_rows, d) = sum_j values[j] W_dec[features[j]] into row rows[j]; the backward touches the n active rows
    of W_dec only: dW_dec[features] += values * g[rows] (index-add), dvalues = <W_dec[features], g[rows]>, in
    blocks of entries (`_blocks`) so that no (n, d) gather is whole."""

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
        want_w, want_v = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        grad_w = torch.zeros_like(W_dec) if want_w else None
        grad_v = values.new_empty(values.shape) if want_v else None
        for start, stop in _blocks(rows.numel(), W_dec.shape[1]):
            g = grad.index_select(0, rows[start:stop])                          # (block, d)
            feats = features[start:stop]
            if want_w:
                grad_w.index_add_(0, feats, g * values[start:stop].to(g.dtype)[:, None])
            if want_v:
                grad_v[start:stop] = (W_dec.index_select(0, feats).to(g.dtype) * g).sum(-1).to(values.dtype)
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
    """(n,) kept pre-activations (x - b_dec)[rows] . W_enc[:, features] + b_enc[features] (no b_dec for a
    dictionary without the pre-encoder bias). W_enc's gradient accumulates as rows of its transpose, dW_enc^T
    [features] += g (x - b_dec)[rows] (each entry adds one contiguous d-vector; index-adding columns of the
    (d, F) layout touches d cache lines an entry, and took twice as long), a block of features at a time
    (`_encoder_gradient`); b_dec's is -W_enc g_F with g_F (F,) the entries' gradients summed per feature: one
    matrix-vector product, where b_dec's path through a bias b_enc - b_dec @ W_enc added a (d, F) outer product
    into W_enc's gradient.

    `known`: the same values already computed without a graph, returned as they are, so the forward gathers
    nothing. Otherwise the kept columns are gathered as (d, block) blocks (each of the d rows gathers from one
    contiguous row of F). Entries go in blocks (`_blocks`), and nothing of size (d, n) is saved: two (d, n)
    copies kept from the forward were 128 MiB for TopK at k = 32, F = 32768, 1024 tokens, 1 GiB for its AuxK."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, rows: Tensor,
                features: Tensor, known: Tensor | None) -> Tensor:
        shifted = x - b_dec if b_dec is not None else x                         # (B, d)
        ctx.save_for_backward(shifted, W_enc, rows, features)
        if known is not None:
            return known.clone()
        x_t = shifted.t().contiguous()                                          # (d, B)
        out = x.new_empty(rows.shape, dtype=torch.promote_types(x.dtype, W_enc.dtype))
        for start, stop in _blocks(rows.numel(), x_t.shape[0]):
            x_cols = x_t.index_select(1, rows[start:stop])                      # (d, block)
            out[start:stop] = (x_cols * W_enc.index_select(1, features[start:stop])).sum(0)
        return out + b_enc[features]

    @staticmethod
    def backward(ctx, grad: Tensor):
        shifted, W_enc, rows, features = ctx.saved_tensors
        want_x, want_w, want_b_enc, want_b_dec = ctx.needs_input_grad[:4]
        grad_x = grad_w = grad_b_enc = grad_b_dec = None
        if want_x or want_b_dec:
            per_feature = grad.new_zeros(W_enc.shape[1]).index_add_(0, features, grad)   # (F,)
            grad_b_dec = -(W_enc @ per_feature.to(W_enc.dtype)) if want_b_dec else None  # (d,)
        if want_x:
            grad_x = shifted.new_zeros(shifted.shape)                             # (B, d)
            for start, stop in _blocks(rows.numel(), shifted.shape[1]):
                g = grad[start:stop, None].to(shifted.dtype)
                grad_x.index_add_(0, rows[start:stop], W_enc.index_select(1, features[start:stop]).t() * g)
        if want_w:
            grad_w = _encoder_gradient(shifted, W_enc.shape, rows, features, grad)
        if want_b_enc:
            grad_b_enc = grad.new_zeros(W_enc.shape[1]).index_add_(0, features, grad)
        return grad_x, grad_w, grad_b_enc, grad_b_dec, None, None, None


def _encoder_gradient(x: Tensor, shape: torch.Size, rows: Tensor, features: Tensor, grad: Tensor) -> Tensor:
    """dW_enc (d, F): for each block of features, the entries of those features (sorted by feature) add
    g x[row] into rows of a (block, d) transposed buffer, written into W_enc's columns at once. A whole (F, d)
    transposed gradient would be a second (d, F)-sized tensor beside the one autograd keeps."""
    d, n_features = shape
    order = features.argsort()
    rows, features, grad = rows[order], features[order], grad[order].to(x.dtype)
    width = max(1, TRANSPOSED_BLOCK_ELEMENTS // d)                               # features per block
    starts = list(range(0, n_features, width))
    bounds = torch.searchsorted(features, torch.tensor([*starts, n_features], device=features.device)).tolist()
    grad_w = x.new_empty(shape)
    for j, first in enumerate(starts):
        block = x.new_zeros(min(width, n_features - first), d)                 # (block, d): rows of dW_enc^T
        for start, stop in _blocks(bounds[j + 1] - bounds[j], d):
            span = slice(start + bounds[j], stop + bounds[j])
            block.index_add_(0, features[span] - first, x.index_select(0, rows[span]) * grad[span, None])
        grad_w[:, first:first + block.shape[0]] = block.t()
    return grad_w


def gathered_pre_activations(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, rows: Tensor,
                             features: Tensor, known: Tensor | None = None) -> Tensor:
    """(n,) pre-activations (x - b_dec)[rows] . W_enc[:, features] + b_enc[features], differentiable in all four,
    for the kept entries only: W_enc's gradient is an index-add of n rows of its transpose instead of the dense
    (d, B) @ (B, F) matmul. `b_dec` None: no pre-encoder bias. `known` (n,): these values already computed
    without a graph at full precision (TopK's choosing product): returned exactly, with the same gradients."""
    return _GatherDot.apply(x, W_enc, b_enc, b_dec, rows, features, known)


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
