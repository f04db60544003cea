"""Tests of the writers benchmark's own plumbing (benchmarks/bench_writers.py, peer_loads.py) without any peer
installed: the dictionaries it builds fire partly, the verdict, and the child's error path. The comparisons
themselves run in `python -m benchmarks writers`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from benchmarks import bench_writers, peer_loads


@pytest.mark.parametrize("name", sorted(bench_writers.KINDS))
def test_built_dictionaries_fire_partly(name):
    kind, pre = bench_writers.KINDS[name]
    d = bench_writers.build(kind, pre, seed=0)
    f = d(bench_writers.inputs()).features
    assert 0 < float((f > 0).float().mean()) < 1


def test_verdict_and_not_run_rows():
    d = bench_writers.build("topk", True, seed=0)
    ours = d(bench_writers.inputs())
    item = {"arch": "topk", "how": "x"}
    same = {"features": ours.features.clone(), "reconstruction": ours.reconstruction.clone()}
    assert bench_writers.row("saelens", item, ours, same)["verdict"] == "equal"
    off = {**same, "reconstruction": same["reconstruction"] + 1e-2}
    assert bench_writers.row("saelens", item, ours, off)["verdict"] == "differs"
    wrong = {**same, "features": same["features"][:, :3]}
    assert bench_writers.row("saelens", item, ours, wrong)["features max |diff|"] == float("inf")
    assert bench_writers.row("saelens", item, ours, "not installed: x")["verdict"] == "not run: not installed: x"


def test_peer_loads_writes_one_error_line_per_failing_item(tmp_path):
    save_file({"x": torch.zeros(2, 4)}, tmp_path / "x.safetensors")
    (tmp_path / "job.json").write_text(json.dumps({"peer": "saelens", "items": [{"name": "a", "path": "nowhere"}]}))
    peer_loads.main(tmp_path)  # what the peer's interpreter runs; here no sae_lens imports, so each item fails
    error = (tmp_path / "a.error").read_text()
    assert error and "\n" not in error and not (tmp_path / "a.safetensors").exists()
