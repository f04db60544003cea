"""Synthetic activations from a known sparse dictionary, and tiny recipes of every preset, for the trainer tests.

x = codes @ directions + offset + noise, with ~3 of 64 unit directions active per token (no model needed).
"""

from __future__ import annotations

import torch

from training.presets import preset, validate_recipe
from training.trainer import Trainer

D_IN, D_DICT, N_TRUE, BATCH = 24, 96, 64, 256
COMMON = {"model": "m", "hook": {"module": "gpt_neox.layers.0.mlp", "site": "mlp", "layer": 0}, "dataset": "d",
          "tokens": 10**6, "d_dict": D_DICT, "batch_size": BATCH, "buffer_contexts": 16, "context_length": 16,
          "optimizer.lr": 3e-3, "optimizer.warmup_steps": 20}
# per preset: what makes it sensible at this tiny size (coefficients for inputs of norm ~1-5, short windows)
TINY = {"bricken2023": {"penalty.coefficient": 3e-3}, "marks2023": {}, "anthropic2024": {"penalty.coefficient": 0.05},
        "farrell2024": {}, "topk": {"k": 4, "penalty.aux_dead_tokens": 2560},
        "batchtopk": {"k": 4, "threshold_decay": 0.9},
        "jumprelu": {"penalty.coefficient": 1e-2, "penalty.warmup_steps": 20}, "gated": {},
        "dunefsky2024": {"penalty.coefficient": 3e-3, "resampling.dead_window": 20, "batch_size": BATCH},
        "paulo2025": {"k": 4, "penalty.aux_dead_tokens": 2560}}


class SparseSource:
    """Activations from a known sparse dictionary: 64 random unit directions, ~3 active per token."""

    def __init__(self, seed: int = 0, scale: float = 1.0):
        g = torch.Generator().manual_seed(1000 + seed)
        self.directions = torch.randn(N_TRUE, D_IN, generator=g)
        self.directions /= self.directions.norm(dim=-1, keepdim=True)
        self.offset = 0.3 * torch.randn(D_IN, generator=g)
        self.scale = scale
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, n: int = BATCH) -> torch.Tensor:
        active = torch.rand(n, N_TRUE, generator=self.gen) < 3 / N_TRUE
        codes = active * (0.5 + torch.rand(n, N_TRUE, generator=self.gen))
        noise = 0.01 * torch.randn(n, D_IN, generator=self.gen)
        return self.scale * (codes @ self.directions + self.offset + noise)


def make_recipe(name: str, **fields):
    return validate_recipe(preset(name, **{**COMMON, **TINY[name], **fields}))


def train(recipe, steps: int, source: SparseSource, trainer: Trainer | None = None, total: int | None = None):
    t = trainer or Trainer(recipe, D_IN, total_steps=total or steps)
    if trainer is None and recipe.input_normalization != "none":
        t.estimate_input_scale(source(1024))
    metrics = [t.step(source(), sample_inputs=source) for _ in range(steps)]
    return t, metrics


@torch.no_grad()
def fvu(module, x):
    out = module(x)
    return float((x - out.reconstruction).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
