"""Tests of training/recipe.py: presets, overrides, validation of unknown and contradictory fields."""

from __future__ import annotations

import pytest

from dictionaries.errors import MissingFileError, RecipeError, UnknownPresetError
from dictionaries.recipe import Recipe
from dictionaries.registry import load_registry
from training.presets import PRESETS, preset, read_recipe_file, recipe_for, validate_recipe

REQUIRED = {"model": "org/model", "hook": {"module": "gpt_neox.layers.0.mlp", "site": "mlp", "layer": 0},
            "dataset": "text.txt", "tokens": 10_000, "d_dict": 64, "batch_size": 32, "buffer_contexts": 4,
            "context_length": 16}
K_FOR = {"topk": 4, "batchtopk": 4}


def _entries():
    """Every registry entry whose card holds a recipe."""
    return [e for e in load_registry().entries.values() if e.card.recipe is not None]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name):
    fields = preset(name, **REQUIRED, **({"k": K_FOR[name]} if name in K_FOR else {}))
    recipe = validate_recipe(fields)
    assert recipe.preset == name
    assert recipe.architecture == PRESETS[name]["architecture"]


def test_preset_overrides_merge_into_nested_parts():
    fields = preset("anthropic2024", **REQUIRED, **{"penalty.coefficient": 2.0, "optimizer": {"lr": 1e-3}})
    r = validate_recipe(fields)
    assert r.penalty.coefficient == 2.0
    assert r.penalty.kind == "l1"
    assert r.penalty.scale_by_decoder_norm is False  # the rest of penalty kept
    assert r.optimizer.lr == 1e-3
    assert r.optimizer.betas == (0.0, 0.999)
    assert r.model.id == "org/model"
    assert r.dataset.path == "text.txt"  # string shorthands


def test_presets_carry_their_papers_figures():
    b, m, a = (validate_recipe(preset(n, **REQUIRED)) for n in ("bricken2023", "marks2023", "anthropic2024"))
    assert (b.resampling.every, b.resampling.dead_window, b.resampling.encoder_scale) == (25_000, 12_500, 0.2)
    assert (m.resampling.every, m.batch_size) == (30_000, 32)  # batch given by the caller here
    assert PRESETS["marks2023"]["batch_size"] == 8192
    assert a.optimizer.betas[0] == 0.0
    assert a.prune_below == 0.99
    assert a.decoder_norm == "at_most_one"
    assert a.optimizer.decay_fraction == 0.2
    assert not a.pre_encoder_bias
    assert a.mse == "sum_dims"


def test_unknown_preset_suggests_close_names():
    with pytest.raises(UnknownPresetError) as info:
        preset("bricken2024")
    assert "bricken2023" in info.value.suggestions
    assert isinstance(info.value, KeyError)
    assert "bricken2023" in str(info.value)


@pytest.mark.parametrize("field, named", [("learning_rate", "learning_rate"), ("penalty.coef", "penalty.coef"),
                                          ("optimizer.beta", "optimizer.beta")])
def test_unknown_field_is_named(field, named):
    with pytest.raises(RecipeError) as info:
        preset("bricken2023", **{field: 1})
    assert info.value.fields == [named]
    assert named in str(info.value)


@pytest.mark.parametrize("name, fields, named", [
    ("topk", {}, {"architecture", "k"}),
    ("bricken2023", {"prune_below": 0.99}, {"prune_below", "decoder_norm"}),
    ("batchtopk", {"k": 4, "penalty.kind": "l1"}, {"penalty.kind", "architecture"}),
    ("bricken2023", {"penalty.kind": "none"}, {"penalty.kind", "architecture"}),
    ("bricken2023", {"penalty.aux_k": 8}, {"penalty.aux_k", "architecture"}),
    ("bricken2023", {"penalty.density_coefficient": 1.0}, {"penalty.density_coefficient", "penalty.kind"}),
    ("gated", {"resampling.kind": "ghost_grads"}, {"resampling.kind", "architecture"}),
    ("bricken2023", {"k": 4}, {"k", "architecture"}),
])
def test_contradictory_fields_are_named(name, fields, named):
    with pytest.raises(RecipeError) as info:
        validate_recipe(preset(name, **REQUIRED, **fields))
    assert set(info.value.fields) == named, info.value


def test_bad_value_names_the_field():
    with pytest.raises(RecipeError) as info:
        validate_recipe(preset("bricken2023", **{**REQUIRED, "optimizer.lr": -1.0}))
    assert info.value.fields == ["optimizer.lr"]


@pytest.mark.parametrize("entry", _entries(), ids=lambda e: e.name)
def test_recipe_for_every_registry_entry(entry):
    r = recipe_for(entry.card)
    assert r == entry.card.recipe
    small = recipe_for(entry.card, {"tokens": 65536, "model": "tiny/model", "dataset": "local.txt",
                                    "penalty.coefficient": 0.5})
    assert (small.tokens, small.model.id, small.dataset.path, small.penalty.coefficient) == (
        65536, "tiny/model", "local.txt", 0.5)
    assert small.hook == r.hook
    assert small.d_dict == entry.card.d_dict


@pytest.mark.parametrize("entry", _entries(), ids=lambda e: e.name)
def test_card_recipes_agree_with_their_preset(entry):
    """The generated cards' science fields are the preset's, except the coefficient each set chose."""
    r = entry.card.recipe
    want = validate_recipe(preset(r.preset, **{"model": "m", "hook": r.hook.model_dump(), "dataset": "d",
                                               "tokens": r.tokens, "d_dict": r.d_dict,
                                               "penalty.coefficient": r.penalty.coefficient}))
    for field in ("architecture", "pre_encoder_bias", "penalty", "optimizer", "decoder_norm", "resampling",
                  "input_normalization", "mse", "batch_size", "context_length"):
        assert getattr(r, field) == getattr(want, field), field


def test_recipe_for_refuses_contradictory_override_and_missing_recipe():
    card = _entries()[0].card
    with pytest.raises(RecipeError) as info:
        recipe_for(card, {"architecture": "topk"})
    assert "k" in info.value.fields
    with pytest.raises(RecipeError) as info:
        recipe_for(card, {"d_dcit": 3})
    assert info.value.fields == ["d_dcit"]
    assert "d_dict" in str(info.value)
    with pytest.raises(RecipeError):
        recipe_for(card.model_copy(update={"recipe": None}))
    with pytest.raises(RecipeError) as info:  # the card says 8192/32768 features; the recipe must agree
        recipe_for(card.model_copy(update={"d_dict": card.d_dict + 1}))
    assert info.value.fields == ["d_dict"]


def test_recipe_for_switches_preset_keeping_model_and_data():
    card = _entries()[0].card
    r = recipe_for(card, {"preset": "anthropic2024"})
    assert isinstance(r, Recipe)
    assert r.preset == "anthropic2024"
    assert r.decoder_norm == "at_most_one"
    assert r.hook == card.recipe.hook
    assert r.dataset == card.recipe.dataset


@pytest.mark.parametrize("content, error, words", [
    (None, MissingFileError, "missing file"),
    (b"tokens: [1,\n", RecipeError, "not UTF-8 YAML"),
    (b"tokens: 1 # caf\xe9\n", RecipeError, "not UTF-8 YAML"),
    (b"- tokens\n", RecipeError, "must hold a mapping"),
])
def test_a_recipe_file_that_cannot_be_read_names_itself(tmp_path, content, error, words):
    path = tmp_path / "recipe.yaml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=words) as info:
        read_recipe_file(path)
    assert str(path) in str(info.value)
    (tmp_path / "ok.yaml").write_text("tokens: 4096\n")
    assert read_recipe_file(tmp_path / "ok.yaml") == {"tokens": 4096}
