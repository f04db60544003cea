"""Training losses: reconstruction, sparsity penalties and each architecture's training-time forward.

Shapes: x (B, d) activations, pre (B, F) encoder pre-activations, f (B, F) features, W_dec (F, d).
`compute_loss` is the one entry point the trainer calls; it dispatches on the recipe's architecture and
returns the total loss with its named parts. Papers: Bricken et al. 2023 (L1), Anthropic Feb 2024 (tanh,
decoder-norm weighting, ghost grads from the Jan 2024 update), Farrell 2024 (approximate L0 + minimum
density), Gao et al. 2024 (TopK, AuxK), Bussmann et al. 2024 (BatchTopK), Rajamanoharan et al. 2024a
(Gated) and 2024b (JumpReLU).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dictionaries.architectures import Dictionary
from dictionaries.recipe import Recipe
from training import feature_blocks
from training.loss_result import LossContext, LossOutput, reconstruction_loss
from training.sparse_topk import sparse_topk_loss


# ---- reconstruction and penalties -------------------------------------------------------------------
def l1_penalty(f: Tensor, decoder_norms: Tensor | None = None) -> Tensor:
    """Mean over tokens of sum_i |f_i| (times ||W_dec,i|| when given, Anthropic 2024).

    Every architecture's features are >= 0 (ReLU'd), so |f| = f: no abs pass over the (B, F) features.
    """
    if decoder_norms is None:
        return f.sum() / f.shape[0]
    return (f @ decoder_norms).mean()


class _ReluL1Decode(torch.autograd.Function):
    """ReLU, its L1 penalty and the decoder, fused: pre (B, F), weights (F,) or None, W_dec (F, d), b_dec (d,) ->
    f = ReLU(pre) (B, F), penalty = sum_bi w_i f_bi / B (w: decoder norms, or 1), x_hat = f @ W_dec + b_dec (B, d).

    The backward makes the (B, F) gradient once, in pre's own dtype: grad_pre = (grad_x_hat @ W_dec^T + g w / B)
    where f > 0, the penalty's (F,) term added in place after the matmul and the mask applied in place. Built from
    ops, that gradient cost three (B, F) passes and two fresh (B, F) tensors after the matmul; under bf16 autocast
    the penalty's broadcast float32 term also promoted the whole gradient to float32 and back (issue 12). The path
    under autocast and off the CPU; on the CPU feature_blocks runs the same step in blocks of features."""

    @staticmethod
    def forward(ctx, pre: Tensor, weights: Tensor | None, W_dec: Tensor, b_dec: Tensor):
        f = torch.relu(pre)
        # (F,): summed in f's dtype (a bf16 sum accumulates in float32 inside; asking for a float32 result
        # instead converts all of f first, 3x slower), then widened
        per_feature = f.sum(0).to(torch.promote_types(pre.dtype, torch.float32))
        # elementwise, not @: under autocast a matmul would round this sum to bf16
        penalty = ((per_feature * weights.to(per_feature.dtype)).sum() if weights is not None
                   else per_feature.sum()) / f.shape[0]
        x_hat = torch.addmm(b_dec, f, W_dec)      # under autocast: at its precision, as a plain addmm would be
        ctx.save_for_backward(f, weights, per_feature, W_dec)
        ctx.mark_non_differentiable(f)            # f is read (metrics, firing), not differentiated through
        ctx.set_materialize_grads(False)          # else autograd fills a (B, F) zero gradient for f every step
        return f, penalty, x_hat

    @staticmethod
    def backward(ctx, _grad_f: None, grad_penalty: Tensor | None, grad_x_hat: Tensor | None):
        f, weights, per_feature, W_dec = ctx.saved_tensors
        dtype = f.dtype                                     # bf16 under autocast: the forward's matmul precision
        scale = (grad_penalty if grad_penalty is not None else per_feature.new_zeros(())) / f.shape[0]
        add = (scale * weights.to(scale.dtype)) if weights is not None else scale.expand(f.shape[1])   # (F,)
        if grad_x_hat is None:
            grad_pre = add.to(dtype).expand_as(f).clone()
        else:                                               # (B, d) @ (d, F), then the penalty's (F,) in place
            grad_pre = (grad_x_hat.to(dtype) @ W_dec.to(dtype).t()).add_(add.to(dtype))
        torch.ops.aten.threshold_backward.grad_input(grad_pre, f, 0, grad_input=grad_pre)   # 0 where f == 0
        grad_w = per_feature * scale if weights is not None and ctx.needs_input_grad[1] else None
        grad_W_dec = grad_b_dec = None
        if grad_x_hat is not None:
            grad_W_dec = f.t() @ grad_x_hat.to(dtype) if ctx.needs_input_grad[2] else None       # (F, d)
            grad_b_dec = grad_x_hat.sum(0) if ctx.needs_input_grad[3] else None                   # (d,)
        return grad_pre, None if grad_w is None else grad_w.to(weights.dtype), grad_W_dec, grad_b_dec


def relu_l1_decode(pre: Tensor, decoder_norms: Tensor | None, W_dec: Tensor, b_dec: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """(f, penalty, x_hat): ReLU(pre), l1_penalty(f, decoder_norms) and f @ W_dec + b_dec, with the one fused
    backward of `_ReluL1Decode`. f carries no gradient: the penalty and x_hat are its differentiable uses."""
    return _ReluL1Decode.apply(pre, decoder_norms, W_dec, b_dec)


def tanh_penalty(f: Tensor, a: float, b: float, decoder_norms: Tensor | None = None) -> Tensor:
    """Mean over tokens of sum_i (A/B) tanh(B f_i ||W_dec,i||) (Anthropic, Feb 2024)."""
    scaled = f if decoder_norms is None else f * decoder_norms
    return ((a / b) * torch.tanh(b * scaled)).sum(-1).mean()


def feature_density(f: Tensor, eps: float) -> Tensor:
    """Farrell 2024's differentiable density per feature, s_i = mean_b f_bi / (f_bi + eps): (F,)."""
    return (f / (f + eps)).mean(0)


def min_density_penalty(density: Tensor, floor: float) -> Tensor:
    """sum_i max(0, floor - density_i) / floor: each feature below the floor costs up to 1 (Farrell 2024)."""
    return (torch.relu(floor - density) / floor).sum()


# ---- JumpReLU straight-through estimators (Rajamanoharan et al. 2024b, section 4) --------------------
def _rectangle(z: Tensor, theta: Tensor, eps: float) -> Tensor:
    """The rectangle kernel K((z - theta) / eps) = 1 where |z - theta| < eps / 2, else 0."""
    return ((z - theta).abs() < eps / 2).to(z.dtype)


class _JumpReLU(torch.autograd.Function):
    """z * H(z - theta); d/dz = H(z - theta), d/dtheta = -(theta / eps) K((z - theta) / eps)."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = (_rectangle(z, theta, eps) * grad).sum(0) * (-theta / eps)
        return (z > theta) * grad, grad_theta, None


class _Step(torch.autograd.Function):
    """H(z - theta); d/dz = 0, d/dtheta = -(1 / eps) K((z - theta) / eps)."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = (_rectangle(z, theta, eps) * grad).sum(0) * (-1.0 / eps)
        return None, grad_theta, None  # no gradient to z: the L0 term only trains the threshold


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """JumpReLU features (B, F) with straight-through gradients for the threshold (F,)."""
    return _JumpReLU.apply(pre, threshold, bandwidth)


def l0_penalty(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Mean over tokens of the number of features above threshold, differentiable in the threshold."""
    return _Step.apply(pre, threshold, bandwidth).sum(-1).mean()


# ---- TopK, BatchTopK and AuxK ------------------------------------------------------------------------
def topk_features(pre: Tensor, k: int) -> Tensor:
    """Keep each token's k largest pre-activations, ReLU'd (Gao et al. 2024): (B, F)."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))


def batchtopk_features(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Keep the k * B largest ReLU'd pre-activations over the whole batch (Bussmann et al. 2024).

    Returns the features (B, F) and the smallest positive kept activation (a scalar, inf if none), whose
    running average becomes the inference threshold.
    """
    act = torch.relu(pre)
    flat = act.flatten()
    values, indices = flat.topk(min(k * pre.shape[0], flat.numel()), sorted=False)
    f = torch.zeros_like(flat).scatter(0, indices, values).view_as(pre)
    positive = values.detach()[values.detach() > 0]
    smallest = positive.min() if positive.numel() else torch.tensor(float("inf"), device=pre.device)
    return f, smallest


def auxk_loss(pre: Tensor, residual: Tensor, dead: Tensor, aux_k: int, W_dec: Tensor) -> Tensor:
    """Gao et al. 2024 AuxK: reconstruct the error e = x - x_hat from the top aux_k dead features.

    Normalised by the error's variance, sum ||e - e_hat||^2 / sum ||e - mean(e)||^2, so its scale does not
    depend on the activations'. Zero when nothing is dead.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    masked = pre.masked_fill(~dead, float("-inf"))
    values, indices = masked.topk(min(aux_k, n_dead), dim=-1, sorted=False)
    e_hat = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values)) @ W_dec
    e = residual.detach()
    return (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(1e-12)


def ghost_grads_loss(pre: Tensor, residual: Tensor, dead: Tensor, W_dec: Tensor, mse: Tensor) -> Tensor:
    """Anthropic's ghost grads (Circuits Updates, Jan 2024): dead features, with exp() activations, fit the error.

    Their reconstruction is rescaled to half the error's norm, and the loss to the size of the MSE, so only
    its gradient (which reaches dead features alone) matters.
    """
    if not bool(dead.any()):
        return pre.new_zeros(())
    e = residual.detach()
    ghost = torch.exp(pre[:, dead]) @ W_dec[dead]                        # (B, d)
    scale = e.norm(dim=-1, keepdim=True) / (2 * ghost.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    ghost_mse = (ghost * scale.detach() - e).pow(2).mean()
    return ghost_mse * (mse.detach() / ghost_mse.detach().clamp_min(1e-12))


# ---- the training forward of each architecture --------------------------------------------------------
def _project(module: Dictionary, x: Tensor, bias: Tensor | None) -> Tensor:
    """(x - b_dec) @ W_enc + bias, (B, F), as one addmm (the bias inside the matmul, not in extra passes over the
    result); b_dec's gradient through the encoder by a vector product (feature_blocks.encoder_operands)."""
    xc, bias = feature_blocks.encoder_operands(module, x, bias)
    return torch.addmm(bias, xc, module.W_enc)


def _decode(module: Dictionary, f: Tensor, x: Tensor | None = None) -> Tensor:
    """f @ W_dec + b_dec, (B, d_out), as one addmm; plus x @ W_skip for a skip-transcoder."""
    out = torch.addmm(module.b_dec, f, module.W_dec)
    return out if module.W_skip is None or x is None else out + x @ module.W_skip


def windowed_density(s: Tensor, past: Tensor | None, count: int) -> Tensor:
    """Farrell 2024's density for the minimum-density term: (F,) with the value of the window's mean density
    (past + s) / (count + 1) and the gradient of this batch's s alone (straight-through).

    "We can then use this more accurate value of the sparsity in the RELU function, but with the gradients from
    the original expression" (seed 001): so the gradient does not shrink as 1 / (count + 1) while the window fills.
    """
    window = s.detach() if past is None else (past + s.detach()) / (count + 1)
    return s + (window - s).detach()


def _sparsity(recipe: Recipe, module: Dictionary, f: Tensor, ctx: LossContext, out: dict) -> Tensor:
    """The relu architecture's penalty term (L1, tanh or approximate L0 with its density term)."""
    p = recipe.penalty
    coefficient = p.coefficient * ctx.sparsity_scale
    if "l1" in out:  # computed with the features (relu_l1_decode)
        return coefficient * out["l1"]
    norms = module.W_dec.norm(dim=-1) if p.scale_by_decoder_norm else None
    if p.kind == "l1":
        return coefficient * l1_penalty(f, norms)
    if p.kind == "tanh":
        return coefficient * tanh_penalty(f, p.tanh_a, p.tanh_b, norms)
    s = feature_density(f, p.l0_eps)                                      # approx_l0, (F,)
    out["density"] = s.detach()
    total = coefficient * s.sum()
    if p.density_coefficient > 0:
        windowed = windowed_density(s, ctx.density_sum, ctx.density_count)  # (F,)
        out["terms"]["density_penalty"] = min_density_penalty(windowed, p.density_floor)
        total = total + p.density_coefficient * out["terms"]["density_penalty"]
    return total


def compute_loss(module: Dictionary, x: Tensor, recipe: Recipe, ctx: LossContext,
                 target: Tensor | None = None, *, sparse: bool = True, blocked: bool = True) -> LossOutput:
    """One training forward of `module` on x (B, d) under `recipe`: loss, reconstruction, features, parts.

    A transcoder predicts `target` (B, d_out) instead of reconstructing x: the loss is MSE(prediction, target)
    plus the same sparsity terms (Dunefsky et al. 2024; Paulo et al. 2025 add the skip term x W_skip).
    `sparse`: TopK and BatchTopK decode, and take their gradients, through the kept features only
    (training/sparse_topk.py); False runs the dense (B, F) products (the reference, and every other kind).
    `blocked`: ReLU-L1 and JumpReLU-L0 on the CPU run a block of features at a time (training/feature_blocks.py);
    False runs the whole (B, F) products (the reference)."""
    y = x if target is None else target
    if recipe.architecture == "gated":
        return _gated_loss(module, x, recipe, ctx, y)
    if sparse and recipe.architecture in ("topk", "batchtopk"):
        return sparse_topk_loss(module, x, recipe, ctx.dead, y)
    if blocked and feature_blocks.applies(recipe, x):
        return feature_blocks.blocked_loss(module, x, recipe, ctx.sparsity_scale, y)
    pre = _project(module, x, module.b_enc)                               # (B, F)
    extra: dict = {"terms": {}}
    arch, p = recipe.architecture, recipe.penalty
    x_hat = None
    if arch == "relu" and p.kind == "l1":  # ReLU, its L1 and the decoder with one backward pass (bf16 stays bf16)
        norms = module.W_dec.norm(dim=-1) if p.scale_by_decoder_norm else None
        f, extra["l1"], x_hat = relu_l1_decode(pre, norms, module.W_dec, module.b_dec)
        if module.W_skip is not None:
            x_hat = x_hat + x @ module.W_skip
    elif arch == "relu":
        f = torch.relu(pre)
    elif arch == "topk":
        f = topk_features(pre, recipe.k)
    elif arch == "batchtopk":
        f, extra["smallest_kept"] = batchtopk_features(pre, recipe.k)
    else:  # jumprelu
        f = jumprelu(pre, module.threshold, p.bandwidth)
    x_hat = _decode(module, f, x) if x_hat is None else x_hat
    mse = reconstruction_loss(y, x_hat, recipe.mse)
    terms = extra["terms"]
    if arch == "relu":
        sparsity = _sparsity(recipe, module, f, ctx, extra)
    elif arch == "jumprelu":
        sparsity = p.coefficient * ctx.sparsity_scale * l0_penalty(pre, module.threshold, p.bandwidth)
    else:
        sparsity = pre.new_zeros(())
    loss = mse + sparsity
    if p.aux_k is not None:  # half_d_in: d_in // 2, as dictionary_learning's TopK trainers (Gao et al. 2024, B.1)
        aux_k = p.aux_k if isinstance(p.aux_k, int) else x.shape[-1] // 2
        terms["auxk"] = auxk_loss(pre, y - x_hat, ctx.dead, aux_k, module.W_dec)
        loss = loss + p.aux_coefficient * terms["auxk"]
    if recipe.resampling.kind == "ghost_grads":
        terms["ghost"] = ghost_grads_loss(pre, y - x_hat, ctx.dead, module.W_dec, mse)
        loss = loss + terms["ghost"]
    terms.update(mse=mse, sparsity=sparsity)
    return LossOutput(loss, x_hat, f, terms, extra.get("density"), extra.get("smallest_kept"))


def _gated_loss(module: Dictionary, x: Tensor, recipe: Recipe, ctx: LossContext, y: Tensor) -> LossOutput:
    """Rajamanoharan et al. 2024a, eq. 8: MSE + lambda ||ReLU(pi_gate)||_1 + MSE of ReLU(pi_gate) decoded frozen."""
    projected = _project(module, x, None)                                 # (B, F), shared by gate and magnitude
    pi_gate = projected + module.b_enc
    magnitude = torch.relu(projected * torch.exp(module.r_mag) + module.b_mag)
    f = (pi_gate > 0) * magnitude
    x_hat = _decode(module, f, x)
    mse = reconstruction_loss(y, x_hat, recipe.mse)
    gate = torch.relu(pi_gate)
    norms = module.W_dec.norm(dim=-1) if recipe.penalty.scale_by_decoder_norm else None
    sparsity = recipe.penalty.coefficient * ctx.sparsity_scale * l1_penalty(gate, norms)
    frozen = gate @ module.W_dec.detach() + module.b_dec.detach()
    if module.W_skip is not None:  # a skip-transcoder's gate path predicts what the skip term leaves
        frozen = frozen + x @ module.W_skip.detach()
    aux = reconstruction_loss(y, frozen, recipe.mse)
    terms = {"mse": mse, "sparsity": sparsity, "gated_aux": aux}
    return LossOutput(mse + sparsity + aux, x_hat, f, terms)
