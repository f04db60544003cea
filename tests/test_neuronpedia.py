"""Neuronpedia (dictionaries/neuronpedia.py): feature URLs from cards, `dictctl show` printing them, and the
upload files `dictctl export neuronpedia` writes from a card and a real dashboard site of the toy model."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dictionaries.dashboard import build_dashboard, token_batches
from dictionaries.dashboard_site import vocab_of, write_site
from dictionaries.formats import write_native
from dictionaries.neuronpedia import export_neuronpedia, neuronpedia_url, read_site, source_ids
from dictionaries.registry import load_registry

from helpers import make_dictionary

ROOT = Path(__file__).resolve().parents[1]


def _dictctl(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    return subprocess.run([sys.executable, "-m", "dictionaries.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_feature_urls_from_the_registry():
    reg = load_registry()
    assert neuronpedia_url(reg.get("gpt2/resid2/24576-jb").card, 7) == \
        "https://www.neuronpedia.org/gpt2-small/3-res-jb/7"
    assert neuronpedia_url(reg.get("pythia70m/resid3/32768-sfc").card) == \
        "https://www.neuronpedia.org/pythia-70m-deduped/3-res-sm"
    assert neuronpedia_url(reg.get("pythia70m/mlp3/8192").card, 1) is None  # no Neuronpedia source
    assert source_ids(reg.get("gemma2-2b/resid12/65536").card) == ("gemma-2-2b", "12-gemmascope-res-65k",
                                                                   "gemmascope-res-65k")


def test_dictctl_show_prints_the_feature_url_and_export_refuses_one_line():
    done = _dictctl("show", "gemma-2-2b/5-gemmascope-res-16k", "--feature", "123")
    assert done.returncode == 0, done.stderr
    assert "neuronpedia: https://www.neuronpedia.org/gemma-2-2b/5-gemmascope-res-16k/123" in done.stdout
    bad = _dictctl("export", "saedashboard", "gpt2/resid2/24576-jb", "--out", "x")
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "neuronpedia" in bad.stderr


@pytest.fixture(scope="module")
def site_and_card(tiny_neox, tokenizer, tmp_path_factory):
    """A native toy dictionary with a Neuronpedia id, and its dashboard site built from a few texts."""
    from training.toymodel import corpus_documents

    root = tmp_path_factory.mktemp("np")
    d = make_dictionary(64, 40, "gpt_neox.layers.0.mlp", kind="topk", seed=3)
    card = d.card.model_copy(update={"name": "toy/mlp0/40", "links": d.card.links.model_copy(
        update={"neuronpedia": "toy-neox/0-mlp-toy"})})
    write_native(d, root / "native", card=card)
    batches = token_batches(tokenizer, [t[:160] for t in corpus_documents()[:12]], tokens=10**6,
                            context_length=128, batch_size=4)
    write_site(build_dashboard(tiny_neox, d, batches, progress=False, top=4, samples=3), vocab_of(tokenizer),
               root / "site")
    return root


def test_export_writes_neuronpedia_records_from_card_and_dashboard(site_and_card, tmp_path):
    folder = export_neuronpedia(f"{site_and_card}/native", tmp_path / "out", dashboard=site_and_card / "site")
    assert folder == tmp_path / "out" / "toy-neox" / "0-mlp-toy"
    records = {n: json.loads((folder / f"{n}.jsonl").read_text()) for n in ("release", "model", "sourceset",
                                                                            "source")}
    assert records["source"]["id"] == "0-mlp-toy" and records["source"]["setName"] == "mlp-toy"
    assert records["sourceset"]["name"] == "mlp-toy" and records["model"]["id"] == "toy-neox"
    features = [json.loads(x) for x in gzip.decompress((folder / "features" / "batch-0.jsonl.gz").read_bytes())
                .decode().splitlines()]
    activations = [json.loads(x) for x in gzip.decompress((folder / "activations" / "batch-0.jsonl.gz")
                                                          .read_bytes()).decode().splitlines()]
    assert [f["index"] for f in features] == [str(i) for i in range(40)]
    site = read_site(site_and_card / "site")
    assert [f["frac_nonzero"] for f in features] == site["index"]["density"]
    views = site["shard_0000"]["features"]
    assert sum(len(v["top"]) for v in views) == len(activations)
    for f, view in zip(features, views):
        mine = [a for a in activations if a["index"] == f["index"]]
        assert f["maxActApprox"] == view["max"]
        if mine:  # the strongest context holds the feature's maximum, at its marked token
            assert mine[0]["maxValue"] == pytest.approx(view["max"])
            assert len(mine[0]["tokens"]) == len(mine[0]["values"])
        assert len(f["pos_str"]) == len(f["pos_values"]) > 0
        assert sum(f["freq_hist_data_bar_heights"]) == view["n"]  # every firing counted once
