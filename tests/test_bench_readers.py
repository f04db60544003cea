"""Tests of the readers benchmark's own plumbing (benchmarks/bench_readers.py) without SAELens: its release copies
are what this package's readers detect and read, the model and hook point taken from the release layout."""

from __future__ import annotations

import pytest

from benchmarks import bench_readers
from dictionaries.formats import read_folder

FORMATS = ["gemma_scope", "goodfire", "llama_scope", "llama_scope"]


@pytest.mark.parametrize("i", range(4))
def test_release_copies_are_read_as_their_release(tmp_path, i):
    case = bench_readers.cases()[i]
    for path, data in case["files"].items():
        (tmp_path / case["repo"] / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / case["repo"] / path).write_bytes(data)
    sub = case.get("subfolder", case["sae_id"])
    d = read_folder(tmp_path / case["repo"] / sub)
    assert d.card.files.format == FORMATS[i]
    assert d.card.hook is not None and d.card.model is not None
    f = d(bench_readers.inputs()).features
    assert 0 < float((f > 0).float().mean()) < 1
