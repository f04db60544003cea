"""Tests of training/losses.py: each penalty's definition and the gradients the estimators promise."""

from __future__ import annotations

import pytest
import torch

from training import losses

B, D, F = 64, 16, 48


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def test_reconstruction_modes(gen):
    x, x_hat = torch.randn(B, D, generator=gen), torch.randn(B, D, generator=gen)
    mean = losses.reconstruction_loss(x, x_hat, "mean")
    assert torch.allclose(mean, ((x - x_hat) ** 2).mean())
    assert torch.allclose(losses.reconstruction_loss(x, x_hat, "sum_dims"), mean * D)


def test_l1_and_tanh_penalties(gen):
    f = torch.relu(torch.randn(B, F, generator=gen))
    norms = torch.rand(F, generator=gen)
    assert torch.allclose(losses.l1_penalty(f), f.sum(-1).mean())
    assert torch.allclose(losses.l1_penalty(f, norms), (f * norms).sum(-1).mean())
    # (A/B) tanh(B f): close to A f for small B f, saturating at A/B per feature for large f
    small = losses.tanh_penalty(f, a=2.0, b=1e-4)
    assert torch.allclose(small, 2.0 * f.sum(-1).mean(), rtol=1e-3)
    big = losses.tanh_penalty(f * 1e6 + 100.0, a=2.0, b=1.0)
    assert torch.allclose(big, torch.tensor(2.0 * F))


def test_feature_density_counts_firing_and_floor_term(gen):
    f = torch.relu(torch.randn(B, F, generator=gen))
    s = losses.feature_density(f, eps=1e-6)
    assert torch.allclose(s, (f > 0).float().mean(0), atol=1e-3)
    assert torch.allclose(s.sum(), (f > 0).float().sum(-1).mean(), atol=0.05)  # approx L0
    floor = 0.3
    pen = losses.min_density_penalty(s, floor)
    assert torch.allclose(pen, (torch.relu(floor - s) / floor).sum())
    assert losses.min_density_penalty(torch.ones(F), floor) == 0


def test_jumprelu_straight_through_gradients():
    eps = 0.1
    theta = torch.full((3,), 0.5, requires_grad=True)
    # pre-activations: inside the kernel window (|z - theta| < eps/2) for feature 0 twice, feature 1 once
    z = torch.tensor([[0.52, 0.48, 0.9], [0.47, 0.2, 0.1]], requires_grad=True)
    f = losses.jumprelu(z, theta, eps)
    assert torch.equal(f.detach(), z.detach() * (z.detach() > 0.5))
    f.sum().backward()
    assert torch.allclose(theta.grad, torch.tensor([-2 * 0.5 / eps, -0.5 / eps, 0.0]))
    assert torch.equal(z.grad, (z.detach() > 0.5).float())
    theta.grad = None
    z.grad = None
    l0 = losses.l0_penalty(z, theta, eps)
    assert l0.item() == pytest.approx(((z > 0.5).sum(-1).float().mean()).item())
    l0.backward()
    assert torch.allclose(theta.grad, torch.tensor([-2 / eps, -1 / eps, 0.0]) / 2)  # mean over 2 tokens
    assert z.grad is None or torch.count_nonzero(z.grad) == 0  # the L0 term trains only the threshold


def test_topk_and_batchtopk_keep_k(gen):
    pre = torch.randn(B, F, generator=gen) + 1.0
    f = losses.topk_features(pre, 5)
    assert ((f > 0).sum(-1) <= 5).all()
    assert ((f > 0).sum(-1) == 5).float().mean() > 0.9
    assert torch.equal(f.max(-1).values, torch.relu(pre).max(-1).values)
    fb, smallest = losses.batchtopk_features(pre, 5)
    assert int((fb > 0).sum()) == 5 * B
    kept = fb[fb > 0]
    assert smallest == kept.min()
    assert (torch.relu(pre)[fb == 0] <= smallest).all()


def test_auxk_reaches_only_dead_features(gen):
    W_dec = torch.randn(F, D, generator=gen, requires_grad=True)
    pre = torch.randn(B, F, generator=gen, requires_grad=True)
    residual = torch.randn(B, D, generator=gen)
    none_dead = torch.zeros(F, dtype=torch.bool)
    assert losses.auxk_loss(pre, residual, none_dead, 8, W_dec) == 0
    dead = torch.zeros(F, dtype=torch.bool)
    dead[:10] = True
    loss = losses.auxk_loss(pre, residual, dead, 4, W_dec)
    loss.backward()
    assert loss > 0
    assert torch.count_nonzero(pre.grad[:, 10:]) == 0
    assert torch.count_nonzero(pre.grad[:, :10]) > 0
    assert torch.count_nonzero(W_dec.grad[10:]) == 0


def test_ghost_grads_reach_only_dead_features_and_match_mse_scale(gen):
    W_dec = torch.randn(F, D, generator=gen, requires_grad=True)
    pre = torch.randn(B, F, generator=gen, requires_grad=True)
    residual = torch.randn(B, D, generator=gen)
    mse = torch.tensor(0.37)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[5:9] = True
    loss = losses.ghost_grads_loss(pre, residual, dead, W_dec, mse)
    assert loss.item() == pytest.approx(0.37, rel=1e-5)
    loss.backward()
    assert torch.count_nonzero(pre.grad[:, ~dead]) == 0
    assert torch.count_nonzero(pre.grad[:, dead]) > 0


def test_gated_aux_term_leaves_decoder_frozen(gen):
    from dictionaries.architectures import GatedDictionary
    from training.presets import preset, validate_recipe

    recipe = validate_recipe(preset("gated", model="m", hook={"module": "a", "site": "mlp", "layer": 0},
                                    dataset="d", tokens=100, d_dict=F, batch_size=8, buffer_contexts=1,
                                    context_length=8))
    m = GatedDictionary(D, F)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    x = torch.randn(B, D, generator=gen)
    out = losses.compute_loss(m, x, recipe, losses.LossContext(torch.zeros(F, dtype=torch.bool)))
    assert torch.allclose(out.x_hat, m(x).reconstruction, atol=1e-6)  # the training forward is the module's
    out.terms["gated_aux"].backward()
    assert m.W_dec.grad is None or torch.count_nonzero(m.W_dec.grad) == 0
    assert torch.count_nonzero(m.W_enc.grad) > 0  # the gate learns from the auxiliary reconstruction


def _farrell_density_penalty(gen, count: int):
    """The density term of compute_loss for one batch when `count` earlier steps put the window's mean at 0.5."""
    from dictionaries.architectures import ReluDictionary
    from training.presets import preset, validate_recipe

    recipe = validate_recipe(preset("farrell2024", model="m", hook={"module": "a", "site": "mlp", "layer": 0},
                                    dataset="d", tokens=100, d_dict=F, batch_size=8, buffer_contexts=1,
                                    context_length=8, **{"penalty.density_floor": 0.9}))
    m = ReluDictionary(D, F, pre_encoder_bias=False)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    x = torch.randn(B, D, generator=gen)
    s = losses.feature_density(m(x).features, recipe.penalty.l0_eps).detach()    # this batch's density, (F,)
    past = 0.5 * (count + 1) - s              # (F,) the earlier steps' sum, in [0, count]: window mean 0.5 < 0.9
    out = losses.compute_loss(m, x, recipe, losses.LossContext(torch.zeros(F, dtype=torch.bool), past, count))
    term = out.terms["density_penalty"]
    term.backward()
    return term.detach(), m.b_enc.grad.clone()


def test_density_term_gradient_does_not_shrink_as_the_window_fills():
    """Farrell 2024 (seed 001): the windowed density goes inside the ReLU, "but with the gradients from the
    original expression" (the batch's), so the gradient does not fall as 1 / (count + 1) while the window fills."""
    early = _farrell_density_penalty(torch.Generator().manual_seed(0), count=1)
    full = _farrell_density_penalty(torch.Generator().manual_seed(0), count=999)
    assert early[0] == pytest.approx(F * (0.9 - 0.5) / 0.9, rel=1e-4)
    assert full[0] == pytest.approx(early[0], rel=1e-4)
    assert torch.count_nonzero(early[1]) > 0
    assert torch.allclose(full[1], early[1], rtol=1e-4, atol=1e-7)


def test_normalized_mse_is_the_batch_fvu(gen):
    """Gao et al. 2024's normalised MSE: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, unchanged by the scale."""
    x, x_hat = torch.randn(B, D, generator=gen) + 3.0, torch.randn(B, D, generator=gen)
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert torch.allclose(losses.reconstruction_loss(x, x_hat, "normalized"), fvu)
    assert torch.allclose(losses.reconstruction_loss(40 * x, 40 * x_hat, "normalized"), fvu)


@pytest.mark.parametrize("weighted", [False, True])
def test_fused_relu_l1_decode_equals_relu_l1_and_addmm_with_gradients(gen, weighted):
    """relu_l1_decode's one backward gives the gradients of relu, l1_penalty and the decoder's addmm, built from
    ops, to pre, the norms, W_dec and b_dec; with x_hat unused (grad_x_hat None) and with the penalty unused."""
    pre = torch.randn(B, F, generator=gen, dtype=torch.float64, requires_grad=True)
    norms = (torch.rand(F, generator=gen, dtype=torch.float64) + 0.5).requires_grad_() if weighted else None
    W_dec = torch.randn(F, D, generator=gen, dtype=torch.float64, requires_grad=True)
    b_dec = torch.randn(D, generator=gen, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(B, D, generator=gen, dtype=torch.float64)       # a downstream use of x_hat (the MSE's)
    inputs = (pre, W_dec, b_dec) + ((norms,) if weighted else ())
    f, penalty, x_hat = losses.relu_l1_decode(pre, norms, W_dec, b_dec)
    got = torch.autograd.grad((x_hat * probe).sum() + 3 * penalty, inputs)
    f_ref = torch.relu(pre)
    ref_penalty, ref_x_hat = losses.l1_penalty(f_ref, norms), torch.addmm(b_dec, f_ref, W_dec)
    want = torch.autograd.grad((ref_x_hat * probe).sum() + 3 * ref_penalty, inputs)
    assert not f.requires_grad
    torch.testing.assert_close(f, f_ref.detach())
    torch.testing.assert_close(penalty, ref_penalty)
    torch.testing.assert_close(x_hat, ref_x_hat)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    [only_penalty] = torch.autograd.grad(losses.relu_l1_decode(pre, norms, W_dec, b_dec)[1], pre)   # x_hat unused
    torch.testing.assert_close(only_penalty, torch.autograd.grad(losses.l1_penalty(torch.relu(pre), norms), pre)[0])
    [only_decoded] = torch.autograd.grad(losses.relu_l1_decode(pre, norms, W_dec, b_dec)[2].sum(), pre)
    [decoded_ref] = torch.autograd.grad(torch.addmm(b_dec, torch.relu(pre), W_dec).sum(), pre)
    torch.testing.assert_close(only_decoded, decoded_ref)


def test_fused_relu_l1_decode_keeps_a_bf16_gradient_in_bf16(gen):
    pre = torch.randn(B, F, generator=gen).bfloat16().requires_grad_()
    W_dec, b_dec = torch.randn(F, D, generator=gen), torch.zeros(D)
    f, penalty, x_hat = losses.relu_l1_decode(pre, None, W_dec.bfloat16(), b_dec.bfloat16())
    (x_hat.float().sum() + penalty).backward()
    assert pre.grad.dtype == torch.bfloat16 and penalty.dtype == torch.float32
    ref = torch.where(pre.detach().float() > 0, W_dec.bfloat16().float().sum(1) + 1 / B, 0)
    torch.testing.assert_close(pre.grad.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", ["topk", "batchtopk"])
def test_sparse_topk_kept_values_stay_float32_under_bf16_autocast(gen, name):
    """Only the choosing product runs in bf16: the kept values, x . W_enc[:, f] + b_enc[f] - b_dec . W_enc[:, f],
    are float32 throughout (a bf16 b_dec @ W_enc would round the bias to 8 bits and cast its (d, F) gradient)."""
    from dictionaries.architectures import BatchTopKDictionary, TopKDictionary

    from synthetic import make_recipe

    module = (TopKDictionary if name == "topk" else BatchTopKDictionary)(D, F, k=4)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(B, D, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = losses.compute_loss(module, x, make_recipe(name, d_dict=F, k=4),
                                  losses.LossContext(torch.zeros(F, dtype=torch.bool)), sparse=True)
    rows, feats, values = out.code
    W, b_enc, b_dec = module.W_enc.detach(), module.b_enc.detach(), module.b_dec.detach()
    expected = ((x[rows] - b_dec) * W[:, feats].t()).sum(-1) + b_enc[feats]
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, expected.relu(), rtol=1e-5, atol=1e-5)
