"""The dense kinds' training steps on the CPU one block of features at a time: ReLU with L1, and JumpReLU with L0.

Forward and backward of (x - b_dec) @ W_enc + b_enc -> the nonlinearity -> the penalty and f @ W_dec + b_dec as
one autograd function that walks the F features in blocks of BLOCK_FEATURES: each block's encoder GEMM writes
its columns of a (B, F) tensor directly, and its nonlinearity, its penalty's sums and its share of the decoder
product run while those 4 MiB are still in cache; the backward makes each block's (B, width) gradient, masks
it and spends it on W_enc's, the bias's and W_dec's gradient blocks (and JumpReLU's threshold's) before the
next. Against the whole-(B, F) path no (B, F) gradient exists, and for ReLU no pre-activation either, so fewer
fresh 32 MiB mappings fault in per step (glibc maps allocations above 32 MiB anew and the kernel zeroes them),
and the GEMMs run faster at this width: at B 1024, d 512, F 8192 on this project's 2-core AVX2 CPU the encoder
GEMM took 54 ms in blocks of 1024 against 68 ms whole, the three backward GEMMs 160 ms against 189 ms.

Used where it pays and is exact: on the CPU, outside autocast (out= GEMMs take no autocast); for ReLU with the
L1 penalty and JumpReLU with L0, without AuxK or ghost grads (both read the whole pre-activations). Same loss
and gradients as the whole path (tests/test_feature_blocks.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dictionaries.architectures import Dictionary
from dictionaries.recipe import Recipe
from training.loss_result import LossOutput, reconstruction_loss

BLOCK_FEATURES = 1024
"""Features per block: a (1024, 1024) fp32 block of f is 4 MiB, and W_enc's block (512, 1024) 2 MiB."""


def _blocks(n_features: int):
    """Slices of [0, n_features) BLOCK_FEATURES wide (the last one shorter)."""
    return [slice(a, min(a + BLOCK_FEATURES, n_features)) for a in range(0, n_features, BLOCK_FEATURES)]


class _ReluL1Blocks(torch.autograd.Function):
    """(xc, W_enc, bias, weights, W_dec, b_dec) -> (f, penalty, x_hat): f = ReLU(xc @ W_enc + bias) (B, F),
    penalty = sum_bi w_i f_bi / B (w: weights (F,), or 1), x_hat = f @ W_dec + b_dec (B, d). xc (B, d) takes no
    gradient (the caller detaches x - b_dec and routes b_dec's encoder-side gradient through `bias`)."""

    @staticmethod
    def forward(ctx, xc: Tensor, W_enc: Tensor, bias: Tensor, weights: Tensor | None, W_dec: Tensor,
                b_dec: Tensor):
        n, n_features = xc.shape[0], W_enc.shape[1]
        f = xc.new_empty(n, n_features)                                   # the one (B, F) tensor
        per_feature = xc.new_empty(n_features)                             # (F,) sums of f over the batch
        x_hat = b_dec.expand(n, -1).clone()                                # (B, d)
        for cols in _blocks(n_features):
            block = f[:, cols]                                             # (B, width), a strided view
            torch.addmm(bias[cols], xc, W_enc[:, cols], out=block)
            block.relu_()
            torch.sum(block, 0, out=per_feature[cols])
            x_hat.addmm_(block, W_dec[cols])
        penalty = ((per_feature * weights).sum() if weights is not None else per_feature.sum()) / n
        ctx.save_for_backward(f, xc, W_enc, weights, per_feature, W_dec)
        ctx.mark_non_differentiable(f)     # read (metrics, firing), differentiated through penalty and x_hat
        ctx.set_materialize_grads(False)   # else autograd fills a (B, F) zero gradient for f
        return f, penalty, x_hat

    @staticmethod
    def backward(ctx, _grad_f: None, grad_penalty: Tensor | None, grad_x_hat: Tensor | None):
        f, xc, W_enc, weights, per_feature, W_dec = ctx.saved_tensors
        n, n_features = f.shape
        scale = (grad_penalty if grad_penalty is not None else f.new_zeros(())) / n
        add = scale * weights if weights is not None else scale.expand(n_features)        # (F,): d penalty / d f
        need = ctx.needs_input_grad
        grad_W_enc = torch.empty_like(W_enc) if need[1] else None           # (d, F), written block by block
        grad_bias = f.new_empty(n_features) if need[2] else None
        grad_W_dec = torch.empty_like(W_dec) if need[4] and grad_x_hat is not None else None   # (F, d)
        for cols in _blocks(n_features):
            block = f[:, cols]
            if grad_x_hat is None:
                grad_pre = add[cols].expand_as(block).clone()
            else:                                                          # (B, d) @ (d, width)
                grad_pre = (grad_x_hat @ W_dec[cols].t()).add_(add[cols])
            torch.ops.aten.threshold_backward.grad_input(grad_pre, block, 0, grad_input=grad_pre)   # 0 where f == 0
            if grad_W_enc is not None:
                torch.mm(xc.t(), grad_pre, out=grad_W_enc[:, cols])
            if grad_bias is not None:
                torch.sum(grad_pre, 0, out=grad_bias[cols])
            if grad_W_dec is not None:
                torch.mm(block.t(), grad_x_hat, out=grad_W_dec[cols])
        grad_weights = per_feature * scale if weights is not None and need[3] else None
        grad_b_dec = grad_x_hat.sum(0) if grad_x_hat is not None and need[5] else None
        return None, grad_W_enc, grad_bias, grad_weights, grad_W_dec, grad_b_dec


class _JumpReluL0Blocks(torch.autograd.Function):
    """(xc, W_enc, bias, threshold, W_dec, b_dec, bandwidth) -> (f, l0, x_hat): z = xc @ W_enc + bias (B, F),
    f = z H(z - theta), l0 = sum_bi H(z_bi - theta_i) / B, x_hat = f @ W_dec + b_dec: losses.jumprelu and
    losses.l0_penalty with their straight-through threshold gradients (Rajamanoharan et al. 2024b, section 4),
    d f / d theta = -(theta / eps) K((z - theta) / eps) and d H / d theta = -(1 / eps) K, K the rectangle kernel;
    no gradient from the L0 term to z."""

    @staticmethod
    def forward(ctx, xc: Tensor, W_enc: Tensor, bias: Tensor, threshold: Tensor, W_dec: Tensor, b_dec: Tensor,
                bandwidth: float):
        n, n_features = xc.shape[0], W_enc.shape[1]
        z, f = xc.new_empty(n, n_features), xc.new_empty(n, n_features)   # both kept for the backward
        above = torch.zeros((), dtype=torch.long)
        x_hat = b_dec.expand(n, -1).clone()                                # (B, d)
        for cols in _blocks(n_features):
            block = z[:, cols]
            torch.addmm(bias[cols], xc, W_enc[:, cols], out=block)
            mask = block > threshold[cols]                                  # (B, width) bool
            torch.mul(block, mask, out=f[:, cols])
            above += mask.sum()
            x_hat.addmm_(f[:, cols], W_dec[cols])
        ctx.save_for_backward(z, f, xc, W_enc, threshold, W_dec)
        ctx.bandwidth = bandwidth
        ctx.mark_non_differentiable(f)
        ctx.set_materialize_grads(False)
        return f, above.to(z.dtype) / n, x_hat

    @staticmethod
    def backward(ctx, _grad_f: None, grad_l0: Tensor | None, grad_x_hat: Tensor | None):
        z, f, xc, W_enc, threshold, W_dec = ctx.saved_tensors
        n, n_features = z.shape
        eps, need = ctx.bandwidth, ctx.needs_input_grad
        grad_W_enc = torch.empty_like(W_enc) if need[1] else None
        grad_bias = z.new_empty(n_features) if need[2] else None
        grad_theta = torch.zeros_like(threshold) if need[3] else None
        grad_W_dec = torch.empty_like(W_dec) if need[4] and grad_x_hat is not None else None
        for cols in _blocks(n_features):
            block, theta = z[:, cols], threshold[cols]
            grad_f = grad_x_hat @ W_dec[cols].t() if grad_x_hat is not None else z.new_zeros(block.shape)
            if grad_theta is not None:
                kernel = ((block - theta).abs_() < eps / 2).to(z.dtype)           # (B, width), losses._rectangle
                grad_theta[cols] = (kernel * grad_f).sum(0) * (-theta / eps)
                if grad_l0 is not None:
                    grad_theta[cols] += kernel.sum(0) * (grad_l0 / n) * (-1.0 / eps)
            grad_f.mul_(block > theta)                                      # d f / d z = H(z - theta)
            if grad_W_enc is not None:
                torch.mm(xc.t(), grad_f, out=grad_W_enc[:, cols])
            if grad_bias is not None:
                torch.sum(grad_f, 0, out=grad_bias[cols])
            if grad_W_dec is not None:
                torch.mm(f[:, cols].t(), grad_x_hat, out=grad_W_dec[cols])
        grad_b_dec = grad_x_hat.sum(0) if grad_x_hat is not None and need[5] else None
        return None, grad_W_enc, grad_bias, grad_theta, grad_W_dec, grad_b_dec, None


def encoder_operands(module: Dictionary, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """(xc, bias') with xc @ W_enc + bias' = (x - b_dec) @ W_enc + bias (without the pre-encoder bias, x and bias),
    b_dec's encoder-side gradient routed through bias' by a vector product.

    xc = x - b_dec is taken without a graph, so W_enc's whole gradient, both terms, comes from the one (d, B) @
    (B, F) product of the backward; b_dec's, -W_enc @ sum_b grad, from a term of bias' whose value is zero
    (s - s.detach(), s = b_dec @ W_enc with W_enc detached). Built naively, b_dec's gradient would cost a further
    (B, F) x (F, d) matmul; built as bias - b_dec @ W_enc, a (d, F) outer product added into W_enc's gradient.
    """
    bias = bias if bias is not None else x.new_zeros(module.d_dict)
    if not module.pre_encoder_bias:
        return x, bias
    shift = module.b_dec @ module.W_enc.detach()                                         # (F,): b_dec's path
    return (x - module.b_dec).detach(), bias - (shift - shift.detach())


def applies(recipe: Recipe, x: Tensor) -> bool:
    """Whether `blocked_loss` computes this step: ReLU with the L1 penalty or JumpReLU with L0, no AuxK or ghost
    grads, on the CPU outside autocast (where one whole GEMM per product is as fast, or out= GEMMs would skip
    autocast)."""
    p, arch = recipe.penalty, recipe.architecture
    return ((arch == "relu" and p.kind == "l1" or arch == "jumprelu" and p.kind == "l0") and p.aux_k is None
            and recipe.resampling.kind != "ghost_grads" and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu"))


def blocked_loss(module: Dictionary, x: Tensor, recipe: Recipe, sparsity_scale: float, y: Tensor) -> LossOutput:
    """The recipe's loss on x (B, d) through `_ReluL1Blocks` or `_JumpReluL0Blocks`: MSE(y, x_hat) + coefficient *
    the penalty, with the same terms as losses.compute_loss (mse, sparsity) and features f (B, F)."""
    p = recipe.penalty
    xc, bias = encoder_operands(module, x, module.b_enc)
    if recipe.architecture == "jumprelu":
        f, penalty, x_hat = _JumpReluL0Blocks.apply(xc.detach(), module.W_enc, bias, module.threshold,
                                                    module.W_dec, module.b_dec, p.bandwidth)
    else:
        norms = module.W_dec.norm(dim=-1) if p.scale_by_decoder_norm else None
        f, penalty, x_hat = _ReluL1Blocks.apply(xc.detach(), module.W_enc, bias, norms, module.W_dec, module.b_dec)
    if module.W_skip is not None:  # a skip-transcoder's skip term
        x_hat = x_hat + x @ module.W_skip
    mse = reconstruction_loss(y, x_hat, recipe.mse)
    sparsity = p.coefficient * sparsity_scale * penalty
    return LossOutput(mse + sparsity, x_hat, f, {"mse": mse, "sparsity": sparsity})
