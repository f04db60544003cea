"""Cards: strict validation, every field documented, errors that name the file and the field."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import ValidationError

from dictionaries.card import Card, card_schema, parse_card, read_card
from dictionaries.errors import CardError
from dictionaries.files import sha256_of
from dictionaries.formats import file_entry
from dictionaries.recipe import Recipe
from dictionaries.registry import load_registry

ENTRIES = sorted(load_registry().entries)


def minimal_card(**over) -> dict:
    card = {"name": "toy/mlp1/64", "architecture": "relu", "d_in": 16, "d_dict": 64,
            "files": {"items": [{"path": "weights.safetensors"}]}}
    card.update(over)
    return card


@pytest.mark.parametrize("path", ["../weights.safetensors", "a/../../b", "/etc/passwd", "~/x", "C:/x", "a//b",
                                  "./a", "a\\b", ""])
def test_a_file_path_leaving_the_folder_is_refused(path):
    with pytest.raises(CardError, match="files.items.0.path"):
        parse_card(minimal_card(files={"items": [{"path": path}]}), "x.yaml")


def test_minimal_card_defaults():
    card = parse_card(minimal_card(), "x.yaml")
    assert card.files.format == "native"
    assert not card.verified
    assert card.pre_encoder_bias is True


@pytest.mark.parametrize("bad,field,words", [
    ({"colour": "red"}, "colour", "unknown field"),
    ({"d_in": "wide"}, "d_in", "integer"),
    ({"d_dict": -3}, "d_dict", "greater than 0"),
    ({"architecture": "sparse"}, "architecture", "relu"),
    ({"architecture": "topk"}, "<root>", "needs `k`"),
    ({"k": 4}, "<root>", "only for topk"),
    ({"files": {"items": [{"path": "w", "sha256": "abc"}]}}, "files.items.0.sha256", "64"),
    ({"stats": {"source": "reported", "l0": 3.0}}, "stats", "reference"),
    ({"dtype": "float128"}, "dtype", "float32"),           # a free string would fail later, inside torch
    ({"dtype": "int32"}, "dtype", "bfloat16"),
    ({"d_in": 10**30}, "d_in", "less than or equal"),        # torch shapes are int64
    ({"d_dict": 2**31}, "d_dict", "less than or equal"),
    ({"files": {"items": [{"path": "w", "size": -1}]}}, "files.items.0.size", "greater than or equal to 0"),
])
def test_invalid_card_names_file_field_problem(bad, field, words):
    with pytest.raises(CardError) as info:
        parse_card(minimal_card(**bad), "cards/toy.yaml")
    err = info.value
    assert err.path == "cards/toy.yaml"
    assert err.field.startswith(field) or field in err.field
    assert words in str(err)
    assert isinstance(err, ValueError)


def test_card_is_frozen():
    card = parse_card(minimal_card(), "x")
    with pytest.raises(ValidationError):
        card.d_in = 3  # type: ignore[misc]


def test_read_card_reports_bad_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(CardError, match="not valid YAML"):
        read_card(path)


@pytest.mark.parametrize("content, words", [(b'{"name": "caf\xe9"}', "not UTF-8"), (None, "cannot be read")])
def test_read_card_reports_a_file_it_cannot_read(tmp_path, content, words):
    path = tmp_path / "card.json"
    if content is None:
        path.mkdir()  # a folder where the card should be
    else:
        path.write_bytes(content)
    with pytest.raises(CardError, match=words) as info:
        read_card(path)
    assert info.value.path == str(path)


def test_recipe_dtype_is_one_of_the_float_types():
    base = {"preset": "x", "model": {"id": "m"}, "hook": {"module": "a.b", "site": "mlp", "layer": 0},
            "dataset": {"path": "d"}, "tokens": 10, "d_dict": 8, "batch_size": 8}
    assert Recipe.model_validate({**base, "dtype": "bfloat16"}).dtype == "bfloat16"
    with pytest.raises(ValidationError, match="dtype"):
        Recipe.model_validate({**base, "dtype": "float8"})


def test_json_round_trip(tmp_path):
    card = parse_card(minimal_card(aliases=["a"], links={"paper": "p"}), "x")
    path = tmp_path / "card.json"
    path.write_text(card.to_json())
    assert read_card(path) == card


def test_schema_documents_every_field():
    """Every field of every model in the schema carries a description (from its docstring)."""
    schema = card_schema()
    models = {"Card": schema, **schema["$defs"]}
    undocumented = [f"{m}.{f}" for m, s in models.items() for f, p in s.get("properties", {}).items()
                    if not p.get("description")]
    assert undocumented == []
    assert "Recipe" in schema["$defs"]


def test_file_entry_hashes(tmp_path):
    path = tmp_path / "sub" / "w.bin"
    path.parent.mkdir()
    path.write_bytes(b"abc")
    entry = file_entry(path, tmp_path)
    assert entry.path == "sub/w.bin"
    assert entry.size == 3
    assert entry.sha256 == sha256_of(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_recipe_rejects_contradictions():
    base = {"preset": "x", "model": {"id": "m"}, "hook": {"module": "a.b", "site": "mlp", "layer": 0},
            "dataset": {"path": "d"}, "tokens": 10, "d_dict": 8, "batch_size": 8}
    Recipe.model_validate(base)
    with pytest.raises(ValueError, match="no step"):  # fewer tokens than one batch: nothing would be trained
        Recipe.model_validate({**base, "tokens": 4})
    with pytest.raises(ValueError, match="needs `k`"):
        Recipe.model_validate({**base, "architecture": "topk"})
    with pytest.raises(ValueError, match="prune_below"):
        Recipe.model_validate({**base, "prune_below": 0.99})
    with pytest.raises(ValueError, match="buffer"):
        Recipe.model_validate({**base, "buffer_contexts": 1, "context_length": 8, "batch_size": 64})


@pytest.mark.parametrize("name", ENTRIES)
def test_registry_cards_round_trip_through_json(name):
    card = load_registry().get(name).card
    assert Card.model_validate(json.loads(card.to_json())) == card
    # and the YAML on disk says the same as the validated card (nothing dropped silently)
    assert yaml.safe_load(card.to_json())["name"] == name
