"""Registry: every entry validates; look-up, aliases, suggestions, filters, globs; broken registries fail clearly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from dictionaries.errors import CardError, RegistryError, UnknownNameError
from dictionaries.constants import ENV_REGISTRY
from dictionaries.registry import Registry, default_registry_path, load_registry

REGISTRY = load_registry()
ENTRIES = sorted(REGISTRY.entries)


@pytest.mark.parametrize("name", ENTRIES)
def test_entry_is_consistent(name):
    entry = REGISTRY.get(name)
    card = entry.card
    assert card.name == name
    model, site_layer, size = name.split("/")
    assert card.d_dict == int(size.split("-")[0])
    assert card.hook is not None
    assert site_layer == f"{card.hook.site}{'' if card.hook.layer is None else card.hook.layer}"
    assert card.hook.module.startswith("gpt_neox.")
    assert card.model is not None
    assert card.model.id == "EleutherAI/pythia-70m-deduped"
    assert card.recipe is not None
    assert card.recipe.hook == card.hook
    assert card.recipe.d_dict == card.d_dict
    if card.stats is not None and card.stats.source == "reported":
        assert card.stats.reference.startswith("https://")
    for alias in card.aliases:
        assert REGISTRY.get(alias) is entry


def test_first_entries_are_present_with_reported_stats():
    for size, l0_layer3 in (("8192", 175.303), ("32768", 39.863)):
        card = REGISTRY.get(f"pythia70m/mlp3/{size}").card
        assert card.stats.source == "reported"
        assert card.stats.l0 == l0_layer3
        assert card.files.format == "dictionary_learning"
        assert not card.verified
    sfc = REGISTRY.filter(size=32768, site="attn")
    assert len(sfc) == 6
    assert all(e.location.kind == "hub_zip" for e in sfc)
    assert REGISTRY.get("pythia70m/embed/32768-sfc").layer is None


def test_unknown_name_suggests_close_names():
    with pytest.raises(UnknownNameError) as info:
        REGISTRY.get("pythia70m/mlp3/8129")
    assert "pythia70m/mlp3/8192" in info.value.suggestions
    assert "pythia70m/mlp3/8192" in str(info.value)
    assert isinstance(info.value, KeyError)


def test_lookup_is_case_insensitive_and_by_alias():
    assert REGISTRY.get("Pythia70m/MLP3/8192").name == "pythia70m/mlp3/8192"
    assert REGISTRY.get("marks2023/pythia70m/mlp3/0_8192").name == "pythia70m/mlp3/8192"


def test_filters_and_globs():
    assert {e.layer for e in REGISTRY.filter(model="pythia70m", site="mlp", size=8192)} == set(range(6))
    assert len(REGISTRY.filter(model="EleutherAI/pythia-70m-deduped", layer=2)) == 5  # mlp x3 sets, attn, resid
    assert REGISTRY.filter(architecture="topk") == []
    assert [e.name for e in REGISTRY.match("pythia70m/mlp*/8192")] == [f"pythia70m/mlp{i}/8192" for i in range(6)]
    with pytest.raises(UnknownNameError):
        REGISTRY.match("nothing/*/here")


def copy_registry(tmp_path: Path) -> Path:
    src = default_registry_path()
    shutil.copy(src, tmp_path / "registry.yaml")
    shutil.copytree(src.parent / "cards", tmp_path / "cards")
    return tmp_path / "registry.yaml"


def test_env_var_selects_registry(tmp_path, monkeypatch):
    path = copy_registry(tmp_path)
    monkeypatch.setenv(ENV_REGISTRY, str(path))
    assert default_registry_path() == path
    assert sorted(load_registry().entries) == ENTRIES


def _edit_card(path: Path, entry: str, **changes) -> Path:
    card_path = path.parent / "cards" / f"{entry}.yaml"
    data = yaml.safe_load(card_path.read_text())
    data.update(changes)
    card_path.write_text(yaml.safe_dump(data))
    return card_path


@pytest.mark.parametrize("changes,field,words", [
    ({"speed": 3}, "speed", "unknown field"),
    ({"d_in": "x"}, "d_in", "integer"),
    ({"name": "pythia70m/mlp3/9999"}, "name", "registry.yaml lists it as"),
])
def test_malformed_card_names_file_and_field(tmp_path, changes, field, words):
    path = copy_registry(tmp_path)
    card_path = _edit_card(path, "pythia70m/mlp3/8192", **changes)
    with pytest.raises(CardError) as info:
        Registry(path)
    assert info.value.path == str(card_path)
    assert info.value.field == field
    assert words in str(info.value)


def test_bad_revision_is_refused(tmp_path):
    path = copy_registry(tmp_path)
    text = path.read_text().replace("50a434461d36ed78d1b0b901944e6edc829f1dce", "main", 1)
    path.write_text(text)
    with pytest.raises(CardError, match="40-hex commit"):
        Registry(path)


def test_duplicate_name_is_refused(tmp_path):
    path = copy_registry(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("  pythia70m/mlp0/8192:"))
    path.write_text("".join(lines + lines[start:start + 5]))
    with pytest.raises(CardError, match="listed twice"):
        Registry(path)


def test_duplicate_alias_is_refused(tmp_path):
    path = copy_registry(tmp_path)
    _edit_card(path, "pythia70m/mlp2/8192", aliases=["marks2023/pythia70m/mlp3/0_8192"])
    with pytest.raises(RegistryError, match="used twice"):
        Registry(path)


def test_missing_card_file(tmp_path):
    path = copy_registry(tmp_path)
    (tmp_path / "cards" / "pythia70m" / "mlp1" / "8192.yaml").unlink()
    with pytest.raises(RegistryError, match="does not exist"):
        Registry(path)


def test_missing_registry(tmp_path):
    with pytest.raises(RegistryError, match=ENV_REGISTRY):
        Registry(tmp_path / "nope.yaml")
