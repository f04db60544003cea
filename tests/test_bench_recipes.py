"""The recipes benchmark's plumbing on tiny sizes (a random 2-layer model, a few thousand activations), the
scalings it applies to the presets, and its claim logic on hand-made rows."""

from __future__ import annotations

import json

import pytest

from benchmarks.recipes_claims import (
    FAILS,
    HOLDS,
    UNCLEAR,
    check_claims,
    compare_frontiers,
    dead_at_matched_l0,
    interpolate,
    paired_dead,
    pareto,
)


def _row(preset, value, l0, fvu, *, option="", dead=0.0, mse=None, loss_recovered=None):
    return {"preset": preset, "option": option, "knob": "k", "value": value, "l0": l0, "fvu": fvu,
            "mse": fvu / 10 if mse is None else mse, "loss_recovered": 1 - fvu if loss_recovered is None else
            loss_recovered, "dead_frac": dead}


def test_a_tiny_two_preset_two_knob_run_writes_rows_claims_and_a_plot(tmp_path, tiny_neox, tokenizer):
    from benchmarks.bench_recipes import TABLE_COLUMNS, Settings, StandIn, run_benchmark, table_rows
    from benchmarks.recipes_grid import KNOBS
    from training.toymodel import corpus_documents

    docs = corpus_documents()
    standin = StandIn(tiny_neox, tokenizer, docs[:120], docs[300:360])
    settings = Settings(out=tmp_path / "out", tokens=2048, batch_size=256, expansion=2, eval_tokens=256,
                        context_length=16, layer=1, presets=("bricken2023", "topk"), knobs=2,
                        grids={"topk": (4, 8)}, threads=1, progress=False)
    rows, claims, meta = run_benchmark(settings, standin)

    low, high = KNOBS["bricken2023"][1][:2]
    assert [(r["preset"], r["option"], r["value"]) for r in rows] == [
        ("bricken2023", "", low), ("bricken2023", "no resampling", low),
        ("bricken2023", "", high), ("bricken2023", "no resampling", high), ("topk", "", 4), ("topk", "", 8)]
    saved = json.loads((tmp_path / "out" / "recipes.json").read_text())
    assert len(saved["rows"]) == 6 and set(saved["phases_s"]) >= {"harvest", "train", "eval"}
    for row in saved["rows"]:
        assert {"preset", "knob", "value", "option", "l0", "mse", "fvu", "loss_recovered", "kl", "dead_frac",
                "tokens", "seconds", "scaling"} <= set(row)
        assert row["tokens"] == 2048 and 0 <= row["dead_frac"] <= 1 and row["scaling"]
    assert all(r["l0"] <= 4 + 1e-6 for r in rows if r["preset"] == "topk" and r["value"] == 4)
    # silent features counted on the held-out rows agree with evaluate()'s count on the same tokens (no pruning)
    assert all(r["pruned_frac"] == 0 and r["dead_frac"] == pytest.approx(r["dead_or_pruned_frac"]) for r in rows)
    saved_claims = json.loads((tmp_path / "out" / "claims.json").read_text())["claims"]
    assert len(saved_claims) == len(claims) >= 10
    for claim in saved_claims:
        assert {"claim", "verdict", "figures", "source"} <= set(claim)
        assert claim["verdict"] in (HOLDS, FAILS, UNCLEAR)
    farrell = [c for c in saved_claims if c["claim"].startswith("farrell2024")]
    assert all(c["verdict"] == UNCLEAR for c in farrell)  # not run: said, not guessed
    assert (tmp_path / "out" / "recipes_pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert list(table_rows(rows)[0]) == list(TABLE_COLUMNS)
    assert meta["stand_in"]["check"]["ce_increase"] and len(meta["stand_in"]["check"]["ce_increase"]) == 2


def test_each_preset_is_scaled_to_the_run_and_says_how():
    from benchmarks.recipes_grid import scale_preset
    from training.presets import PRESETS

    marks = scale_preset("marks2023", PRESETS["marks2023"], steps=500, batch_size=512, d_dict=1024, lr_factor=10)
    assert marks.overrides["resampling.every"] == 150 and marks.overrides["resampling.dead_window"] == 75
    assert marks.overrides["optimizer.warmup_steps"] == 5 and marks.overrides["optimizer.lr"] == pytest.approx(3e-3)
    farrell = scale_preset("farrell2024", PRESETS["farrell2024"], steps=500, batch_size=512, d_dict=1024,
                           lr_factor=10)
    assert farrell.overrides["penalty.density_window"] == 50
    assert farrell.overrides["penalty.density_floor"] == pytest.approx(1e-5 * 24)  # same summed floor
    batch = scale_preset("batchtopk", PRESETS["batchtopk"], steps=500, batch_size=512, d_dict=1024, lr_factor=1)
    assert batch.overrides["threshold_decay"] == pytest.approx(0.8)  # time constant 1% of training
    assert all(scale_preset(n, PRESETS[n], steps=500, batch_size=512, d_dict=1024, lr_factor=1).notes
               for n in PRESETS)


def test_frontier_interpolation_is_linear_in_log_l0_and_never_extrapolates():
    curve = [(10.0, 0.4), (100.0, 0.2)]
    assert interpolate(curve, 10 ** 1.5) == pytest.approx(0.3)
    assert interpolate(curve, 5.0) is None and interpolate(curve, 200.0) is None
    rows = [_row("a", 1, 10, 0.4), _row("a", 2, 20, 0.5), _row("a", 3, 40, 0.2)]
    assert pareto(rows, "fvu", higher=False) == [(10, 0.4), (40, 0.2)]  # (20, 0.5) is dominated


def test_a_frontier_that_dominates_holds_and_one_that_does_not_does_not():
    l1 = [_row("bricken2023", v, l0, fvu) for v, l0, fvu in ((1, 10, 0.30), (2, 30, 0.20), (3, 90, 0.10))]
    better = [_row("topk", k, l0, fvu - 0.05) for k, l0, fvu in ((8, 8, 0.35), (16, 16, 0.25), (32, 64, 0.15))]
    worse = [_row("topk", k, l0, fvu + 0.05) for k, l0, fvu in ((8, 8, 0.35), (16, 16, 0.25), (32, 64, 0.15))]
    crossing = [_row("topk", 8, 12, 0.20), _row("topk", 32, 80, 0.15)]  # better at low L0, worse at high
    assert compare_frontiers(better, l1, "fvu", higher=False)["verdict"] == HOLDS
    assert compare_frontiers(worse, l1, "fvu", higher=False)["verdict"] == FAILS
    assert compare_frontiers(crossing, l1, "fvu", higher=False)["verdict"] == FAILS
    assert compare_frontiers(better, l1, "loss_recovered", higher=True)["verdict"] == HOLDS
    far = [_row("topk", 8, 500, 0.01), _row("topk", 16, 900, 0.005)]
    assert compare_frontiers(far, l1, "fvu", higher=False)["verdict"] == UNCLEAR  # no overlap in L0
    figures = compare_frontiers(better, l1, "fvu", higher=False)["figures"]
    assert figures["overlap_l0"] == [10, 64] and figures["better_at"] == "9/9"


def test_dead_feature_claims_on_hand_made_rows():
    with_it = [_row("b", v, 20, 0.2, dead=d) for v, d in ((1, 0.01), (2, 0.02))]
    without = [_row("b", v, 20, 0.2, dead=d) for v, d in ((1, 0.10), (2, 0.30))]
    assert paired_dead(with_it, without)["verdict"] == HOLDS
    assert paired_dead(without, with_it)["verdict"] == FAILS
    none_dead = [_row("b", v, 20, 0.2) for v in (1, 2)]
    assert paired_dead(none_dead, none_dead)["verdict"] == UNCLEAR
    # a pair where both sides have a few dead features (under 1%) is no evidence either way
    few = [_row("b", 1, 20, 0.2, dead=0.003), _row("b", 2, 20, 0.2, dead=0.05)]
    more = [_row("b", 1, 20, 0.2, dead=0.003), _row("b", 2, 20, 0.2, dead=0.08)]
    assert paired_dead(few, more)["verdict"] == HOLDS
    assert paired_dead(few[:1], more[:1])["verdict"] == UNCLEAR
    fa = [_row("farrell2024", v, l0, 0.1, dead=0.01) for v, l0 in ((1, 10), (2, 40))]
    l1 = [_row("bricken2023", v, l0, 0.1, dead=0.3) for v, l0 in ((1, 12), (2, 50))]
    assert dead_at_matched_l0(fa, l1)["verdict"] == HOLDS
    assert dead_at_matched_l0(l1, fa)["verdict"] == FAILS


def test_the_farrell_claim_follows_seed_001s_comparison():
    l1 = [_row("bricken2023", v, l0, 0.2, mse=m, dead=0.15) for v, l0, m in ((1, 14.6, 1.1e-3), (2, 30, 8e-4))]
    fa = [_row("farrell2024", v, l0, 0.2, mse=m, dead=0.004) for v, l0, m in ((1, 13.76, 7.8e-4), (2, 35, 5e-4))]
    claims = {c["claim"][:40]: c for c in check_claims(l1 + fa)}
    mse_claim, dead_claim = (c for k, c in claims.items() if k.startswith("farrell2024"))
    assert mse_claim["verdict"] == HOLDS and mse_claim["figures"]["dominating_pairs"]
    assert dead_claim["verdict"] == HOLDS
