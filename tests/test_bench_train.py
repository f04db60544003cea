"""benchmarks/bench_train.py: each peer's ratios are to the ours runs of the same precision beside it."""

from __future__ import annotations

from benchmarks.bench_train import _ratios


def _run(name: str, rate: float, precision: str = "fp32", peak: float = 100.0) -> dict:
    return {"run": name, "precision": precision, "steady_tokens_per_s": rate, "whole_tokens_per_s": rate,
            "peak_mb": peak}


def test_a_peer_is_compared_with_its_neighbours_and_the_evaluated_run():
    # two ours rows with equal contents: each must count once, at its own place
    rows = [_run("ours L1 (evaluated)", 10, peak=50), _run("dl", 5), _run("ours L1", 20), _run("sl", 10),
            _run("ours L1", 20), _run("ours L1", 40, "bf16"), _run("sl", 8, "bf16"), _run("ours L1", 60, "bf16")]
    _ratios(rows)
    assert rows[1]["ours_fp32_vs_this"] == 3.0                       # (10 + 20) / 2 / 5
    assert rows[3]["ours_fp32_vs_this"] == 2.0                       # (20 + 20) / 2 / 10
    assert rows[1]["ours_fp32_vs_this_whole"] == 2.0 and rows[1]["ours_fp32_vs_this_peak"] == 0.5
    assert rows[6]["ours_fp32_vs_this"] == 20 / 8                    # only the fp32 run before it
    assert "ours_bf16_vs_this" not in rows[6]                       # no bf16 run was evaluated
