"""Named training recipes (DESIGN.md section 6) and the validated `Recipe` a run trains from.

The `Recipe` model itself lives in `dictionaries/card.py` because it is a card's `recipe` section; here are
the presets that fill its science fields (penalty, optimiser, decoder-norm rule, resampling, normalisation)
and the functions that build a recipe from a preset or from a card with overrides. A preset holds only
the fields its paper fixes; model, hook point, dataset, tokens and d_dict come from the card or the caller.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dictionaries.card import Card
from dictionaries.errors import MissingFileError, RecipeError, UnknownPresetError
from dictionaries.recipe import Optimizer, Penalty, Recipe, Resampling

__all__ = ["PRESETS", "Optimizer", "Penalty", "Recipe", "Resampling", "preset", "recipe_for", "validate_recipe"]

# Bricken et al. 2023, "Towards Monosemanticity": L1 (sum over features) + MSE (mean over elements),
# pre-encoder bias, unit-norm decoder columns, resampling at 25k/50k/75k/100k of features dead for 12.5k steps.
_BRICKEN2023: dict[str, Any] = {
    "architecture": "relu",
    "pre_encoder_bias": True,
    "penalty": {"kind": "l1", "coefficient": 1e-3},
    "optimizer": {"lr": 1e-4, "betas": (0.9, 0.999), "warmup_steps": 1000, "decay_fraction": 0.0},
    "decoder_norm": "unit",
    "resampling": {"kind": "anthropic", "every": 25_000, "dead_window": 12_500, "inputs": 819_200,
                   "encoder_scale": 0.2},
    "input_normalization": "none",
    "mse": "mean",
}

PRESETS: dict[str, dict[str, Any]] = {
    "bricken2023": _BRICKEN2023,
    # Marks & Mueller 2023 (dictionary_learning sets 0_8192 / 1_32768): Bricken's recipe, resampling every 30k
    # of 100k steps (dictionary_learning counts a feature dead when it did not fire in the second half of
    # the period, hence 15k), batch 8192, context 128, lr 1e-3 with a 1k-step linear warm-up.
    "marks2023": {**_BRICKEN2023,
                  "optimizer": {"lr": 1e-3, "betas": (0.9, 0.999), "warmup_steps": 1000, "decay_fraction": 0.0},
                  "resampling": {**_BRICKEN2023["resampling"], "every": 30_000, "dead_window": 15_000},
                  "batch_size": 8192, "context_length": 128},
    # Anthropic, "Circuits Updates - February 2024" (training SAEs): beta1 = 0, decoder norm <= 1 then prune
    # below 0.99, no pre-encoder bias, inputs scaled to mean norm sqrt(d_in), MSE summed over dimensions,
    # plain L1 on f (with norms free to shrink below 1, the L1 pulls the norms of used features up to 1, so
    # those left below 0.99 are the unused ones that pruning removes; weighting the L1 by the decoder norm
    # would make the penalty invariant to that scale and let every norm drift, see
    # penalty.scale_by_decoder_norm), LR decays linearly to 0 over the last 20%. Ghost grads (Resampling.kind
    # ghost_grads) and the tanh penalty (penalty.kind tanh) are options on top of it.
    "anthropic2024": {
        "architecture": "relu", "pre_encoder_bias": False,
        "penalty": {"kind": "l1", "coefficient": 5.0, "scale_by_decoder_norm": False},
        "optimizer": {"lr": 5e-5, "betas": (0.0, 0.999), "warmup_steps": 1000, "decay_fraction": 0.2},
        "decoder_norm": "at_most_one", "prune_below": 0.99,
        "resampling": {"kind": "none"},
        "input_normalization": "sqrt_d", "mse": "sum_dims",
    },
    # Farrell 2024: approximate L0 (sum_i mean_b f/(f+eps)) plus a minimum-density term with floor 1e-5 over a
    # window of steps; the density term takes the place of resampling.
    "farrell2024": {**_BRICKEN2023,
                    "penalty": {"kind": "approx_l0", "coefficient": 1e-3, "l0_eps": 1e-3, "density_floor": 1e-5,
                                "density_coefficient": 1e-2, "density_window": 1000},
                    "resampling": {"kind": "none"}},
    # Gao et al. 2024, "Scaling and evaluating sparse autoencoders": TopK, unit-norm decoder, AuxK with
    # k_aux = 512, coefficient 1/32, a feature dead after 10M tokens without firing. `k` must be given.
    "topk": {
        "architecture": "topk", "pre_encoder_bias": True,
        "penalty": {"kind": "none", "coefficient": 0.0, "aux_k": 512, "aux_coefficient": 1 / 32,
                    "aux_dead_tokens": 10_000_000},
        "optimizer": {"lr": 2e-4, "betas": (0.9, 0.999), "warmup_steps": 1000, "decay_fraction": 0.0},
        "decoder_norm": "unit", "resampling": {"kind": "none"}, "input_normalization": "none", "mse": "mean",
    },
    # Bussmann et al. 2024, "BatchTopK sparse autoencoders": top k*batch over the batch in training, a global
    # threshold (running average of the smallest kept activation) at inference.
    "batchtopk": {
        "architecture": "batchtopk", "pre_encoder_bias": True,
        "penalty": {"kind": "none", "coefficient": 0.0, "aux_k": 512, "aux_coefficient": 1 / 32,
                    "aux_dead_tokens": 10_000_000},
        "optimizer": {"lr": 2e-4, "betas": (0.9, 0.999), "warmup_steps": 1000, "decay_fraction": 0.0},
        "decoder_norm": "unit", "resampling": {"kind": "none"}, "input_normalization": "none", "mse": "mean",
        "threshold_decay": 0.999,
    },
    # Rajamanoharan et al. 2024b, "Jumping ahead" (JumpReLU): L0 penalty through straight-through estimators
    # with a rectangle kernel of bandwidth 1e-3, thresholds start at 1e-3, inputs normalised, beta1 = 0.
    "jumprelu": {
        "architecture": "jumprelu", "pre_encoder_bias": False,
        "penalty": {"kind": "l0", "coefficient": 1e-3, "bandwidth": 1e-3, "initial_threshold": 1e-3},
        "optimizer": {"lr": 7e-5, "betas": (0.0, 0.999), "warmup_steps": 1000, "decay_fraction": 0.0},
        "decoder_norm": "unit", "resampling": {"kind": "none"}, "input_normalization": "sqrt_d",
        "mse": "sum_dims",
    },
    # Rajamanoharan et al. 2024a, "Improving dictionary learning with gated sparse autoencoders": L1 on the
    # gate's ReLU'd pre-activations plus the auxiliary reconstruction from the gate through a frozen decoder.
    "gated": {
        "architecture": "gated", "pre_encoder_bias": True,
        "penalty": {"kind": "l1", "coefficient": 1e-3},
        "optimizer": {"lr": 5e-5, "betas": (0.0, 0.999), "warmup_steps": 1000, "decay_fraction": 0.0},
        "decoder_norm": "unit", "resampling": {"kind": "none"}, "input_normalization": "none", "mse": "mean",
    },
}

# convenient string forms of nested overrides: model="org/x" means model.id, dataset="path" means dataset.path
_STRING_SHORTHANDS = {"model": "id", "dataset": "path"}


def _merge(base: dict, update: dict) -> dict:
    """`base` deep-updated with `update` (nested dicts merged key by key; other values replaced)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _nest(fields: dict[str, Any]) -> dict[str, Any]:
    """Turn dotted keys (`penalty.coefficient`) and string shorthands (`model="org/x"`) into nested dicts."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key in _STRING_SHORTHANDS and isinstance(value, str):
            value = {_STRING_SHORTHANDS[key]: value}
        head, *rest = key.split(".")
        for part in reversed(rest):
            value = {part: value}
        out = _merge(out, {head: value})
    return out


def _check_known(fields: dict[str, Any], model: type = Recipe, prefix: str = "") -> None:
    """Raise RecipeError for a key that is not a field of the recipe (or of its nested part)."""
    for key, value in fields.items():
        if key not in model.model_fields:
            import difflib

            close = difflib.get_close_matches(key, list(model.model_fields), n=3)
            hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            raise RecipeError([prefix + key], f"unknown field{hint} (`dictctl schema` lists the recipe's fields)")
        sub = model.model_fields[key].annotation
        if isinstance(value, dict) and isinstance(sub, type) and hasattr(sub, "model_fields"):
            _check_known(value, sub, prefix + key + ".")


def preset(name: str, **fields: Any) -> dict[str, Any]:
    """The named preset's field values deep-updated with `fields` (dotted keys allowed), with `preset` set."""
    if name not in PRESETS:
        raise UnknownPresetError(name, sorted(PRESETS))
    update = _nest(fields)
    _check_known(update)
    return _merge({**PRESETS[name], "preset": name}, update)


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """The mapping of recipe fields in a YAML file (`dictctl train --recipe`); a file that is absent, not UTF-8
    YAML or not a mapping is an error naming it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(str(path), "Pass --recipe a YAML file of recipe fields.")
    try:
        fields = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        problem = str(e).splitlines()[0]
        raise RecipeError(["<recipe file>"], f"{path} is not UTF-8 YAML ({problem})") from None
    if not isinstance(fields, dict):
        raise RecipeError(["<recipe file>"], f"{path} must hold a mapping of recipe fields")
    return fields


def validate_recipe(fields: dict[str, Any]) -> Recipe:
    """A Recipe from plain fields, with unknown fields and contradictions raised as RecipeError naming them."""
    _check_known(fields)
    try:
        return Recipe.model_validate(fields)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"] if not isinstance(p, int))
        message = first["msg"].removeprefix("Value error, ")
        named = [part.split("`")[0] for part in message.split("`")[1::2]] if "`" in message else []
        return_fields = named or [loc or "<recipe>"]
        raise RecipeError(list(dict.fromkeys(return_fields)), message) from None


def recipe_for(card: Card, overrides: dict[str, Any] | None = None) -> Recipe:
    """The card's recipe with `overrides` applied (e.g. tokens, model, dataset, penalty.coefficient), validated.

    The card must hold a recipe whose architecture and d_dict agree with the card's own; `preset` in the
    overrides switches to another preset's science fields while keeping the card's model, hook and data.
    """
    if card.recipe is None:
        raise RecipeError(["recipe"], f"card {card.name!r} holds no training recipe, so it cannot be regenerated")
    fields = card.recipe.model_dump(mode="python")
    update = _nest(dict(overrides or {}))
    _check_known(update)
    switched = "preset" in update and update["preset"] != fields["preset"]
    if switched:  # another preset's science on the card's model and data: a new dictionary, not this card's
        fields = _merge(fields, preset(update["preset"]))
    recipe = validate_recipe(_merge(fields, update))
    for field in ("architecture", "d_dict", "k", "pre_encoder_bias"):
        if not switched and field not in update and getattr(recipe, field) != getattr(card, field):
            raise RecipeError([field], f"the card says {getattr(card, field)!r} but its recipe says "
                                       f"{getattr(recipe, field)!r}; make them agree")
    return recipe
