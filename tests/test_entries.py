"""training/entries.py: which recipes a `train` call means (names, globs, a whole recipe file), settled before
torch is imported, so that bad input to `dictctl train` answers without it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dictionaries.errors import RecipeError, UnknownNameError
from dictionaries.registry import load_registry
from training.entries import entry_recipes

from helpers import HEAVY_IMPORTS_PROBE

ROOT = Path(__file__).resolve().parents[1]


def test_a_glob_means_every_entry_it_matches_with_the_overrides_last(tmp_path):
    (tmp_path / "fields.yaml").write_text("tokens: 50000\nseed: 7\n")
    recipes, names = entry_recipes("pythia70m/mlp*/8192", overrides={"tokens": 40960},
                                   recipe_file=tmp_path / "fields.yaml")
    registry = load_registry()
    assert names and names == [n for n in registry.entries if n.startswith("pythia70m/mlp") and
                               n.endswith("/8192")]
    for name, recipe in zip(names, recipes):
        card_recipe = registry.get(name).card.recipe
        assert recipe.tokens == 40960 and recipe.seed == 7                   # file, then the overrides
        assert recipe.hook == card_recipe.hook and recipe.d_dict == card_recipe.d_dict


def test_a_whole_recipe_file_is_one_recipe_named_later(tmp_path):
    (tmp_path / "whole.yaml").write_text("preset: topk\nk: 8\nd_dict: 64\ntokens: 1024\nbatch_size: 256\n"
                                         "model: {id: some/model}\ndataset: {path: corpus.txt}\n"
                                         "hook: {module: gpt_neox.layers.1, site: resid, layer: 1}\n")
    recipes, names = entry_recipes(None, recipe_file=tmp_path / "whole.yaml")
    assert names is None and [(r.architecture, r.k, r.d_dict) for r in recipes] == [("topk", 8, 64)]


def test_a_recipe_file_without_a_preset_needs_a_name(tmp_path):
    (tmp_path / "part.yaml").write_text("tokens: 1024\n")
    with pytest.raises(RecipeError) as info:
        entry_recipes(None, recipe_file=tmp_path / "part.yaml")
    assert info.value.fields == ["preset"]


def test_an_unknown_name_suggests_close_ones():
    with pytest.raises(UnknownNameError) as info:
        entry_recipes("pythia70m/mlp3/8193")
    assert "pythia70m/mlp3/8192" in str(info.value)


@pytest.mark.parametrize("args", [["train", "pythia70m/mlp3/8193"],
                                  ["train", "pythia70m/mlp3/8192", "--recipe", "{tmp}/unknown.yaml"],
                                  ["train", "pythia70m/mlp3/8192", "--recipe", "{tmp}/nowhere.yaml"]],
                         ids=["unknown-name", "unknown-field", "missing-file"])
def test_bad_train_input_is_one_line_without_importing_torch(tmp_path, args):
    (tmp_path / "unknown.yaml").write_text("learning_rate: 0.1\n")
    argv = [a.format(tmp=tmp_path) for a in args]
    done = subprocess.run([sys.executable, "-c", HEAVY_IMPORTS_PROBE, *argv], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.strip().splitlines()[-1] == "HEAVY:training"          # training.entries, and no torch
