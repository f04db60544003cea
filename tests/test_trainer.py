"""Tests of training/trainer.py on synthetic activations made from a known sparse dictionary.

x = codes @ directions + offset + noise, with ~3 of 64 unit directions active per token (no model needed).
"""

from __future__ import annotations

import io

import pytest
import torch

from dictionaries.errors import RecipeError, ShapeMismatchError
from training.presets import PRESETS
from training.trainer import Trainer, lr_at

from synthetic import BATCH, D_DICT, D_IN, SparseSource, fvu, make_recipe, train  # noqa: F401

OPTIONS = {"tanh": ("anthropic2024", {"penalty.kind": "tanh", "penalty.tanh_b": 4.0}),
           "ghost_grads": ("bricken2023", {"resampling.kind": "ghost_grads", "resampling.dead_window": 20})}


@pytest.mark.parametrize("name, options", [(n, {}) for n in sorted(PRESETS)] + list(OPTIONS.values()),
                         ids=sorted(PRESETS) + list(OPTIONS))
def test_each_recipe_trains_and_its_loss_falls(name, options):
    source = SparseSource()
    t, metrics = train(make_recipe(name, **options), 250, source)
    first = sum(m["loss"] for m in metrics[:10]) / 10
    last = sum(m["loss"] for m in metrics[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    assert all(k in metrics[-1] for k in ("loss", "mse", "l0", "dead_frac", "lr"))
    if name == "anthropic2024":  # a 250-step run leaves decoder norms below 0.99: test the unpruned module
        t.recipe = t.recipe.model_copy(update={"prune_below": None})
    x = source(2048)
    untrained = fvu(Trainer(t.recipe, D_IN, total_steps=1).finish(), x)
    assert fvu(t.finish(), x) < 0.4 < untrained  # the saved module takes raw activations and reconstructs them


@pytest.mark.parametrize("name, kind, coefficients", [("bricken2023", "l1", (1e-3, 3e-2)),
                                                      ("farrell2024", "approx_l0", (1e-3, 3e-2))])
def test_penalty_lowers_l0_as_coefficient_rises(name, kind, coefficients):
    l0 = []
    for c in coefficients:
        t, _ = train(make_recipe(name, **{"penalty.coefficient": c}), 200, SparseSource())
        x = SparseSource(seed=7)(2048)
        l0.append(float((t.finish()(x).features > 0).sum(-1).float().mean()))
    assert t.recipe.penalty.kind == kind
    assert l0[1] < 0.7 * l0[0], l0


@pytest.mark.parametrize("use_sampler", [True, False])
def test_anthropic_resampling_revives_killed_features(use_sampler):
    recipe = make_recipe("bricken2023", **{"resampling.every": 60, "resampling.dead_window": 30,
                                           "resampling.inputs": 2048})
    source = SparseSource()
    t, _ = train(recipe, 20, source, total=100)
    killed = torch.arange(10)
    with torch.no_grad():  # these features can never fire again on their own
        t.module.W_enc[:, killed] = 0.0
        t.module.b_enc[killed] = -1.0
    sampler = source if use_sampler else None
    counts = [t.step(source(), sample_inputs=sampler)["resampled"] for _ in range(40)]
    assert counts[-1] >= len(killed)
    assert sum(counts[:-1]) == 0  # resampled exactly at step 60
    assert (t.module.b_enc[killed] == 0).all()
    assert torch.allclose(t.module.W_dec[killed].norm(dim=-1), torch.ones(len(killed)))
    state = t.optimizer.state[t.module.W_dec]
    assert (state["exp_avg"][killed] == 0).all()
    assert (state["exp_avg_sq"][killed] == 0).all()
    f = t.module(source(2048) * t.input_scale).features
    assert ((f[:, killed] > 0).any(0)).all()


@pytest.mark.parametrize("name, norm", [("bricken2023", "unit"), ("anthropic2024", "at_most_one")])
def test_decoder_norms_obey_their_constraint(name, norm):
    t, _ = train(make_recipe(name), 100, SparseSource())
    norms = t.module.W_dec.norm(dim=-1)
    assert t.recipe.decoder_norm == norm
    # the projection of the gradient is not recorded by autograd (each step's graph kept (F, d) tensors alive)
    assert not t.module.W_dec.grad.requires_grad
    if norm == "unit":
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    else:
        assert (norms <= 1 + 1e-6).all()
        assert norms.min() < 0.999  # below 1 is allowed, above is not


def test_pruning_drops_features_with_decoder_norm_below_099():
    t, _ = train(make_recipe("anthropic2024"), 50, SparseSource())
    with torch.no_grad():
        t.module.W_dec /= t.module.W_dec.norm(dim=-1, keepdim=True)
        t.module.W_dec[::3] *= torch.linspace(0.5, 0.989, len(range(0, D_DICT, 3)))[:, None]
    keep = t.module.W_dec.norm(dim=-1) >= 0.99
    module = t.finish()
    assert module.d_dict == int(keep.sum()) == D_DICT - len(range(0, D_DICT, 3))
    x = SparseSource(seed=3)(64)
    assert torch.allclose(module(x).features, t.module(x * t.input_scale).features[:, keep], atol=1e-5)
    with torch.no_grad():
        t.module.W_dec *= 0.5
    with pytest.raises(RecipeError) as info:  # pruning everything is an error, not an empty dictionary
        t.finish()
    assert info.value.fields == ["prune_below"]


@pytest.mark.parametrize("name", ["anthropic2024", "jumprelu"])
def test_input_normalisation_is_folded_back(name):
    source = SparseSource(scale=40.0)  # raw activations far from norm sqrt(d_in)
    t, _ = train(make_recipe(name, prune_below=None) if name == "anthropic2024" else make_recipe(name), 50, source)
    assert t.input_scale != pytest.approx(1.0)
    x = source(512)
    scaled = x * t.input_scale
    if t.recipe.input_normalization == "sqrt_d":  # Anthropic, Feb 2024: mean L2 norm sqrt(d_in)
        assert scaled.norm(dim=-1).mean() == pytest.approx(D_IN ** 0.5, rel=0.05)
    else:  # JumpReLU: mean squared L2 norm 1
        assert scaled.pow(2).sum(-1).mean() == pytest.approx(1.0, rel=0.05)
    folded, inner = t.finish()(x), t.module(x * t.input_scale)
    assert torch.allclose(folded.features, inner.features, atol=1e-4, rtol=1e-4)
    assert torch.allclose(folded.reconstruction, inner.reconstruction / t.input_scale, atol=1e-3, rtol=1e-4)


def _roundtrip(state: dict) -> dict:
    """Through bytes, as a checkpoint would go (weights_only loading)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_resume_is_bit_identical(name):
    extra = {"resampling.every": 40, "resampling.dead_window": 5} if name in ("bricken2023", "marks2023") else {}
    if name == "farrell2024":
        extra = {"penalty.density_window": 7, "penalty.density_floor": 0.05}
    recipe = make_recipe(name, **extra)
    straight, _ = train(recipe, 60, SparseSource(), total=60)
    half, _ = train(recipe, 30, SparseSource(), total=60)
    resumed = Trainer(recipe, D_IN, total_steps=60)
    resumed.load_state_dict(_roundtrip(half.state_dict()))
    source = SparseSource()
    source.gen.set_state(half_source_state(recipe))
    train(recipe, 30, source, trainer=resumed)
    for (k, a), b in zip(straight.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(straight.steps_since_fired, resumed.steps_since_fired)


def half_source_state(recipe) -> torch.Tensor:
    """The data generator's state after the first 30 steps (what the run's data position restores)."""
    source = SparseSource()
    if recipe.input_normalization != "none":
        source(1024)
    for _ in range(30):
        source()
    return source.gen.get_state()


def test_resume_refuses_another_recipe():
    t = Trainer(make_recipe("bricken2023"), D_IN, total_steps=10)
    other = Trainer(make_recipe("bricken2023", **{"penalty.coefficient": 0.5}), D_IN, total_steps=10)
    with pytest.raises(RecipeError) as info:
        other.load_state_dict(t.state_dict())
    assert info.value.fields == ["penalty.coefficient"]


@pytest.mark.parametrize("name", ["topk", "batchtopk"])
def test_topk_and_batchtopk_keep_k(name):
    source = SparseSource()
    t, metrics = train(make_recipe(name), 150, source)
    k = t.recipe.k
    if name == "topk":
        assert all(m["l0"] <= k for m in metrics)
        assert metrics[-1]["l0"] > k - 0.5
    else:  # k per token on average over the batch in training
        assert all(m["l0"] == pytest.approx(k) for m in metrics)
    module = t.finish()
    l0 = float((module(source(2048)).features > 0).sum(-1).float().mean())
    if name == "batchtopk":  # the inference threshold was set from training and keeps about k per token
        assert float(module.threshold.detach()) > 0
        assert 0.5 * k < l0 < 2 * k
    else:
        assert l0 <= k


def test_jumprelu_threshold_learns():
    recipe = make_recipe("jumprelu", **{"penalty.coefficient": 3e-2})
    t, metrics = train(recipe, 200, SparseSource())
    theta = t.finish().threshold
    start = recipe.penalty.initial_threshold
    assert (theta - start).abs().max() > 10 * start
    assert theta.std() > 0
    assert metrics[-1]["l0"] < metrics[0]["l0"]


def test_schedule_warms_up_and_decays():
    r = make_recipe("anthropic2024", **{"optimizer.warmup_steps": 10, "optimizer.lr": 1.0})
    lrs = [lr_at(r, s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[9] == 1.0
    assert lrs[79] == 1.0
    assert lrs[80] == pytest.approx(1.0)
    assert lrs[90] == pytest.approx(0.5)
    assert lrs[99] == pytest.approx(0.05)


def test_bad_batch_shape_and_length():
    t = Trainer(make_recipe("bricken2023"), D_IN, total_steps=10)
    with pytest.raises(ShapeMismatchError) as info:
        t.step(torch.zeros(8, D_IN + 1))
    assert str(D_IN) in str(info.value)
    assert str(D_IN + 1) in str(info.value)
    with pytest.raises(RecipeError):
        Trainer(make_recipe("bricken2023"), D_IN, total_steps=0)


def test_ghost_grads_move_only_dead_features_encoders():
    recipe = make_recipe("bricken2023", **{"resampling.kind": "ghost_grads", "resampling.dead_window": 5})
    moved = {}
    for kind in ("ghost_grads", "none"):
        t = Trainer(recipe.model_copy(update={"resampling": recipe.resampling.model_copy(update={"kind": kind})}),
                    D_IN, total_steps=40)
        source = SparseSource()
        with torch.no_grad():  # features 0..7 can never fire: only ghost grads can reach them
            t.module.W_enc[:, :8] = 0.0
            t.module.b_enc[:8] = -0.5
        before = t.module.W_enc[:, :8].clone()
        metrics = [t.step(source()) for _ in range(30)]
        moved[kind] = float((t.module.W_enc[:, :8] - before).abs().max().detach())
    assert metrics[-1]["dead_frac"] >= 8 / D_DICT
    assert moved["none"] == 0.0
    assert moved["ghost_grads"] > 0.0


def test_single_process_group_matches_plain_run(tmp_path):
    """The all-reduce paths (gradients, firing, densities, threshold, input scale) under a gloo group of one."""
    import torch.distributed as dist

    recipe = make_recipe("farrell2024", **{"penalty.density_window": 5, "input_normalization": "sqrt_d"})
    plain, _ = train(recipe, 20, SparseSource())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        grouped, _ = train(recipe, 20, SparseSource())
    finally:
        dist.destroy_process_group()
    for a, b in zip(plain.module.parameters(), grouped.module.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert plain.input_scale == pytest.approx(grouped.input_scale)


def test_autocast_forward_trains_and_a_callers_autocast_region_sees_fresh_weights():
    """Stepping inside one long autocast region must equal the trainer's own autocast (no stale weight casts)."""
    recipe = make_recipe("marks2023")
    own = Trainer(recipe, D_IN, total_steps=60, autocast=torch.bfloat16)
    outer = Trainer(recipe, D_IN, total_steps=60)
    a, b = SparseSource(), SparseSource()
    losses = [own.step(a())["loss"] for _ in range(60)]
    batches = [b() for _ in range(60)]  # made outside: autocast would round the data's own matmul
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for x in batches:
            outer.step(x)
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    for p, q in zip(own.module.parameters(), outer.module.parameters()):
        assert torch.equal(p, q)
    assert own.module.W_enc.dtype == torch.float32


def test_the_recipes_autocast_is_the_trainers_and_a_resume_may_not_change_it():
    """autocast: bfloat16 in the recipe steps exactly as the explicit argument; an fp32 state is refused by it."""
    from_recipe = Trainer(make_recipe("topk", autocast="bfloat16"), D_IN, total_steps=5)
    explicit = Trainer(make_recipe("topk"), D_IN, total_steps=5, autocast=torch.bfloat16)
    plain = Trainer(make_recipe("topk"), D_IN, total_steps=5)
    a, b, c = SparseSource(), SparseSource(), SparseSource()
    for _ in range(5):
        from_recipe.step(a()), explicit.step(b()), plain.step(c())
    assert torch.equal(from_recipe.module.W_enc, explicit.module.W_enc)
    assert not torch.equal(from_recipe.module.W_enc, plain.module.W_enc)
    with pytest.raises(RecipeError) as info:
        from_recipe.load_state_dict(plain.state_dict())
    assert info.value.fields == ["autocast"]


def _rank_run(rank: int, world: int, store: str, name: str, steps: int, out: str) -> None:
    """One rank of a two-process gloo run: each rank steps on its half of every batch."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        t = Trainer(make_recipe(name, input_normalization="sqrt_d"), D_IN, total_steps=steps)
        source = SparseSource()
        if t.recipe.input_normalization != "none":
            t.estimate_input_scale(source(1024).chunk(world)[rank])
        for _ in range(steps):
            t.step(source().chunk(world)[rank])
        if rank == 0:
            torch.save({k: v.detach() for k, v in t.module.state_dict().items()}, out)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path):
    """Data parallel over two processes: b_dec init, input scale, gradients and firing all-reduced.

    Equal up to float summation order (Adam magnifies that slowly, hence few steps and a tight tolerance).
    """
    import torch.multiprocessing as mp

    steps = 10
    mp.start_processes(_rank_run, args=(2, str(tmp_path / "store"), "marks2023", steps, str(tmp_path / "w.pt")),
                       nprocs=2, start_method="fork")  # fork: no re-import of torch in the children
    parallel = torch.load(tmp_path / "w.pt", weights_only=True)
    single, _ = train(make_recipe("marks2023", input_normalization="sqrt_d"), steps, SparseSource())
    for key, value in single.module.state_dict().items():
        assert torch.allclose(value, parallel[key], atol=1e-6), key


@pytest.mark.parametrize("name", ["marks2023", "topk", "batchtopk", "jumprelu"])
def test_a_bf16_autocast_run_ends_within_the_stated_tolerance_of_float32(name):
    """BF16_TOLERANCE: the same 200 steps in bf16 autocast and float32, judged on held-out activations."""
    from training.trainer import BF16_TOLERANCE

    ends = []
    for precision in (None, torch.bfloat16):
        source = SparseSource()
        t = Trainer(make_recipe(name), D_IN, total_steps=200, autocast=precision)
        if t.recipe.input_normalization != "none":
            t.estimate_input_scale(source(1024))
        for _ in range(200):
            t.step(source())
        x = source(2048)
        module = t.finish()
        with torch.no_grad():
            ends.append((fvu(module, x), float((module(x).features > 0).sum(-1).float().mean())))
    (fvu32, l0_32), (fvu16, l0_16) = ends
    assert fvu32 < 0.5                                                  # a trained dictionary, not noise
    assert abs(fvu16 - fvu32) <= BF16_TOLERANCE["fvu"], (fvu32, fvu16)
    l0_tolerance = BF16_TOLERANCE["l0_relative_jumprelu" if name == "jumprelu" else "l0_relative"]
    assert abs(l0_16 - l0_32) <= l0_tolerance * l0_32, (l0_32, l0_16)


def test_a_state_saved_before_the_autocast_field_existed_still_resumes():
    """A field added later (autocast) is absent from older states: it counts as its default, not as a change."""
    t = Trainer(make_recipe("marks2023"), D_IN, total_steps=10)
    t.step(SparseSource()())
    state = t.state_dict()
    del state["recipe"]["autocast"]
    Trainer(make_recipe("marks2023"), D_IN, total_steps=10).load_state_dict(state)
    with pytest.raises(RecipeError) as info:                  # but a state that ran under bf16 is still refused
        Trainer(make_recipe("marks2023"), D_IN, total_steps=10).load_state_dict(
            {**state, "recipe": {**state["recipe"], "autocast": "bfloat16"}})
    assert "autocast" in info.value.fields
