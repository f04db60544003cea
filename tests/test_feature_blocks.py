"""training/feature_blocks.py: the L1 and JumpReLU steps one block of features at a time give the loss, features
and gradients of the whole-(B, F) path (losses.compute_loss(blocked=False)) for every L1 preset and JumpReLU,
blocks that divide F or not, L1 weighted by decoder norms or not; and they run only where they apply."""

from __future__ import annotations

import pytest
import torch

import training.feature_blocks as fb
from training import losses
from training.trainer import Trainer, init_dictionary

from synthetic import D_DICT, D_IN, make_recipe

PRESETS = {"bricken2023": {}, "marks2023": {}, "anthropic2024": {},
              # a skip-transcoder with the L1 penalty: dunefsky2024 without its ghost grads, with paulo2025's W_skip
              "dunefsky2024": {"resampling.kind": "none", "skip": True,
                               "output_hook": {"module": "gpt_neox.layers.0.mlp", "site": "mlp", "layer": 0,
                                               "io": "output"}},
              # thresholds spread over the pre-activations, and a bandwidth wide enough that some sit in the kernel
              "jumprelu": {"penalty.bandwidth": 0.05, "pre_encoder_bias": True}}


def _module_and_batch(recipe, seed: int = 0):
    transcoder = recipe.output_hook is not None
    module = init_dictionary(recipe, D_IN, dtype=torch.float64, device="cpu", d_out=D_IN + 3 if transcoder else None)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1)
    x = torch.randn(40, D_IN, generator=g, dtype=torch.float64)
    y = torch.randn(40, D_IN + 3, generator=g, dtype=torch.float64) if transcoder else None
    return module, x, y


KINDS = [(name, weighted) for name in PRESETS for weighted in (False, True) if not weighted or name != "jumprelu"]
"""Each preset, plain and with the penalty weighted by decoder norms (an L1 option only)."""


@pytest.mark.parametrize("block", [D_DICT, 7, 3, 1], ids=lambda w: f"width{w}")
@pytest.mark.parametrize("name, weighted", KINDS, ids=lambda v: {True: "weighted", False: "plain"}.get(v, v))
def test_blocked_step_equals_the_whole_one(name, weighted, block, monkeypatch):
    monkeypatch.setattr(fb, "BLOCK_FEATURES", block)
    recipe = make_recipe(name, **{**PRESETS[name], "penalty.scale_by_decoder_norm": weighted})
    module, x, y = _module_and_batch(recipe)
    if name == "jumprelu":
        with torch.no_grad():
            module.threshold.copy_(torch.linspace(0.0, 0.3, D_DICT, dtype=torch.float64))
    assert fb.applies(recipe, x)
    ctx = losses.LossContext(torch.zeros(D_DICT, dtype=torch.bool), sparsity_scale=0.7)
    outs, grads = [], []
    for blocked in (False, True):
        module.zero_grad(set_to_none=True)
        out = losses.compute_loss(module, x, recipe, ctx, target=y, blocked=blocked)
        out.loss.backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    whole, blocks = outs
    assert (whole.features > 0).any() and (whole.features == 0).any()        # the mask matters
    torch.testing.assert_close(blocks.features, whole.features)
    torch.testing.assert_close(blocks.x_hat, whole.x_hat)
    for term in ("mse", "sparsity"):
        torch.testing.assert_close(blocks.terms[term], whole.terms[term])
    assert grads[1].keys() == grads[0].keys() and {"W_enc", "b_enc", "W_dec", "b_dec"} <= grads[0].keys()
    assert ("W_skip" in grads[0]) == (recipe.output_hook is not None)
    assert ("threshold" in grads[0]) == (name == "jumprelu")
    if name == "jumprelu":                                                # some pre-activations in the kernel
        assert grads[0]["threshold"].abs().sum() > 0
    for key, want in grads[0].items():
        torch.testing.assert_close(grads[1][key], want, msg=key)


def test_it_applies_to_the_plain_l1_step_on_the_cpu_only():
    x = torch.zeros(4, D_IN)
    assert fb.applies(make_recipe("marks2023"), x)
    assert not fb.applies(make_recipe("marks2023", **{"resampling.kind": "ghost_grads"}), x)   # reads pre
    assert not fb.applies(make_recipe("farrell2024"), x)                                    # approximate L0
    assert not fb.applies(make_recipe("topk"), x)
    assert fb.applies(make_recipe("jumprelu"), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fb.applies(make_recipe("marks2023"), x)                                 # out= skips autocast
    assert not fb.applies(make_recipe("marks2023"), torch.zeros(4, D_IN, device="meta"))


def test_trainer_steps_blocked_as_it_steps_whole(monkeypatch):
    """Twenty Trainer steps (resampling, decoder-norm rule, Adam) in float64, blocked and whole, end equal."""
    monkeypatch.setattr(fb, "BLOCK_FEATURES", 5)
    recipe = make_recipe("marks2023", dtype="float64")
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(32, D_IN, generator=g, dtype=torch.float64) for _ in range(20)]
    modules = []
    for blocked in (False, True):
        t = Trainer(recipe, D_IN, total_steps=20)
        original = losses.compute_loss
        monkeypatch.setattr("training.trainer.compute_loss",
                            lambda *a, _b=blocked, **k: original(*a, **{**k, "blocked": _b}))
        for x in batches:
            t.step(x)
        modules.append(t.module)
    for (name, a), (_, b) in zip(modules[0].named_parameters(), modules[1].named_parameters()):
        torch.testing.assert_close(b, a, msg=name)
