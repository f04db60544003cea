"""Pin states and pinning (dictionaries/pinning.py), end to end against the local Hub server: an unpinned entry
is pinned on this machine by its first load, `dictctl pin` (the real one, in a subprocess) rewrites its card
pinned, and neither pin moves when the repo gets a new commit."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from dictionaries.errors import UnverifiedFilesWarning
from dictionaries.files import sha256_of
from dictionaries.loader import load_dictionary
from dictionaries.pinning import local_pin, pin_state
from dictionaries.registry import Registry, load_registry

from helpers import make_folder

ROOT = Path(__file__).resolve().parents[1]
REPO, SUB, NAME = "toy-org/moving", "d", "toy/mlp0/16"


def _publish(hub, folder: Path, message: str) -> str:
    """Commit the folder's weights under SUB of the moving repo; the commit's sha."""
    return hub.commit(REPO, {f"{SUB}/weights.safetensors": folder / "weights.safetensors"}, message)


def _unpinned_registry(root: Path, card) -> Path:
    """A registry holding one entry that names its repo but no commit and no hashes."""
    (root / "cards" / "toy" / "mlp0").mkdir(parents=True)
    data = card.model_dump(mode="json", exclude_none=True)
    data["files"] = {"format": "native", "items": [{"path": "weights.safetensors"}]}
    (root / "cards" / "toy" / "mlp0" / "16.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    entry = {"card": "toy/mlp0/16.yaml", "location": {"kind": "hub", "repo": REPO, "revision": None,
                                                       "subfolder": SUB}}
    (root / "registry.yaml").write_text(yaml.safe_dump({"version": 1, "entries": {NAME: entry}}, sort_keys=False))
    return root / "registry.yaml"


@pytest.fixture
def moving(hub_env, tmp_path, monkeypatch):
    """(registry path, weights of the first commit, folder of a second version, its sha) with the first
    version committed; DICTIONARIES_REGISTRY points at the registry."""
    card, first = make_folder(tmp_path / "v1", seed=1)
    make_folder(tmp_path / "v2", seed=2)
    sha1 = _publish(hub_env, tmp_path / "v1", "first")
    reg = _unpinned_registry(tmp_path / "reg", card)
    monkeypatch.setenv("DICTIONARIES_REGISTRY", str(reg))
    return reg, first, tmp_path / "v2", sha1


def test_packaged_registry_pin_states():
    entries = load_registry().entries.values()
    assert {pin_state(e) for e in entries if e.card.files.format == "dictionary_learning"} == {"unhashed"}  # URL/zip
    unpinned = [e for e in entries if pin_state(e) == "unpinned"]
    assert len(unpinned) == 135 and all(e.location.revision is None for e in unpinned)


def test_first_load_pins_locally_and_the_load_does_not_move(moving, hub_env):
    reg, first, v2, sha1 = moving
    registry = Registry(reg)
    entry = registry.get(NAME)
    assert pin_state(entry) == "unpinned" and local_pin(entry) is None
    with pytest.warns(UnverifiedFilesWarning, match=f"pinned on this machine to .*@{sha1}"):
        d = load_dictionary(NAME, registry=registry)
    assert torch.equal(d.W_enc, first.W_enc)
    location, files = local_pin(entry)
    assert location.revision == sha1 and files[0].sha256 == sha256_of(v2.parent / "v1" / "weights.safetensors")
    sha2 = _publish(hub_env, v2, "second: the file changes")
    assert sha2 != sha1
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedFilesWarning)  # warned once: the second load is silent
        again = load_dictionary(NAME, registry=registry)
    assert torch.equal(again.W_enc, first.W_enc)


def _dictctl(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    return subprocess.run([sys.executable, "-m", "dictionaries.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_dictctl_pin_rewrites_the_card_and_the_pinned_load_does_not_move(moving, hub_env, tmp_path, monkeypatch):
    reg, first, v2, sha1 = moving
    listed = _dictctl("list")
    assert "unpinned" in listed.stdout
    done = _dictctl("pin", "toy/*", "-q")
    assert done.returncode == 0, done.stderr
    assert "pinned (was unpinned) toy/mlp0/16" in done.stdout
    entry = Registry(reg).get(NAME)
    assert entry.location.revision == sha1 and pin_state(entry) == "pinned"
    assert entry.card.files.items[0].sha256 == sha256_of(tmp_path / "v1" / "weights.safetensors")
    assert "Pinned on" in entry.card.provenance.notes[-1]
    assert " pinned " in _dictctl("list").stdout.replace("│", " ")
    _publish(hub_env, v2, "second: the file changes")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "fresh_home"))  # nothing cached: fetched at the pinned commit
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "fresh_home" / "hub"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedFilesWarning)
        d = load_dictionary(NAME, registry=Registry(reg))
    assert torch.equal(d.W_enc, first.W_enc)
    assert "already pinned" in _dictctl("pin", NAME, "-q").stdout


def test_dictctl_pin_bad_name_is_one_line(moving):
    done = _dictctl("pin", "toy/nothing/1")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "toy/nothing/1" in done.stderr
