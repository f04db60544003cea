"""benchmarks/bench_memory.py: one configuration measured in this process, at a tiny context."""

from __future__ import annotations

from benchmarks.bench_memory import child


def test_child_measures_a_configuration():
    row = child("pythia-70m", "bf16", context=4, repeats=1)
    assert row["params"] == "70M" and row["param_GB"] == 70_426_624 * 2 / 1e9  # Pythia-70m's parameters, 2 bytes
    assert row["rss_base_GB"] <= row["rss_built_GB"] <= row["peak_GB"]
    assert row["tokens/forward"] == 8 * 4 and row["harvest tok/s"] > 0 and row["full tok/s"] > 0
    assert row["harvest_hook"] == "gpt_neox.layers.3.mlp"
