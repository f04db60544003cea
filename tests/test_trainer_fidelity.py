"""Each preset trains as its source did (issue 10): pruning, JumpReLU scale and warm-up, AuxK, resampling, init.

Trainer runs on synthetic activations (tests/synthetic.py); the sources are named in each test's docstring.
"""

from __future__ import annotations

import pytest
import torch

from training.presets import PRESETS
from training.trainer import Trainer

from synthetic import BATCH, D_DICT, D_IN, SparseSource, fvu, make_recipe, train  # noqa: F401


def test_anthropic2024_pruning_removes_exactly_the_features_that_never_fired():
    """Anthropic, Feb 2024: decoder norms <= 1, prune below 0.99 after training. A feature that never fires gets
    no gradient and keeps its initial decoder norm, so pruning removes exactly the unused features only if the
    rows start below 0.99 (April 2024 update: norm 0.1); live features are pulled up to 1 by the L1."""
    recipe = make_recipe("anthropic2024", **{"penalty.coefficient": 0.2, "optimizer.lr": 1e-2})
    steps, source = 400, SparseSource()
    t = Trainer(recipe, D_IN, total_steps=steps)
    t.estimate_input_scale(source(1024))
    never = torch.ones(D_DICT, dtype=torch.bool)
    never[::4] = False  # 24 live features, fewer than the 64 true directions, so every one of them is used
    with torch.no_grad():  # the others can never fire: no pre-encoder bias, pre-activation -1 on every input
        t.module.W_enc[:, never] = 0.0
        t.module.b_enc[never] = -1.0
    fired = torch.zeros(D_DICT, dtype=torch.bool)
    for _ in range(steps):
        t.step(source(), sample_inputs=source)
        fired |= t.steps_since_fired == 0
    assert torch.equal(fired, ~never)
    norms = t.module.W_dec.norm(dim=-1)
    assert torch.allclose(norms[never], torch.full((int(never.sum()),), 0.1))  # untouched since initialisation
    module = t.finish()
    assert module.d_dict == int((~never).sum())
    assert torch.allclose(module.W_dec * t.input_scale, t.module.W_dec[~never], atol=1e-6)  # the live ones, kept


def test_jumprelu_inputs_have_unit_mean_squared_norm_as_in_the_paper():
    """Rajamanoharan et al. 2024b set bandwidth and initial threshold (1e-3) for inputs with E||x||^2 = 1 and the
    squared error summed over dimensions; scaled to norm sqrt(d_in) they would act sqrt(d_in) times too narrow."""
    recipe = make_recipe("jumprelu")
    assert recipe.mse == "sum_dims"
    assert recipe.penalty.bandwidth == recipe.penalty.initial_threshold == 1e-3
    source = SparseSource(scale=40.0)
    t = Trainer(recipe, D_IN, total_steps=10)
    t.estimate_input_scale(source(4096))
    scaled = source(4096) * t.input_scale
    assert scaled.pow(2).sum(-1).mean() == pytest.approx(1.0, rel=0.05)


def test_jumprelu_l0_coefficient_warms_up_linearly():
    """The L0 coefficient rises linearly from 0 (Rajamanoharan et al. 2024b; dictionary_learning's trainer)."""
    assert PRESETS["jumprelu"]["penalty"]["warmup_steps"] > 0
    recipe = make_recipe("jumprelu", **{"penalty.warmup_steps": 10})
    _, metrics = train(recipe, 14, SparseSource())
    c = recipe.penalty.coefficient
    for step, m in enumerate(metrics):  # loss_sparsity = c * min(1, step / 10) * L0
        assert m["loss_sparsity"] == pytest.approx(c * min(1.0, step / 10) * m["l0"], rel=1e-5, abs=1e-9), step
    assert metrics[0]["loss_sparsity"] == 0
    assert metrics[0]["l0"] > 0


@pytest.mark.parametrize("name", ["topk", "batchtopk"])
def test_auxk_uses_half_d_in_and_weighs_the_same_at_any_activation_scale(name):
    """Gao et al. 2024 / dictionary_learning: k_aux = d_in // 2, recorded in the trainer's recipe; the AuxK loss is
    normalised by the residual's variance and the MSE by the data's, so their ratio does not depend on scale."""
    ratios = []
    for scale in (1.0, 40.0):
        t = Trainer(make_recipe(name, **{"penalty.aux_dead_tokens": 10**9}), D_IN, total_steps=10)
        assert t.recipe.penalty.aux_k == D_IN // 2
        t.tokens_since_fired[: D_DICT // 2] = 10**9  # half the features count as dead from the start
        m = t.step(SparseSource(scale=scale)())
        assert m["loss_auxk"] > 0
        ratios.append(m["loss_mse"] / m["loss_auxk"])
    assert ratios[0] == pytest.approx(ratios[1], rel=1e-3)


def _two_kinds_of_inputs(n: int = 20_000) -> torch.Tensor:
    """n inputs, half along e_0 with norm 1 and half along e_1 with norm 2: a zero dictionary errs by x itself."""
    x = torch.zeros(n, D_IN)
    x[: n // 2, 0], x[n // 2:, 1] = 1.0, 2.0
    return x


@pytest.mark.parametrize("weighting, p_norm_2", [("squared_loss", 16 / 17), ("sqrt_loss", 2 / 3)])
def test_resampling_draws_inputs_by_the_chosen_weighting(weighting, p_norm_2):
    """Bricken et al. 2023: probability ~ loss^2 = ||e||^4 (16:1 here); dictionary_learning (seed 004's notes):
    ~ sqrt(loss) = ||e|| (2:1). The rule ||e||^2 (4:1, p = 0.8) is neither."""
    recipe = make_recipe("bricken2023", d_dict=1024, **{"resampling.weighting": weighting})
    t = Trainer(recipe, D_IN, total_steps=10)
    with torch.no_grad():
        for p in t.module.parameters():
            p.zero_()
    t.resample(torch.ones(1024, dtype=torch.bool), _two_kinds_of_inputs())
    drawn = t.module.W_dec  # (1024, d): each row the normalised input drawn for it, e_0 or e_1
    assert torch.equal((drawn[:, 0] == 1) | (drawn[:, 1] == 1), torch.ones(1024, dtype=torch.bool))
    assert float((drawn[:, 1] == 1).float().mean()) == pytest.approx(p_norm_2, abs=0.04)


def test_marks2023_resampling_is_dictionary_learnings_of_2023():
    """dictionary_learning's resample_neurons (Nov 2023 - Feb 2024, which trained 0_8192 / 1_32768): every dead
    encoder row becomes 0.2 times the mean alive row, the encoder bias 0, the decoder column the normalised
    input; Adam's moments are reset for the encoder only."""
    recipe = make_recipe("marks2023", **{"resampling.every": 30, "resampling.dead_window": 15,
                                         "resampling.inputs": 512})
    t, _ = train(recipe, 10, SparseSource(), total=40)
    dead = torch.zeros(D_DICT, dtype=torch.bool)
    dead[:10] = True
    alive_mean = t.module.W_enc[:, ~dead].mean(1).detach()
    decoder_moment = t.optimizer.state[t.module.W_dec]["exp_avg"][dead].clone()
    t.resample(dead, SparseSource(seed=5)(512))
    assert torch.allclose(t.module.W_enc[:, dead], 0.2 * alive_mean[:, None].expand(-1, 10))
    assert (t.module.b_enc[dead] == 0).all()
    assert torch.allclose(t.module.W_dec[dead].norm(dim=-1), torch.ones(10))
    assert (t.optimizer.state[t.module.W_enc]["exp_avg"][:, dead] == 0).all()
    assert torch.equal(t.optimizer.state[t.module.W_dec]["exp_avg"][dead], decoder_moment)


@pytest.mark.parametrize("name, tied, median", [("bricken2023", False, True), ("marks2023", False, False),
                                                ("anthropic2024", True, False), ("topk", True, True),
                                                ("jumprelu", True, False)])
def test_initialisation_follows_the_source(name, tied, median):
    """Kaiming-uniform encoder (nn.Linear's default: Bricken et al. 2023; dictionary_learning 2023) or tied
    W_enc = W_dec^T; b_dec from the first batch's geometric median (Gao et al. 2024) or zero (dictionary_learning,
    Anthropic's April 2024 update, the JumpReLU trainer)."""
    t = Trainer(make_recipe(name), D_IN, total_steps=10)
    W_enc, b_enc = t.module.W_enc.detach(), t.module.b_enc.detach()
    if tied:
        assert torch.allclose(W_enc, t.module.W_dec.detach().T)
        assert (b_enc == 0).all()
    else:  # uniform in +-1/sqrt(d_in), independent of the decoder
        bound = D_IN ** -0.5
        assert W_enc.abs().max() <= bound
        assert W_enc.abs().max() > 0.9 * bound
        assert b_enc.abs().max() <= bound
        assert not torch.allclose(W_enc, t.module.W_dec.detach().T, atol=0.1)
    source = SparseSource(scale=10.0)  # offset of norm ~15: a geometric median far from 0
    t.estimate_input_scale(source(1024))
    t.step(source())
    assert (t.module.b_dec.norm() > 1.0) == median
