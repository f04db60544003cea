"""Writing registry entries: several at once lose none, a card that breaks the registry is rolled back."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from dictionaries.card import Card, Files
from dictionaries.errors import RegistryError
from dictionaries.registry import register_entry
from dictionaries.registry import HubLocation, load_registry

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def registry(tmp_path) -> Path:
    dest = tmp_path / "registry"
    dest.mkdir()
    shutil.copyfile(REPO_ROOT / "registry.yaml", dest / "registry.yaml")
    shutil.copytree(REPO_ROOT / "cards", dest / "cards")
    return dest / "registry.yaml"


def card(name: str, aliases: list[str] = ()) -> Card:
    return Card(name=name, aliases=list(aliases), architecture="relu", d_in=4, d_dict=8,
                files=Files(items=[{"path": "weights.safetensors", "size": 1, "sha256": "0" * 64}]))


def location(i: int) -> HubLocation:
    return HubLocation(repo="org/many", revision=f"{i:040x}", subfolder=f"d{i}")


def test_concurrent_registrations_lose_no_entry(registry):
    names = [f"toy/mlp{i}/8" for i in range(8)]
    threads = [threading.Thread(target=register_entry, args=(card(n), location(i), registry))
               for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reg = load_registry(registry)
    for i, n in enumerate(names):
        assert reg.get(n).location == location(i)


def test_a_card_that_breaks_the_registry_is_rolled_back(registry):
    before = {p: p.read_bytes() for p in registry.parent.rglob("*") if p.is_file()}
    taken = next(iter(load_registry(registry).entries))
    with pytest.raises(RegistryError, match="used twice"):
        register_entry(card("toy/mlp0/8", aliases=[taken]), location(0), registry)
    after = {p: p.read_bytes() for p in registry.parent.rglob("*") if p.is_file()}
    assert after == before
