"""Named training recipes (DESIGN.md section 6) and the validated `Recipe` a run trains from.

The `Recipe` model itself lives in `dictionaries/recipe_spec.py` (re-exported by `dictionaries/card.py`) because
it is a card's `recipe` section; here are the presets that fill its science fields (penalty, optimiser,
initialisation, decoder-norm rule, resampling, normalisation) and the functions that build a recipe from a preset
or from a card with overrides. A preset holds only the fields its sources fix, each cited in its comment; where a
source is silent or ambiguous the preset says what stands in, in its `unknowns`. Model, hook point, dataset,
tokens and d_dict come from the card or the caller.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dictionaries.card import Card
from dictionaries.errors import MissingFileError, RecipeError, UnknownPresetError
from dictionaries.recipe import Optimizer, Penalty, Recipe, Resampling

__all__ = ["PRESETS", "Optimizer", "Penalty", "Recipe", "Resampling", "preset", "recipe_for", "resolve",
           "validate_recipe"]

# Bricken et al. 2023, "Towards Monosemanticity" (seed 004's notes): L1 (sum over features) + MSE (mean over
# elements), pre-encoder bias, unit-norm decoder columns, "the default Pytorch Kaiming Uniform initialization"
# (init kaiming), b_dec at the geometric median (as Gao et al. 2024 attribute to Bricken). Resampling only at
# steps 25k/50k/75k/100k (until 100k) of features dead for the previous 12.5k steps, inputs drawn from 819,200
# with probability proportional to the square of their loss (the paper's words; seed 004's notes say its square
# root). No LR warm-up: seed 003 lists the warm-up among dictionary_learning's departures from this recipe.
_BRICKEN2023: dict[str, Any] = {
    "architecture": "relu",
    "pre_encoder_bias": True,
    "penalty": {"kind": "l1", "coefficient": 1e-3},
    "optimizer": {"lr": 1e-4, "betas": (0.9, 0.999), "warmup_steps": 0, "decay_fraction": 0.0},
    "decoder_norm": "unit",
    "resampling": {"kind": "anthropic", "every": 25_000, "until": 100_000, "dead_window": 12_500,
                   "inputs": 819_200, "encoder_scale": 0.2, "weighting": "squared_loss", "encoder_init": "input",
                   "reset_decoder_moments": True},
    "input_normalization": "none",
    "mse": "mean",
    "init": "kaiming", "b_dec_init": "geometric_median",
    "unknowns": [
        "Learning rate and Adam betas are not in the notes at hand (seed 004); 1e-4 and (0.9, 0.999) stand in.",
        "'The square of the autoencoder's loss' is read as the square of the reconstruction loss ||x - x_hat||^2 "
        "(the L1 term left out); seed 004's notes say the square root instead.",
        "The geometric-median b_dec comes from Gao et al. 2024's account of Bricken et al., not from seed 004.",
        "Kaiming-uniform decoder columns are modelled as random directions at unit norm (what the unit-norm "
        "constraint leaves of them, up to the distribution of directions).",
    ],
}

# Marks & Mueller 2023 (dictionary_learning sets 0_8192 / 1_32768; seed 003 and dictionary_learning's training.py
# and dictionary.py as of December 2023): Bricken's recipe on a buffer, batch 8192, context 128, a 1k-step linear
# LR warm-up, resampling every 30k of 100k steps for ever (also at 90k, seed 003). That code counted a feature dead
# when it did not fire in the second half of the period (dead_window 15k); drew replacements from the current batch
# (inputs 8192) with probability proportional to ||x - x_hat|| (sqrt_loss); set the decoder column to the
# normalised input, every dead encoder row to 0.2 times the mean alive encoder row (mean_alive), the encoder bias
# to 0, and reset Adam's moments of the encoder only. Its AutoEncoder was nn.Linear's default encoder (kaiming)
# with normalised Gaussian decoder columns and a zero b_dec; trainSAE had no learning-rate default, and the README
# example used lr 3e-4.
_MARKS2023_UNKNOWNS = [
    "The learning rate is not stated in the release: dictionary_learning's trainSAE had no default and its "
    "README example used lr=3e-4, which is used; Adam betas and eps are torch's defaults, as in that code; the "
    "1000-step warm-up is trainSAE's default.",
    "Whether the MSE was averaged over elements or summed over dimensions in the training loss is not stated; "
    "MSELoss (mean over elements) was the code's, with a square root added and removed around the release.",
    "dictionary_learning drew replacement inputs from the current batch with replacement; here a fresh batch of "
    "8192 from the buffer, without replacement unless more features are dead than inputs.",
]

PRESETS: dict[str, dict[str, Any]] = {
    "bricken2023": _BRICKEN2023,
    "marks2023": {**_BRICKEN2023,
                  "optimizer": {"lr": 3e-4, "betas": (0.9, 0.999), "warmup_steps": 1000, "decay_fraction": 0.0},
                  "resampling": {**_BRICKEN2023["resampling"], "every": 30_000, "until": None, "dead_window": 15_000,
                                 "inputs": 8192, "weighting": "sqrt_loss", "encoder_init": "mean_alive",
                                 "reset_decoder_moments": False},
                  "batch_size": 8192, "context_length": 128, "init": "kaiming", "b_dec_init": "zero",
                  "unknowns": _MARKS2023_UNKNOWNS},
    # Anthropic, "Circuits Updates - February 2024" (seed 000): beta1 = 0, decoder norm <= 1 then prune below
    # 0.99, no pre-encoder bias, inputs scaled to mean norm sqrt(d_in), MSE summed over dimensions, LR decays
    # linearly to 0 over the last 20%. Plain L1 on f: it pulls the decoder norms of used features up to 1 (weighting
    # it by the decoder norm would make it blind to that scale and let every norm drift, see
    # penalty.scale_by_decoder_norm). Pruning removes the unused features only if decoder rows start below 0.99 (a
    # feature that never fires gets no gradient and keeps its initial norm), so the init is the April 2024
    # update's: random directions of norm 0.1, W_enc = W_dec^T, zero biases. Ghost grads (Resampling.kind
    # ghost_grads) and the tanh penalty (penalty.kind tanh) are options on top of it.
    "anthropic2024": {
        "architecture": "relu", "pre_encoder_bias": False,
        "penalty": {"kind": "l1", "coefficient": 5.0, "scale_by_decoder_norm": False},
        "optimizer": {"lr": 5e-5, "betas": (0.0, 0.999), "warmup_steps": 1000, "decay_fraction": 0.2},
        "decoder_norm": "at_most_one", "prune_below": 0.99,
        "resampling": {"kind": "none"},
        "input_normalization": "sqrt_d", "mse": "sum_dims",
        "init": "tied", "decoder_init_norm": 0.1, "b_dec_init": "zero",
        "unknowns": [
            "The February update gives no initialisation; the April 2024 update's (decoder rows of norm 0.1 in "
            "random directions, W_enc = W_dec^T, zero biases) is used, which makes the 0.99 pruning meaningful.",
            "The February update says its views on beta1 and pruning changed in the March 2024 update, which is "
            "not among the sources at hand.",
            "Learning rate, warm-up and L1 coefficient are not in the February update; 5e-5, 1000 steps and 5.0 "
            "stand in.",
        ],
    },
    # Farrell 2024 (seed 001): approximate L0 (sum_i mean_b f/(f+eps)) plus a minimum-density term with floor 1e-5
    # on the density averaged over a window of steps, its gradient taken from the batch's density alone; the
    # density term takes the place of resampling; no pre-encoder bias ("I had to remove the pre-encoder bias").
    # Otherwise as Bloom's GPT-2 small reference SAEs, batch 4096 (the post's example), context 128.
    "farrell2024": {**_BRICKEN2023,
                    "pre_encoder_bias": False,
                    "penalty": {"kind": "approx_l0", "coefficient": 1e-3, "l0_eps": 1e-3, "density_floor": 1e-5,
                                "density_coefficient": 1e-2, "density_window": 1000},
                    "optimizer": {"lr": 1e-4, "betas": (0.9, 0.999), "warmup_steps": 1000, "decay_fraction": 0.0},
                    "resampling": {"kind": "none"}, "batch_size": 4096, "context_length": 128,
                    "unknowns": [
                        "eps of f / (f + eps), the coefficients of the two terms and the window length n are not "
                        "legible in the post (its formulas are images); 1e-3, 1e-3, 1e-2 and 1000 stand in.",
                        "Learning rate, warm-up, batch size and steps were those of Bloom's GPT-2 small residual "
                        "SAEs (SAELens, spring 2024), not given in the post; the batch of 4096 is the post's "
                        "example, the rest stand in, as do Bricken's init and geometric-median b_dec.",
                    ]},
    # Gao et al. 2024, "Scaling and evaluating sparse autoencoders": TopK, unit-norm decoder, tied init, b_dec at the
    # geometric median, AuxK over the top k_aux = d_in // 2 dead features (half_d_in: dictionary_learning's TopK
    # trainers, after the paper's appendix B.1) with coefficient 1/32, a feature dead after 10M tokens without
    # firing. The MSE is normalised by the data's variance (their reference train.py), as the AuxK term is by the
    # residual's, so that 1/32 weighs the same whatever the activations' scale. `k` must be given.
    "topk": {
        "architecture": "topk", "pre_encoder_bias": True,
        "penalty": {"kind": "none", "coefficient": 0.0, "aux_k": "half_d_in", "aux_coefficient": 1 / 32,
                    "aux_dead_tokens": 10_000_000},
        "optimizer": {"lr": 2e-4, "betas": (0.9, 0.999), "warmup_steps": 1000, "decay_fraction": 0.0},
        "decoder_norm": "unit", "resampling": {"kind": "none"}, "input_normalization": "none", "mse": "normalized",
        "init": "tied", "b_dec_init": "geometric_median",
        "unknowns": ["Gao et al.'s reference code normalised the MSE by a fixed sample's variance; here by the "
                     "batch's (the same for batches of thousands of tokens)."],
    },
    # Bussmann et al. 2024, "BatchTopK sparse autoencoders": top k*batch over the batch in training, a global
    # threshold (running average of the smallest kept activation) at inference; AuxK and losses as `topk`
    # (dictionary_learning's BatchTopKTrainer: k_aux = d_in // 2, AuxK normalised by the residual's variance).
    "batchtopk": {
        "architecture": "batchtopk", "pre_encoder_bias": True,
        "penalty": {"kind": "none", "coefficient": 0.0, "aux_k": "half_d_in", "aux_coefficient": 1 / 32,
                    "aux_dead_tokens": 10_000_000},
        "optimizer": {"lr": 2e-4, "betas": (0.9, 0.999), "warmup_steps": 1000, "decay_fraction": 0.0},
        "decoder_norm": "unit", "resampling": {"kind": "none"}, "input_normalization": "none", "mse": "normalized",
        "init": "tied", "b_dec_init": "geometric_median", "threshold_decay": 0.999,
        "unknowns": ["Bussmann et al.'s own code fixed k_aux at 512 (GPT-2 small, d_in 768) and left both MSEs "
                     "unnormalised; dictionary_learning's k_aux = d_in // 2 and normalised AuxK are used."],
    },
    # Rajamanoharan et al. 2024b, "Jumping ahead" (JumpReLU): L0 penalty through straight-through estimators with a
    # rectangle kernel of bandwidth 1e-3 and thresholds starting at 1e-3, both set for inputs normalised to unit
    # mean squared norm with the squared error summed over dimensions (dictionary_learning's trainSAE
    # normalize_activations, after Gemma Scope section 3.1); the L0 coefficient warms up linearly from 0; beta1 = 0;
    # tied init with zero biases and gradient norm clipped to 1 (dictionary_learning's JumpReluTrainer).
    "jumprelu": {
        "architecture": "jumprelu", "pre_encoder_bias": False,
        "penalty": {"kind": "l0", "coefficient": 1e-3, "bandwidth": 1e-3, "initial_threshold": 1e-3,
                    "warmup_steps": 10_000},
        "optimizer": {"lr": 7e-5, "betas": (0.0, 0.999), "warmup_steps": 1000, "decay_fraction": 0.0,
                      "grad_clip": 1.0},
        "decoder_norm": "unit", "resampling": {"kind": "none"}, "input_normalization": "unit_mean_square",
        "mse": "sum_dims", "init": "tied", "b_dec_init": "zero",
        "unknowns": ["The length of the L0-coefficient warm-up: 10,000 steps as Gemma Scope reports; "
                     "dictionary_learning's JumpReluTrainer defaults to 2,000."],
    },
    # Rajamanoharan et al. 2024a, "Improving dictionary learning with gated sparse autoencoders": L1 on the
    # gate's ReLU'd pre-activations plus the auxiliary reconstruction from the gate through a frozen decoder;
    # tied init with zero biases (dictionary_learning's GatedAutoEncoder). The paper's loss is the squared
    # L2 norm ||x - x_hat||^2 (summed over dimensions, as dictionary_learning's gdm.py sums it), not a mean.
    "gated": {
        "architecture": "gated", "pre_encoder_bias": True,
        "penalty": {"kind": "l1", "coefficient": 1e-3},
        "optimizer": {"lr": 5e-5, "betas": (0.0, 0.999), "warmup_steps": 1000, "decay_fraction": 0.0},
        "decoder_norm": "unit", "resampling": {"kind": "none"}, "input_normalization": "none", "mse": "sum_dims",
        "init": "tied", "b_dec_init": "zero",
        "unknowns": ["b_dec starts at zero as in dictionary_learning's GatedAutoEncoder; the paper's own choice is "
                     "not among the sources at hand."],
    },
    # Dunefsky, Chlenski & Nanda 2024, "Transcoders find interpretable LLM feature circuits" (arXiv:2406.11944), as
    # their released train_transcoder.py (jacobdunefsky/transcoder_circuits, GPT-2 small layer 8, MLP input ->
    # hook_mlp_out): ReLU, L1 coefficient 1.4e-4, Adam lr 4e-4 constant after a 5000-step warm-up, batch 4096,
    # context 128, 60M tokens, expansion 32, ghost grads, unit-norm decoder rows at init. Give `hook` (mlp_in) and
    # `output_hook` (mlp_out). Their module also subtracts a learned input-space bias before encoding; that is
    # b_enc - b W_enc folded, so a run without it spans the same functions (pre_encoder_bias false).
    "dunefsky2024": {
        "architecture": "relu", "pre_encoder_bias": False,
        "penalty": {"kind": "l1", "coefficient": 1.4e-4},
        "optimizer": {"lr": 4e-4, "betas": (0.9, 0.999), "warmup_steps": 5000, "decay_fraction": 0.0},
        "decoder_norm": "unit", "resampling": {"kind": "ghost_grads", "dead_window": 5000},
        "input_normalization": "none", "mse": "mean", "init": "kaiming", "b_dec_init": "geometric_median",
        "batch_size": 4096, "context_length": 128,
        "unknowns": [
            "Their MSE divides each token's squared error by the target's L2 norm before the mean; the plain mean "
            "over elements stands in (no recipe option matches it).",
            "b_dec starts at the mean of the targets in their script (b_dec_init_method 'mean'); the geometric "
            "median stands in. Their ghost-grads residual is taken against the input, not the target; here "
            "against the target.",
            "Whether decoder rows were held at unit norm during training (the SAELens of early 2024 did) is not "
            "stated in the script; unit is used. Their kaiming_uniform_ encoder bound differs from nn.Linear's.",
            "The L1 coefficient and learning rate are the script's example for GPT-2 small layer 8; the paper's "
            "other models and layers may have used others, not verified here.",
        ],
    },
    # Paulo, Shabalin & Belrose 2025, "Transcoders beat sparse autoencoders for interpretability" (arXiv:2501.18823):
    # skip-transcoders trained with EleutherAI's sparsify: TopK of ReLU, prediction = W_dec f + b_dec + x W_skip
    # with W_skip starting at 0, no pre-encoder bias (`transcode`), decoder rows not normalised for transcoders,
    # FVU loss (sum of squared errors over the batch's variance: mse normalized), AuxK over k_aux = d_out // 2 dead
    # features with coefficient 1/32 and a feature dead after 10M tokens, Adam with a 1000-step warm-up and
    # lr 2e-4 / sqrt(F / 2^14). Give `hook`, `output_hook` and `k`.
    "paulo2025": {
        "architecture": "topk", "pre_encoder_bias": False, "skip": True,
        "penalty": {"kind": "none", "coefficient": 0.0, "aux_k": "half_d_in", "aux_coefficient": 1 / 32,
                    "aux_dead_tokens": 10_000_000},
        "optimizer": {"lr": 2e-4, "betas": (0.9, 0.999), "warmup_steps": 1000, "decay_fraction": 0.0},
        "decoder_norm": "free", "resampling": {"kind": "none"}, "input_normalization": "none",
        "mse": "normalized", "init": "kaiming", "decoder_init_norm": 0.01, "b_dec_init": "zero",
        "unknowns": [
            "The paper's k, expansion factor, batch (sparsify's default: 32 contexts of 2048 tokens) and token "
            "count could not be checked here (the paper's text was not at hand): k must be given.",
            "sparsify scales the learning rate as 2e-4 / sqrt(F / 2^14); 2e-4 (F = 16384) is stored: scale it "
            "for other widths. Later sparsify releases default to the Signum optimiser and auxk_alpha 0.",
            "sparsify starts a transcoder's W_dec at 0 and zeroes the encoder bias; here decoder rows start as "
            "random directions of norm 0.01 (near 0, yet the encoder gets a gradient from the first step) and "
            "the kaiming encoder draws its bias. k_aux is d_in // 2 (d_out // 2 in sparsify: equal for an MLP).",
        ],
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


def resolve(recipe: Recipe, d_in: int) -> Recipe:
    """The recipe with the values that depend on the activations' width fixed, as a run records them.

    penalty.aux_k `half_d_in` becomes d_in // 2 (dictionary_learning's TopK and BatchTopK trainers, after
    Gao et al. 2024's appendix B.1). The trainer resolves its recipe; `recipe_for` resolves with the card's d_in.
    """
    if recipe.penalty.aux_k != "half_d_in":
        return recipe
    return recipe.model_copy(update={"penalty": recipe.penalty.model_copy(update={"aux_k": d_in // 2})})


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
    return resolve(recipe, card.d_in)
