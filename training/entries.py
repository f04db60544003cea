"""Which recipes a `dictctl train` call means, settled before torch is imported: registry entries (a name, alias
or glob) with their card recipes overridden, or one whole recipe file.

Reading the recipe file, resolving the names and validating every recipe need no torch, so bad input to
`train` (a typo in a name, a recipe file that does not parse or has an unknown field) answers in a fraction
of a second instead of after the 2-4 s it takes to import torch and transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dictionaries.errors import RecipeError, UnknownNameError
from dictionaries.recipe import Recipe
from dictionaries.references import resolve
from training.presets import preset, read_recipe_file, recipe_for, validate_recipe


def entry_recipes(ref: str | None, *, overrides: dict[str, Any] | None = None,
                  recipe_file: str | Path | None = None) -> tuple[list[Recipe], list[str] | None]:
    """(recipes, names): the entries `ref` names, each with its card recipe overridden; or, without `ref`, the
    whole recipe of `recipe_file` (names None: `train` names it from the recipe).

    `recipe_file` is a YAML mapping of recipe fields: overrides applied to each entry's recipe, or, without
    `ref`, a complete recipe. `overrides` (dotted keys allowed: `model.id`, `penalty.coefficient`) apply last.
    """
    fields = read_recipe_file(recipe_file) if recipe_file else {}
    update = {**fields, **(overrides or {})}
    if ref is None:  # a complete recipe: its preset's fields, then the file's, then the overrides
        if "preset" not in update:
            raise RecipeError(["preset"], f"{recipe_file} names no entry, so it must be a whole recipe with `preset`")
        rest = {k: v for k, v in update.items() if k != "preset"}
        return [validate_recipe(preset(update["preset"], **rest))], None
    found = resolve(ref)
    entries = [f.entry for f in found if f.entry is not None]
    if len(entries) != len(found):
        raise UnknownNameError(ref, [f.text for f in found if f.entry is None][:5],
                               problem="names folders, not registry entries (train regenerates registry entries; "
                                       "a folder's recipe trains with --recipe)")
    return [recipe_for(e.card, update) for e in entries], [e.name for e in entries]


def train_entries(ref: str | None, *, overrides: dict[str, Any] | None = None, recipe_file: str | Path | None = None,
                  out: str | Path = "trained", **kwargs: Any) -> list[Path]:
    """Train the registry entries `ref` names (or `recipe_file`'s whole recipe) from one pass (`entry_recipes`);
    other keyword arguments go to `training.run.train`, imported (with torch) only once the recipes are valid."""
    recipes, names = entry_recipes(ref, overrides=overrides, recipe_file=recipe_file)
    from training.run import train

    return train(recipes, names=names, out=out, **kwargs)
