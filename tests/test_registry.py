"""Registry: every entry validates; look-up, aliases, suggestions, filters, globs; broken registries fail clearly."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import yaml

from dictionaries.card import Card, Files
from dictionaries.constants import ENV_REGISTRY
from dictionaries.errors import (
    CardError,
    InvalidArgumentError,
    MissingFileError,
    RegistryError,
    UnknownNameError,
)
from dictionaries.registration import register_entry
from dictionaries.registry import HubLocation, Registry, default_registry_path, load_registry

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = load_registry()
ENTRIES = sorted(REGISTRY.entries)
MODELS = {"pythia70m": ({"EleutherAI/pythia-70m-deduped"}, "gpt_neox."), "gpt2": ({"gpt2"}, "transformer.h."),
          "gemma2-2b": ({"google/gemma-2-2b"}, "model.layers."),
          "llama3.1-8b": ({"meta-llama/Llama-3.1-8B"}, "model.layers."),
          "llama3-8b": ({"meta-llama/Meta-Llama-3-8B"}, "model.layers.")}
"""Registry name prefix -> (the HF model ids its cards may name, the prefix of their hook modules)."""


@pytest.mark.parametrize("name", ENTRIES)
def test_entry_is_consistent(name):
    entry = REGISTRY.get(name)
    card = entry.card
    assert card.name == name
    model, site_layer, size = name.split("/")
    assert card.d_dict == int(size.split("-")[0])
    assert card.hook is not None
    assert site_layer == f"{card.hook.site}{'' if card.hook.layer is None else card.hook.layer}"
    model_ids, module_prefix = MODELS[model]
    assert card.hook.module.startswith(module_prefix)
    assert card.model is not None
    assert card.model.id in model_ids
    if card.files.format == "dictionary_learning":  # the entries this package's recipes regenerate
        assert card.recipe is not None
    if card.recipe is not None:
        assert card.recipe.hook == card.hook
        assert card.recipe.d_dict == card.d_dict
    if card.links.neuronpedia:  # the Neuronpedia id is also a name the entry answers to
        assert REGISTRY.get(card.links.neuronpedia) is entry
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
    assert len(REGISTRY.filter(model="EleutherAI/pythia-70m-deduped", layer=2)) == 6  # mlp x3, attn, resid x2
    assert {e.name.split("/")[0] for e in REGISTRY.filter(architecture="topk")} == {"llama3-8b", "pythia70m"}
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


def test_duplicate_name_in_flow_style_is_refused(tmp_path):
    """YAML keeps the last of two equal keys whatever the style; a flow mapping must not re-point a name."""
    path = copy_registry(tmp_path)
    text = path.read_text()
    hijack = ("entries: {'pythia70m/mlp0/8192': {card: pythia70m/mlp0/8192.yaml, location: {kind: url, "
              "url: 'https://attacker.example/x/'}}, ")
    body = text[text.index("entries:\n") + len("entries:\n"):]
    flow = yaml.safe_load("entries:\n" + body)["entries"]
    rest = ", ".join(f"'{name}': {yaml.safe_dump(item, default_flow_style=True).strip()}"
                     for name, item in flow.items())
    path.write_text(text[:text.index("entries:\n")] + hijack + rest + "}\n")
    with pytest.raises(CardError, match="listed twice"):
        Registry(path)


@pytest.mark.parametrize("where", ["absolute", "../outside.yaml"])
def test_an_entry_card_outside_cards_is_refused(tmp_path, where):
    """A card path naming a file outside cards/ (absolute, or leaving it) is refused, not read."""
    path = copy_registry(tmp_path)
    outside = tmp_path / "outside.yaml"
    shutil.copyfile(tmp_path / "cards" / "pythia70m" / "mlp1" / "8192.yaml", outside)
    where = str(outside) if where == "absolute" else where
    path.write_text(path.read_text().replace("card: pythia70m/mlp1/8192.yaml", f"card: {where}", 1))
    with pytest.raises(CardError, match="entries.pythia70m/mlp1/8192.card"):
        Registry(path)


def test_a_card_that_is_not_utf8_names_its_file(tmp_path):
    path = copy_registry(tmp_path)
    card = tmp_path / "cards" / "pythia70m" / "mlp1" / "8192.yaml"
    card.write_bytes(card.read_bytes() + b"# caf\xe9\n")
    with pytest.raises(CardError, match="not UTF-8") as info:
        Registry(path)
    assert info.value.path == str(card)


@pytest.mark.parametrize("criterion", [{"site": "tail"}, {"architecture": "lstm"}])
def test_filter_refuses_a_site_or_architecture_that_does_not_exist(criterion):
    """A typo would otherwise list nothing, as if no such dictionary existed."""
    with pytest.raises(InvalidArgumentError, match=next(iter(criterion.values()))):
        REGISTRY.filter(**criterion)


def test_registry_path_that_is_a_folder(tmp_path):
    with pytest.raises(RegistryError, match="is a folder"):
        Registry(tmp_path)


def test_missing_registry(tmp_path):
    with pytest.raises(RegistryError, match=ENV_REGISTRY):
        Registry(tmp_path / "nope.yaml")


# ---- references ---------------------------------------------------------------------------------
def test_resolve_every_kind_of_reference(tmp_path, monkeypatch):
    from dictionaries.references import card_of, resolve, resolve_one

    for sub in ("a1", "a2"):
        (tmp_path / sub).mkdir()
    monkeypatch.chdir(tmp_path)
    assert [r.entry.name for r in resolve("pythia70m/mlp3/8192")] == ["pythia70m/mlp3/8192"]
    assert len(resolve("pythia70m/mlp*/8192")) == 6
    assert [r.folder for r in resolve(str(tmp_path / "a*"))] == [tmp_path / "a1", tmp_path / "a2"]
    assert [r.folder for r in resolve("a1")] == [Path("a1")]           # an existing folder, not a name
    assert [r.hub for r in resolve("hf://org/repo/sub@main")] == ["hf://org/repo/sub@main"]
    assert len(resolve(["pythia70m/mlp0/8192", str(tmp_path / "a1")])) == 2
    with pytest.raises(UnknownNameError, match="matches 6 dictionaries"):
        resolve_one("pythia70m/mlp*/8192")
    with pytest.raises(MissingFileError, match="No such folder"):
        resolve("./not-here")
    with pytest.raises(MissingFileError, match="card.json"):
        card_of(str(tmp_path / "a1"))
    assert card_of("pythia70m/mlp3/8192").stats.l0 == pytest.approx(175.303)


# ---- writing entries --------------------------------------------------------------------------
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


# ---- the public releases (cards/releases.py) ---------------------------------------------------------
def test_releases_are_complete_and_answer_to_their_saelens_and_neuronpedia_ids():
    counts = {prefix: len(REGISTRY.filter(model=prefix)) for prefix in ("gpt2", "gemma2-2b", "llama3.1-8b",
                                                                        "llama3-8b")}
    assert counts == {"gpt2": 13, "gemma2-2b": 52, "llama3.1-8b": 32, "llama3-8b": 32}
    # resid_pre L is kept as the resid output of block L - 1, and resid_pre 0 as the embedding's
    assert REGISTRY.get("gpt2-small-res-jb/blocks.3.hook_resid_pre").name == "gpt2/resid2/24576-jb"
    assert REGISTRY.get("gpt2-small/0-res-jb").name == "gpt2/embed/24576-jb"
    assert REGISTRY.get("gpt2-small/12-res-jb").name == "gpt2/resid11/24576-jb"
    assert REGISTRY.get("gemma-scope-2b-pt-res-canonical/layer_3/width_65k/canonical").name == \
        "gemma2-2b/resid3/65536"
    assert REGISTRY.get("gemma-2-2b/3-gemmascope-res-16k").location.subfolder == "layer_3/width_16k/average_l0_59"
    assert REGISTRY.get("llama_scope_lxr_8x/l7r_8x").name == "llama3.1-8b/resid7/32768"
    assert REGISTRY.get("pythia-70m-deduped/4-att-sm").name == "pythia70m/attn4/32768-sfc"
    assert REGISTRY.get("EleutherAI/sae-pythia-70m-deduped-32k/layers.2").card.k == 16
    sfc = [e for e in REGISTRY.entries.values() if e.name.endswith("-sfc")]
    assert sum(bool(e.card.links.neuronpedia) for e in sfc) == 18  # all but the embedding's (no confirmed id)
    for e in REGISTRY.entries.values():
        if e.location.kind == "hub" and e.location.revision is None:
            assert not e.card.verified and e.card.provenance.original  # unpinned, the original named


def test_release_cards_are_what_the_generator_writes():
    """The cards on disk are cards/releases.py's output: regenerating changes nothing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_cards", ROOT / "cards" / "releases.py")
    make_cards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_cards)
    generated = [*make_cards.gpt2_res_jb(), *make_cards.gemma_scope(), *make_cards.llama_scope(),
                 *make_cards.eleuther_llama3(), *make_cards.eleuther_pythia()]
    assert len(generated) == 135
    for card, location in generated:
        entry = REGISTRY.get(card.name)
        assert (entry.card, entry.location) == (card, location), card.name
