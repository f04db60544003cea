"""Mirroring a registry entry: fetch its original dictionary_learning files from a loopback http.server
(hash-checked), convert to native, evaluate or say why not, publish to a local hub (real olah + real
huggingface_hub client) and pin the entry there."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
import yaml

from dictionaries.card import Card, Files, HookPoint, ModelRef, Stats, sha256_of
from dictionaries.registry import HubLocation, load_registry

REPO_ROOT = Path(__file__).resolve().parents[1]
D_IN, D_DICT = 8, 16


@pytest.fixture
def registry(tmp_path, monkeypatch) -> Path:
    """A writable copy of the packaged registry, made the one in use through DICTIONARIES_REGISTRY."""
    dest = tmp_path / "registry"
    dest.mkdir()
    shutil.copyfile(REPO_ROOT / "registry.yaml", dest / "registry.yaml")
    shutil.copytree(REPO_ROOT / "cards", dest / "cards")
    monkeypatch.setenv("DICTIONARIES_REGISTRY", str(dest / "registry.yaml"))
    return dest / "registry.yaml"


def make_card(files: Files) -> Card:
    return Card(name="toy/mlp0/16", architecture="relu", d_in=D_IN, d_dict=D_DICT, license="MIT",
                model=ModelRef(id="toy-org/tiny-neox"), files=files,
                hook=HookPoint(module="gpt_neox.layers.0.mlp", site="mlp", layer=0),
                stats=Stats(source="reported", reference="https://example.org/readme", l0=4.0))


def _dictionary_learning_folder(folder: Path) -> dict[str, torch.Tensor]:
    """ae.pt + config.json as dictionary_learning's trainSAE writes them for an AutoEncoder (its training
    keeps decoder columns at unit norm, so the features too are the original's, not only reconstructions)."""
    folder.mkdir(parents=True)
    torch.manual_seed(3)
    decoder = torch.randn(D_IN, D_DICT)
    state = {"bias": torch.randn(D_IN) * 0.1, "encoder.weight": torch.randn(D_DICT, D_IN) * 0.3,
             "encoder.bias": torch.randn(D_DICT) * 0.1, "decoder.weight": decoder / decoder.norm(dim=0)}
    torch.save(state, folder / "ae.pt")
    config = {"trainer": {"dict_class": "AutoEncoder", "trainer_class": "StandardTrainer",
                          "activation_dim": D_IN, "dict_size": D_DICT, "lr": 1e-3, "l1_penalty": 1e-3,
                          "warmup_steps": 1000, "resample_steps": None, "seed": 0, "device": "cpu", "layer": 0,
                          "lm_name": "toy-org/tiny-neox", "wandb_name": "StandardTrainer",
                          "submodule_name": "mlp_out_layer0"},
              "buffer": {"d_submodule": D_IN, "io": "out", "n_ctxs": 30, "ctx_len": 128,
                         "refresh_batch_size": 512, "out_batch_size": 8192, "device": "cpu"}}
    (folder / "config.json").write_text(json.dumps(config, indent=4))
    return state


@pytest.fixture
def url_entry(tmp_path, registry):
    """A registry entry whose dictionary_learning files are served by a loopback http.server."""
    served = tmp_path / "served"
    state = _dictionary_learning_folder(served / "toy" / "mlp_out_layer0")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/toy/mlp_out_layer0/"
    folder = served / "toy" / "mlp_out_layer0"
    card = make_card(Files(format="dictionary_learning", source=url, items=[
        {"path": n, "size": (folder / n).stat().st_size, "sha256": sha256_of(folder / n)}
        for n in ("ae.pt", "config.json")]))
    (registry.parent / "cards" / "toy" / "mlp0").mkdir(parents=True)
    (registry.parent / "cards" / "toy" / "mlp0" / "16.yaml").write_text(
        yaml.safe_dump(card.model_dump(mode="json", exclude_none=True), sort_keys=False))
    with open(registry, "a") as fh:
        fh.write(f"  toy/mlp0/16:\n    card: toy/mlp0/16.yaml\n    location:\n      kind: url\n      url: {url}\n")
    yield "toy/mlp0/16", url, state
    server.shutdown()
    server.server_close()


def _by_hand(state, x):
    """dictionary_learning's AutoEncoder: f = ReLU(W_e (x - bias) + b_e), x_hat = W_d f + bias."""
    f = torch.relu((x - state["bias"]) @ state["encoder.weight"].T + state["encoder.bias"])
    return f @ state["decoder.weight"].T + state["bias"], f


def test_mirror_of_url_entry_ends_pinned_and_loadable(url_entry, hub_env, registry):
    from dictionaries.loader import load_dictionary
    from dictionaries.mirror import mirror

    name, url, state = url_entry
    with pytest.warns(UserWarning, match="Not evaluated"):
        result = mirror(name, "org/mirrored", local_hub=hub_env)
    entry = load_registry().get(name)
    assert entry.location == HubLocation(repo="org/mirrored", revision=hub_env.head("org/mirrored"), subfolder=name)
    assert entry.card.files.format == "native" and entry.card.verified
    assert entry.card.provenance.original == url and entry.card.files.source == url
    assert entry.card.stats.source == "reported" and any("Not evaluated" in n for n in entry.card.provenance.notes)
    x = torch.randn(6, D_IN)
    with torch.no_grad():
        out = load_dictionary(name)(x)
    want_x, want_f = _by_hand(state, x)
    torch.testing.assert_close(out.features, want_f, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.reconstruction, want_x, rtol=1e-5, atol=1e-6)
    assert result.notes[-1].startswith("Not evaluated")


def test_mirror_runs_the_evaluator_and_says_when_no_model_loads(url_entry, local_hub, registry):
    from dictionaries.errors import ModelLoadError
    from dictionaries.mirror import mirror

    name, _, _ = url_entry
    seen = []

    def no_model(folder: Path):
        seen.append(sorted(p.name for p in folder.iterdir()))
        raise ModelLoadError("toy-org/tiny-neox", "the Hub cannot be reached")

    with pytest.warns(UserWarning, match="no model could be loaded"):
        result = mirror(name, "org/mirror-eval", local_hub=local_hub, evaluate=no_model, register=False)
    assert seen == [["card.json", "weights.safetensors"]]
    assert "cannot load model 'toy-org/tiny-neox'" in result.notes[-1]
    assert load_registry().get(name).location.kind == "url"  # register=False leaves the entry alone


