"""Shared fixtures: tiny models built in-process, the registry, temporary HF caches."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests are skipped where no CUDA device exists."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    """The toy byte-level BPE tokenizer (vocab 1024) trained on Python's docs."""
    from training.toymodel import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Python's own docs as one text file (the offline training corpus)."""
    from training.toymodel import corpus_documents

    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(corpus_documents()))
    return path


@pytest.fixture(scope="session")
def tiny_neox():
    """A 2-layer, d_model 64 GPT-NeoX with Pythia's module names and seeded random weights (eval mode)."""
    from training.toymodel import build_model

    return build_model()


@pytest.fixture(scope="session")
def toy_folder(tmp_path_factory, tiny_neox, tokenizer):
    """The tiny GPT-NeoX and its tokenizer saved as a from_pretrained folder (what --model takes)."""
    folder = tmp_path_factory.mktemp("toy-neox")
    tiny_neox.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _isolated_hf(tmp_path, monkeypatch):
    """Every test gets its own HF cache and no route to the real Hub."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing answers


@pytest.fixture(scope="session")
def local_hub(tmp_path_factory):
    """A started `olah` server on a free loopback port serving git repos under a temporary folder.

    Commit to it with `local_hub.commit("org/name", {"path": b"..."}, "message") -> sha`.
    """
    from dictionaries.localhub import LocalHub

    hub = LocalHub(tmp_path_factory.mktemp("local_hub")).start()
    yield hub
    hub.stop()


@pytest.fixture
def hub_env(local_hub, monkeypatch):
    """HF_ENDPOINT pointed at the local hub (the per-test HF cache of `_isolated_hf` stays)."""
    monkeypatch.setenv("HF_ENDPOINT", local_hub.endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return local_hub


def pytest_configure(config):
    """One torch thread: the tests' tensors are tiny, and on a 2-core machine threads only contend."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A writable copy of the packaged registry, made the one in use through DICTIONARIES_REGISTRY."""
    import shutil

    from dictionaries.registry import default_registry_path

    src = default_registry_path()
    dest = tmp_path / "registry"
    dest.mkdir()
    shutil.copyfile(src, dest / "registry.yaml")
    shutil.copytree(src.parent / "cards", dest / "cards")
    monkeypatch.setenv("DICTIONARIES_REGISTRY", str(dest / "registry.yaml"))
    return dest / "registry.yaml"


@pytest.fixture(scope="session")
def models(tiny_neox, tokenizer):
    """Each family's raw transformers model (GPT-NeoX, GPT-2, Llama) and its nnsight wrapping."""
    from dictionaries.attachment import wrap_model

    from helpers import gpt2_model, llama_model

    raw = {"neox": tiny_neox, "gpt2": gpt2_model(), "llama": llama_model()}
    return {k: (m, wrap_model(m, tokenizer)) for k, m in raw.items()}
