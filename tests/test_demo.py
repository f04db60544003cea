"""The README's main command, end to end: `run_demo` on a fresh work folder (toy model pretrained here)."""

from __future__ import annotations

import json

import pytest

from dictionaries.demo import run_demo
from dictionaries.registry import load_registry


@pytest.mark.slow
def test_demo_runs_the_whole_loop_offline(tmp_path, monkeypatch):
    # run_demo points these at its own hub and registry; monkeypatch restores them after the test
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("DICTIONARIES_REGISTRY", str(load_registry().path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the demo must not need it unset beforehand
    lines: list[str] = []
    result = run_demo(tmp_path, tokens=40_960, say=lines.append, progress=False)
    text = "\n".join(lines)
    for step in range(1, 8):
        assert f"[{step}/7]" in text
    assert "dictctl train pythia70m/mlp3/8192" in lines[-1]          # ends with the Pythia commands
    card = json.loads((result.folder / "card.json").read_text())
    assert card["stats"]["source"] == "measured"
    assert card["stats"]["l0"] <= 16.0 + 1e-6
    assert 0.0 < card["stats"]["frac_loss_recovered"] <= 1.0
    assert (result.folder / "density.png").stat().st_size > 1000
    registry = load_registry(result.folder.parents[3] / "registry" / "registry.yaml")
    entry = registry.get(result.name)                               # registered, pinned to the local commit
    assert entry.location.kind == "hub"
    assert len(entry.location.revision) == 40
    assert result.top_features
    assert all(peak > 0 for _, peak, _ in result.top_features)
