"""Resampling dead features (Bricken et al. 2023, "Towards Monosemanticity"), as each preset's source did it.

Which inputs are drawn (`resampling_weights`: the square of the loss, as the paper says, or its square root, as
seed 004's notes and dictionary_learning do) and how the dead features are re-initialised from them
(`resample_features`). When to resample is the trainer's bookkeeping (training/trainer.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dictionaries.architectures import Dictionary
from dictionaries.recipe import Resampling


def resampling_weights(m: Dictionary, inputs: Tensor, weighting: str) -> Tensor:
    """(n,) unnormalised probabilities of drawing each input (n, d): its loss ||x - x_hat||^2 squared
    (squared_loss, Bricken et al. 2023: "proportional to the square of the autoencoder's loss") or its
    square root ||x - x_hat|| (sqrt_loss: seed 004's notes; dictionary_learning's resampler)."""
    losses = torch.cat([(chunk - m(chunk).reconstruction).pow(2).sum(-1) for chunk in inputs.split(8192)])
    losses = losses.double().cpu()
    weights = losses.square() if weighting == "squared_loss" else losses.sqrt()
    return weights.clamp_min(1e-30)  # an input reconstructed exactly can still be drawn, if all are


@torch.no_grad()
def resample_features(m: Dictionary, optimizer: torch.optim.Optimizer, dead: Tensor, inputs: Tensor,
                      rs: Resampling, rng: torch.Generator) -> None:
    """Re-initialise the `dead` (F,) features from `inputs` (n, d), already scaled (Bricken et al. 2023).

    Inputs are drawn by `resampling_weights`; the decoder row becomes the normalised input, the encoder
    bias 0, and the encoder column (encoder_init) either the normalised input times encoder_scale times
    the mean alive encoder norm (input, Bricken) or encoder_scale times the mean alive encoder column,
    the same for every dead feature (mean_alive, dictionary_learning's training.py of Nov 2023 - Feb 2024,
    which trained the 0_8192 and 1_32768 sets). Adam's moments of the encoder entries are reset, and of
    the decoder rows too unless reset_decoder_moments is off (dictionary_learning 2023 kept them).
    """
    n_dead = int(dead.sum())
    weights = resampling_weights(m, inputs, rs.weighting)                       # (n,)
    chosen = torch.multinomial(weights, n_dead, replacement=n_dead > len(weights), generator=rng)
    directions = inputs[chosen.to(inputs.device)]                               # (n_dead, d)
    directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast(directions, src=0)  # every rank must write the same directions
    alive = ~dead
    m.W_dec[dead] = directions
    if rs.encoder_init == "mean_alive":
        mean_row = m.W_enc[:, alive].mean(1) if bool(alive.any()) else torch.zeros_like(m.W_enc[:, 0])  # (d,)
        m.W_enc[:, dead] = rs.encoder_scale * mean_row[:, None]
    else:
        alive_norm = m.W_enc[:, alive].norm(dim=0).mean() if bool(alive.any()) else torch.tensor(1.0)
        m.W_enc[:, dead] = directions.T * (rs.encoder_scale * alive_norm)
    m.b_enc[dead] = 0.0
    reset = [(m.W_enc, (slice(None), dead)), (m.b_enc, (dead,))]
    if rs.reset_decoder_moments:
        reset.append((m.W_dec, (dead,)))
    for param, index in reset:
        for moment in ("exp_avg", "exp_avg_sq"):
            if moment in optimizer.state.get(param, {}):
                optimizer.state[param][moment][index] = 0.0
