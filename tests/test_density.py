"""training/density.py: the density summary, its file and its histogram."""

from __future__ import annotations

import pytest
import torch

from training.density import (
    DEAD_LOG10,
    format_density,
    log10_density,
    plot_density,
    read_density,
    save_density,
    summarize_density,
)


def test_summary_on_hand_built_frequencies():
    freq = torch.tensor([0.0, 0.0, 1e-3, 1e-2, 0.5, 0.2, 1e-4])
    s = summarize_density(freq)
    assert s == {"features": 7.0, "dead": 2.0, "above_1e-1": 2.0, "median_log10": pytest.approx(-3.0)}
    logs = log10_density(freq)
    assert logs[:2].tolist() == [DEAD_LOG10, DEAD_LOG10]
    assert logs[2:].tolist() == pytest.approx([-3, -2, torch.log10(torch.tensor(0.5)).item(), -0.69897, -4], abs=1e-5)
    assert format_density(s) == "2 dead of 7 features, 2 above 1e-1, median log10 density -3.00"


def test_density_file_round_trip_and_png(tmp_path):
    freq = torch.rand(50, generator=torch.Generator().manual_seed(0)) ** 4
    freq[:5] = 0
    save_density(freq, tmp_path)
    assert torch.equal(read_density(tmp_path), freq.float())
    png = plot_density(freq, tmp_path / "density.png", title="t")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5000
