"""training/sensitivity.py: the Apollo 2024 sensitive-directions test on the tiny GPT-NeoX."""

from __future__ import annotations

import math

import pytest
import torch

from dictionaries.architectures import build_dictionary
from dictionaries.card import Card, Files
from dictionaries.recipe import HookPoint, ModelRef
from training.sensitivity import (
    crossing_steps,
    dictionary_directions,
    measure_sensitivity,
    plot_sensitivity,
    sample_like,
)

HOOK = HookPoint(module="gpt_neox.layers.0.mlp", site="mlp", layer=0)


def test_random_baseline_is_mean_and_covariance_matched():
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 6, generator=gen)
    acts = torch.randn(4000, 6, generator=gen) @ mix + torch.arange(6.0) * 3   # correlated, shifted
    samples = sample_like(acts, 40000, torch.Generator().manual_seed(1))
    mean, cov = acts.double().mean(0), torch.cov(acts.double().T)
    se = (cov.diagonal() / samples.shape[0]).sqrt()
    assert ((samples.double().mean(0) - mean).abs() < 5 * se).all()              # 5 standard errors
    rel = torch.linalg.matrix_norm(torch.cov(samples.double().T) - cov) / torch.linalg.matrix_norm(cov)
    assert rel < 0.05
    # not a copy of the data: fresh points
    assert torch.cdist(samples[:100].float(), acts.float()).min() > 1e-3
    # rank-deficient activations still sample (eigh, clamped eigenvalues)
    flat = torch.cat([acts[:, :3], acts[:, :3]], 1)
    assert torch.isfinite(sample_like(flat, 10)).all()


def test_crossing_step_interpolates_and_is_inf_when_never_reached():
    steps = torch.tensor([0.0, 1.0, 2.0, 3.0])
    kl = torch.tensor([[0.0, 0.25, 0.75, 1.0],    # crosses 0.5 halfway between 1 and 2
                       [0.0, 0.1, 0.2, 0.3],      # never
                       [0.6, 0.7, 0.8, 0.9]])     # at the first step
    out = crossing_steps(steps, kl)
    assert out[0].item() == pytest.approx(1.5)
    assert math.isinf(out[1].item())
    assert out[2].item() == 0


def test_dictionary_direction_is_the_most_active_feature(tiny_neox):
    card = Card(name="toy/mlp0/8", architecture="relu", d_in=64, d_dict=8, files=Files(items=[]), hook=HOOK)
    d = build_dictionary(card)
    with torch.no_grad():
        d.W_enc[:, :] = 0
        d.W_enc[0, 3], d.W_enc[1, 5] = 1.0, 1.0
        d.W_dec.copy_(torch.randn(8, 64))
    base = torch.zeros(2, 64)
    base[0, 0], base[1, 1] = 2.0, 3.0
    dirs = dictionary_directions(d, base)
    assert torch.equal(dirs[0], d.W_dec[3])
    assert torch.equal(dirs[1], d.W_dec[5])


def test_curves_are_finite_and_ordered(tiny_neox, tokenizer, tmp_path):
    from dictionaries.hooks import collect_activations
    from training.toymodel import corpus_documents

    ids = torch.tensor(tokenizer(" ".join(corpus_documents()[:40])[:4000])["input_ids"][:16 * 20]).view(16, 20)
    pool = collect_activations(tiny_neox, [HOOK], ids)[0].reshape(-1, 64)
    card = Card(name="toy/mlp0/128", architecture="relu", d_in=64, d_dict=128, files=Files(items=[]),
                model=ModelRef(id="toy"), hook=HOOK)
    d = build_dictionary(card)
    with torch.no_grad():
        d.W_enc.copy_(torch.randn(64, 128, generator=torch.Generator().manual_seed(0)))
        d.W_dec.copy_(d.W_enc.T)
    steps = torch.linspace(0, 3, 7)
    [curves] = measure_sensitivity(tiny_neox, HOOK, [d], ids[:6], torch.full((6,), 19), pool, steps=steps,
                                   progress=False)
    assert set(curves.kl) == {"random", "real", "dictionary"}
    for kind, kl in curves.kl.items():
        assert kl.shape == (6, 7), kind
        assert torch.isfinite(kl).all(), kind
        assert kl[:, 0].abs().max() < 1e-5, kind                       # t = 0 is the clean run
        mean = kl.mean(0)
        assert (mean[1:] >= mean[:-1] - 1e-6).all(), kind               # KL grows with the step on average
        assert mean[-1] > 3 * mean[1] > 0, kind                           # (saturates on a random model)
    card_fig = curves.to_card()
    assert card_fig.samples == 6
    for median in curves.medians().values():                      # medians are steps on the grid, or inf
        assert math.isinf(median) or 0 <= median <= 3
    png = plot_sensitivity(curves, tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_apollo_windows_are_ten_real_tokens_ending_on_a_counted_one():
    from training.sensitivity import APOLLO_LENGTH, apollo_windows

    ids = torch.arange(2, 2 + 2 * 40).view(2, 40)
    ids[0, 19] = 0                                           # BOS/EOS id 0 ends window 1 of context 0
    mask = torch.ones_like(ids)
    mask[1, 35:] = 0                                         # padding in the last window of context 1
    windows, per_context = apollo_windows([(ids, mask)], bos_id=0, exclude_bos=True)
    assert windows.shape[1] == APOLLO_LENGTH == 10
    assert per_context.tolist() == [3, 3]                   # 4 windows each, one dropped in each
    assert bool((windows[:, -1] != 0).all())


def test_eval_set_test_uses_one_fixed_position_and_a_pool_from_it(tiny_neox, tokenizer, monkeypatch):
    """Seed 002: perturb and read at the last of 10 tokens; mean/covariance from activations at that position."""
    import training.sensitivity as S
    from dictionaries.hooks import collect_activations

    seen = {}

    def spy(model, hook, dicts, contexts, positions, pool, **kw):
        seen.update(contexts=contexts, positions=positions, pool=pool, centre=kw["centre"])
        return [None] * len(dicts)

    monkeypatch.setattr(S, "measure_sensitivity", spy)
    ids = tokenizer(["The for statement is used to iterate over the elements of a sequence. " * 8] * 3,
                    return_tensors="pt")["input_ids"][:, :60]
    d = build_dictionary(Card(name="toy/mlp0/8", architecture="relu", d_in=64, d_dict=8, files=Files(items=[]),
                              hook=HOOK))
    S.sensitivity_on_eval_set(tiny_neox, [d], [HOOK], [(ids, None)], bos_id=0, exclude_bos=True, samples=4)
    assert seen["contexts"].shape == (4, 10)
    assert seen["positions"].tolist() == [9, 9, 9, 9]
    assert seen["centre"] is True                           # GPT-NeoX normalises with LayerNorm
    windows = ids.reshape(-1, 10)
    last = collect_activations(tiny_neox, [HOOK], windows)[0][:, -1]          # (18, d) at the fixed position
    for row in seen["pool"]:
        assert torch.isclose(last, row[None], atol=1e-5).all(-1).any()
    assert seen["pool"].shape[0] == len(windows) - 4


@pytest.mark.parametrize("family,hook", [("neox", "gpt_neox.layers.0.mlp"), ("neox", "gpt_neox.layers.1:input"),
                                         ("gpt2", "transformer.h.0"), ("llama", "model.layers.1.mlp")])
def test_last_token_over_the_prefix_cache_equals_whole_context_forwards(tiny_neox, family, hook, monkeypatch):
    """The cheap path (prefix cached once per base, the last token alone perturbed, all steps of a kind in one
    forward, the blocks before the hook replayed or run) gives the KLs of the whole-context forwards, for rotary
    (NeoX, Llama) and learned positions (GPT-2), at a module's output and at a block's input."""
    import training.sensitivity as S
    from dictionaries.hooks import collect_activations

    from helpers import gpt2_model, llama_model, make_dictionary

    model = {"neox": lambda: tiny_neox, "gpt2": gpt2_model, "llama": llama_model}[family]()
    module, _, io = hook.partition(":")
    point = HookPoint(module=module, io=io or "output", site="mlp", layer=0)  # site: a label here
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 1024, (5, 10), generator=g)
    pool = collect_activations(model, [point], torch.randint(2, 1024, (40, 10), generator=g))[0][:, -1]
    d = make_dictionary(pool.shape[-1], 32, None, kind="topk")
    steps = torch.tensor([0.0, 0.5, 4.0, 32.0])
    kw = dict(steps=steps, progress=False, centre=True, rows_per_forward=7)   # 7: several forwards per kind
    [full] = measure_sensitivity(model, point, [d], ids, torch.full((5,), 9), pool, reuse_prefix=False, **kw)
    monkeypatch.setattr(S, "curves_full", None)                            # the cheap path must not fall back
    [cheap] = measure_sensitivity(model, point, [d], ids, torch.full((5,), 9), pool, **kw)
    [every_layer] = measure_sensitivity(model, point, [d], ids, torch.full((5,), 9), pool, skip_before_hook=False,
                                        **kw)                                  # the prefix path before issue 12.2
    for kind in ("random", "real", "dictionary"):
        assert full.kl[kind][:, -1].min() > 1e-4, kind                   # the perturbations do move the output
        torch.testing.assert_close(cheap.kl[kind], full.kl[kind], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(every_layer.kl[kind], full.kl[kind], rtol=1e-4, atol=1e-6)


def test_the_perturbed_forwards_logits_stay_within_a_small_budget(tiny_neox, tokenizer, monkeypatch):
    """Each perturbed forward yields at most LOGITS_BUDGET bytes of logits (at 1 GiB the test added ~790 MB to a
    Pythia-70m training run's peak): the default stays small, and a budget of two bases' rows is obeyed."""
    from dictionaries.hooks import collect_activations
    from training import perturbation, sensitivity

    assert sensitivity.LOGITS_BUDGET <= 64 << 20
    rows, real = [], perturbation._last_logprobs

    def counted(hf, hook, cache, last, bases, repeats, deltas):
        rows.append(len(bases) * repeats)
        return real(hf, hook, cache, last, bases, repeats, deltas)

    steps = torch.linspace(0, 3, 5)
    monkeypatch.setattr(perturbation, "_last_logprobs", counted)
    monkeypatch.setattr(sensitivity, "LOGITS_BUDGET", 4 * tiny_neox.config.vocab_size * 2 * len(steps))
    ids = torch.randint(0, tiny_neox.config.vocab_size, (6, 10), generator=torch.Generator().manual_seed(0))
    pool = collect_activations(tiny_neox, [HOOK], ids)[0].reshape(-1, 64)
    measure_sensitivity(tiny_neox, HOOK, [], ids, torch.full((6,), 9), pool, steps=steps, progress=False)
    assert rows[0] == 6 and max(rows[1:]) == 2 * len(steps)       # the clean forward: a row a base
    assert len(rows) == 1 + 2 * 3                                  # random and real kinds, 3 forwards each
