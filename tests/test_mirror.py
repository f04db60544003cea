"""Mirroring a registry entry: fetch its original dictionary_learning files from a loopback http.server
(hash-checked), convert to native, evaluate or say why not, publish to a local hub (real olah + real
huggingface_hub client) and pin the entry there."""

from __future__ import annotations

import http.server
import json
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

from dictionaries.card import Card, Files, Stats
from dictionaries.files import sha256_of
from dictionaries.recipe import HookPoint, ModelRef
from dictionaries.registry import HubLocation, load_registry

D_IN, D_DICT = 8, 16


def make_card(files: Files, name: str = "toy/mlp0/16", d_in: int = D_IN, d_dict: int = D_DICT,
              model: str = "toy-org/tiny-neox") -> Card:
    return Card(name=name, architecture="relu", d_in=d_in, d_dict=d_dict, license="MIT",
                model=ModelRef(id=model), files=files,
                hook=HookPoint(module="gpt_neox.layers.0.mlp", site="mlp", layer=0),
                stats=Stats(source="reported", reference="https://example.org/readme", l0=4.0))


def _dictionary_learning_folder(folder: Path, d_in: int = D_IN, d_dict: int = D_DICT) -> dict[str, torch.Tensor]:
    """ae.pt + config.json as dictionary_learning's trainSAE writes them for an AutoEncoder (its training
    keeps decoder columns at unit norm, so the features too are the original's, not only reconstructions)."""
    folder.mkdir(parents=True)
    torch.manual_seed(3)
    decoder = torch.randn(d_in, d_dict)
    state = {"bias": torch.randn(d_in) * 0.1, "encoder.weight": torch.randn(d_dict, d_in) * 0.3,
             "encoder.bias": torch.randn(d_dict) * 0.1, "decoder.weight": decoder / decoder.norm(dim=0)}
    torch.save(state, folder / "ae.pt")
    config = {"trainer": {"dict_class": "AutoEncoder", "trainer_class": "StandardTrainer",
                          "activation_dim": d_in, "dict_size": d_dict, "lr": 1e-3, "l1_penalty": 1e-3,
                          "warmup_steps": 1000, "resample_steps": None, "seed": 0, "device": "cpu", "layer": 0,
                          "lm_name": "toy-org/tiny-neox", "wandb_name": "StandardTrainer",
                          "submodule_name": "mlp_out_layer0"},
              "buffer": {"d_submodule": d_in, "io": "out", "n_ctxs": 30, "ctx_len": 128,
                         "refresh_batch_size": 512, "out_batch_size": 8192, "device": "cpu"}}
    (folder / "config.json").write_text(json.dumps(config, indent=4))
    return state


def add_entry(registry: Path, card: Card, location: dict) -> str:
    """Write the card under cards/ and its line into registry.yaml; the entry's name."""
    path = registry.parent / "cards" / f"{card.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(card.model_dump(mode="json", exclude_none=True), sort_keys=False))
    block = yaml.safe_dump({card.name: {"card": f"{card.name}.yaml", "location": location}}, sort_keys=False)
    with open(registry, "a") as fh:
        fh.write("".join("  " + line for line in block.splitlines(keepends=True)))
    return card.name


def original_files(folder: Path, source: str) -> Files:
    return Files(format="dictionary_learning", source=source, items=[
        {"path": n, "size": (folder / n).stat().st_size, "sha256": sha256_of(folder / n)}
        for n in ("ae.pt", "config.json")])


@pytest.fixture
def served(tmp_path):
    """A loopback http.server serving tmp_path/served (a stand-in for baulab.us); (root, base URL)."""
    root = tmp_path / "served"
    root.mkdir()
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def url_entry(served, registry):
    """A registry entry whose dictionary_learning files are served over plain HTTP."""
    root, base = served
    folder = root / "toy" / "mlp_out_layer0"
    state = _dictionary_learning_folder(folder)
    url = f"{base}/toy/mlp_out_layer0/"
    name = add_entry(registry, make_card(original_files(folder, url)), {"kind": "url", "url": url})
    return name, url, state


def _by_hand(state, x):
    """dictionary_learning's AutoEncoder: f = ReLU(W_e (x - bias) + b_e), x_hat = W_d f + bias."""
    f = torch.relu((x - state["bias"]) @ state["encoder.weight"].T + state["encoder.bias"])
    return f @ state["decoder.weight"].T + state["bias"], f


def test_mirror_of_url_entry_ends_pinned_and_loadable(url_entry, hub_env, registry):
    from dictionaries.loader import load_dictionary
    from dictionaries.mirror import mirror

    name, url, state = url_entry
    result = mirror(name, "org/mirrored", local_hub=hub_env)
    entry = load_registry().get(name)
    assert entry.location == HubLocation(repo="org/mirrored", revision=hub_env.head("org/mirrored"), subfolder=name)
    assert entry.card.files.format == "native"
    assert entry.card.verified
    assert entry.card.provenance.original == url
    assert entry.card.files.source == url
    assert entry.card.stats.source == "reported"
    assert any("Not evaluated" in n for n in entry.card.provenance.notes)
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

    result = mirror(name, "org/mirror-eval", local_hub=local_hub, evaluate=no_model, register=False)
    assert seen == [["card.json", "weights.safetensors"]]
    assert result.notes[-1].startswith("Not evaluated when mirrored: no model could be loaded")
    assert "cannot load model 'toy-org/tiny-neox'" in result.notes[-1]
    assert load_registry().get(name).location.kind == "url"  # register=False leaves the entry alone




def test_mirror_of_a_member_of_a_hub_zip(tmp_path, hub_env, registry):
    """Like the `10_32768` set: ae.pt + config.json inside one zip in a Hub repo, pinned by commit and sha256."""
    import zipfile

    from dictionaries.loader import load_dictionary
    from dictionaries.mirror import mirror

    folder = tmp_path / "unzipped" / "dictionaries" / "toy" / "mlp_out_layer0" / "10_16"
    state = _dictionary_learning_folder(folder)
    archive = tmp_path / "dictionaries_toy_10.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f.relative_to(tmp_path / "unzipped").as_posix())
    sha = hub_env.commit("toy-org/toy-saes", {archive.name: archive}, "the zip")
    member = "dictionaries/toy/mlp_out_layer0/10_16/"
    location = {"kind": "hub_zip", "repo": "toy-org/toy-saes", "revision": sha, "filename": archive.name,
                "size": archive.stat().st_size, "sha256": sha256_of(archive), "member": member}
    original = f"hf://toy-org/toy-saes/{archive.name}@{sha}#{member}"
    name = add_entry(registry, make_card(original_files(folder, original), name="toy/mlp0/16-sfc"), location)
    mirror(name, "org/zip-mirror", local_hub=hub_env)
    entry = load_registry().get(name)
    assert entry.location.kind == "hub"
    assert entry.location.revision == hub_env.head("org/zip-mirror")
    assert entry.card.provenance.original == original
    x = torch.randn(5, D_IN)
    with torch.no_grad():
        out = load_dictionary(name)(x)
    torch.testing.assert_close(out.reconstruction, _by_hand(state, x)[0], rtol=1e-5, atol=1e-6)


def test_mirror_with_a_reachable_model_publishes_measured_stats_and_plots(served, tmp_path, hub_env, registry,
                                                                          tiny_neox, tokenizer):
    """The CLI's evaluator (training.evaluate) on a tiny GPT-NeoX saved to a folder: stats become measured and
    the density file and plot go up with the dictionary."""
    from dictionaries.cli_hub import _mirror_evaluator
    from dictionaries.mirror import mirror
    from training.toymodel import corpus_documents

    model = tmp_path / "model"
    tiny_neox.save_pretrained(model)
    tokenizer.save_pretrained(model)
    text = tmp_path / "eval.txt"
    text.write_text("\n\n".join(corpus_documents()[:20]))
    d_model = tiny_neox.config.hidden_size
    root, base = served
    folder = root / "toy" / "mlp_out_layer0"
    _dictionary_learning_folder(folder, d_in=d_model, d_dict=2 * d_model)
    url = f"{base}/toy/mlp_out_layer0/"
    card = make_card(original_files(folder, url), name=f"toy/mlp0/{2 * d_model}", d_in=d_model,
                     d_dict=2 * d_model, model=str(model))
    name = add_entry(registry, card, {"kind": "url", "url": url})
    evaluate, _ = _mirror_evaluator(False, dataset=str(text), tokens=256, context_length=32, batch_size=4,
                                    sensitivity=False, progress=False)
    result = mirror(name, "org/evaluated", local_hub=hub_env, evaluate=evaluate)
    entry = load_registry().get(name)
    assert entry.card.stats.source == "measured"
    assert entry.card.stats.l0 is not None
    assert result.notes[-1].startswith("evaluated")
    published = hub_env.repo_path("org/evaluated") / name
    assert {"card.json", "weights.safetensors", "README.md", "density.png"} <= {p.name for p in published.iterdir()}
    assert "![density](density.png)" in (published / "README.md").read_text()
    assert "| l0 |" in (published / "README.md").read_text()


def test_cli_mirror_pins_the_entry(url_entry, local_hub, registry, monkeypatch, capsys):
    from dictionaries import cli

    name, url, _ = url_entry
    monkeypatch.setattr(sys, "argv", ["dictctl", "mirror", name, "--repo", "org/cli-mirror", "--no-eval",
                                      "--local-hub", str(local_hub.root)])
    cli.main()  # returns normally on success (errors exit with code 1)
    out = capsys.readouterr().out
    head = local_hub.head("org/cli-mirror")
    assert f"revision: {head}" in out
    assert "Not evaluated when mirrored: --no-eval was given" in out
    entry = load_registry(registry).get(name)
    assert entry.location.revision == head
    assert entry.card.provenance.original == url
