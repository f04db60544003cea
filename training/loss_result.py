"""What a training loss returns (`LossOutput`), what it reads of the trainer's running state (`LossContext`), and
the reconstruction error every loss shares: the parts training/losses.py and training/sparse_topk.py have in common.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["LossContext", "LossOutput", "reconstruction_loss"]


def reconstruction_loss(x: Tensor, x_hat: Tensor, mode: str) -> Tensor:
    """MSE averaged over all elements (`mean`, Bricken 2023), summed over d and averaged over tokens (`sum_dims`,
    Anthropic 2024), or divided by the batch's variance, sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (`normalized`).

    `normalized` is Gao et al. 2024's normalised MSE (their reference train.py scales the MSE by one over the
    data's variance), so that a term next to it, such as AuxK, weighs the same whatever the activations' scale.
    """
    err = (x - x_hat).pow(2)
    if mode == "normalized":
        return err.sum() / (x - x.mean(0)).detach().pow(2).sum().clamp_min(1e-12)
    return err.mean() if mode == "mean" else err.sum(-1).mean()


@dataclass
class LossContext:
    """What the losses need from the trainer's running state."""

    dead: Tensor
    """(F,) bool: features counted dead by the recipe's rule (for AuxK and ghost grads)."""
    density_sum: Tensor | None = None
    """(F,) sum of the detached densities of the previous steps in the window (Farrell 2024), or None."""
    density_count: int = 0
    """How many previous steps `density_sum` holds."""
    sparsity_scale: float = 1.0
    """Factor on the penalty coefficient: the warm-up's position (penalty.warmup_steps), 1 once warmed up."""


@dataclass
class LossOutput:
    """The total loss and what the trainer logs or keeps from it."""

    loss: Tensor
    """Scalar to minimise."""
    x_hat: Tensor
    """(B, d) reconstruction."""
    features: Tensor | None
    """(B, F) features; None on the sparse TopK path, whose `code` holds them."""
    terms: dict[str, Tensor] = field(default_factory=dict)
    """Named parts of the loss (for metrics)."""
    density: Tensor | None = None
    """(F,) this batch's differentiable density, detached (approx_l0), for the density window."""
    smallest_kept: Tensor | None = None
    """batchtopk: smallest positive activation kept in this batch."""
    code: tuple[Tensor, Tensor, Tensor] | None = None
    """Sparse decoding: the kept entries as (rows, features, values), each (n,), values detached."""
