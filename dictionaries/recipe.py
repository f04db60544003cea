"""The strict schema base, and what produces a dictionary: its model, hook point and training recipe.

`Strict` is the base of every pydantic model in the package (unknown fields are errors, frozen, each field's
docstring is its schema description). The recipe section of a card (everything `dictctl train` needs) is
defined here, below the card (`card.py`), which holds a recipe and shares its model and hook point types:
together they are one schema, imported one way. The named presets that fill a recipe are in
`training/presets.py`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Architecture = Literal["relu", "topk", "batchtopk", "jumprelu", "gated"]
Site = Literal["embed", "attn", "mlp", "resid"]
Dtype = Literal["float32", "float16", "bfloat16", "float64"]
"""The dtypes a dictionary is stored and trained in: torch floating types that safetensors holds."""
ModelDtype = Literal["float32", "bfloat16", "float16"]
"""The dtypes a model's weights (and so its activations) may be loaded in (placement.MODEL_DTYPES: fp32, bf16...)."""
MAX_SIZE = 2**31 - 1
"""Upper bound of a width, feature count or k: torch and safetensors hold shapes as int64, so a larger one (a
typo such as 10**30) would fail deep inside them instead of at validation, and no real dictionary is near it."""


class Strict(BaseModel):
    """Base of every model in the package: unknown fields are errors, docstrings become descriptions."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelRef(Strict):
    """The language model a dictionary was trained on."""

    id: str
    """Hugging Face id of the model, e.g. `EleutherAI/pythia-70m-deduped`."""
    revision: str | None = None
    """Model revision (branch, tag or commit) the activations came from; None means the default branch."""


class HookPoint(Strict):
    """Where in the model the dictionary reads and writes, as an nnsight module path."""

    module: str
    """nnsight module path, e.g. `gpt_neox.layers.3.mlp`."""
    io: Literal["output", "input"] = "output"
    """Whether the module's output or its (first) input is the activation."""
    site: Site
    """The kind of site: embed, attn, mlp or resid (the output of a block)."""
    layer: int | None = None
    """The block index, None for the embedding."""


class DatasetSpec(Strict):
    """The text a dictionary is trained (or evaluated) on."""

    path: str
    """A Hugging Face dataset id (streamed) or a local text file / folder of `.txt` files."""
    name: str | None = None
    """Dataset configuration name, if any."""
    split: str = "train"
    """Split to read."""
    column: str = "text"
    """Column holding the text."""
    revision: str | None = None
    """Dataset revision, for reproducibility."""


class Penalty(Strict):
    """The sparsity penalty (DESIGN.md section 6) and its coefficients."""

    kind: Literal["l1", "tanh", "approx_l0", "l0", "none"] = "l1"
    """l1 (Bricken 2023), tanh (Anthropic 2024), approx_l0 (Farrell 2024), l0 (JumpReLU), none (topk/batchtopk)."""
    coefficient: float = Field(default=1e-3, ge=0)
    """lambda: weight of the penalty against the reconstruction loss."""
    scale_by_decoder_norm: bool = False
    """Multiply each feature's penalty by its decoder norm (Anthropic 2024, when decoder norms are free)."""
    tanh_a: float = 1.0
    """A in (A/B) tanh(B f)."""
    tanh_b: float = 1.0
    """B in (A/B) tanh(B f)."""
    l0_eps: float = 1e-3
    """eps in f / (f + eps), the approximate L0 (Farrell 2024)."""
    density_floor: float = 1e-5
    """Minimum feature density below which the density term pushes a feature up (Farrell 2024)."""
    density_coefficient: float = 0.0
    """Weight of the minimum-density term (0 disables it)."""
    density_window: int = 1000
    """Steps over which feature density is averaged for the density term."""
    aux_k: int | Literal["half_d_in"] | None = None
    """TopK/BatchTopK: dead features in the AuxK loss (Gao et al. 2024); half_d_in means d_in // 2; None: no AuxK."""
    aux_coefficient: float = 1 / 32
    """Weight of the AuxK loss."""
    aux_dead_tokens: int = Field(default=10_000_000, gt=0)
    """AuxK: a feature that did not fire on this many tokens is dead (Gao et al. 2024 use 10M)."""
    bandwidth: float = Field(default=1e-3, gt=0)
    """JumpReLU: width of the rectangle kernel of the threshold's straight-through estimator."""
    initial_threshold: float = Field(default=1e-3, ge=0)
    """JumpReLU: starting value of every feature's threshold."""
    warmup_steps: int = Field(default=0, ge=0)
    """Linear warm-up of `coefficient` from 0 over this many steps (Rajamanoharan et al. 2024b); 0 for none."""


class Optimizer(Strict):
    """Adam and its learning-rate schedule."""

    lr: float = Field(default=1e-4, gt=0)
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas; Anthropic 2024 uses beta1 = 0."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int = Field(default=1000, ge=0)
    """Linear warm-up from 0 to lr over this many steps."""
    decay_fraction: float = Field(default=0.0, ge=0, le=1)
    """Fraction of training at the end over which lr decays linearly to 0 (0.2 in Anthropic 2024)."""
    grad_clip: float | None = None
    """Clip the gradient norm to this value, None for no clipping."""


class Resampling(Strict):
    """Handling of dead features."""

    kind: Literal["none", "anthropic", "ghost_grads"] = "none"
    """anthropic: Bricken et al. 2023 resampling; ghost_grads: Anthropic's ghost grads (Jan 2024)."""
    every: int = 25_000
    """Resample at multiples of this many steps (anthropic)."""
    until: int | None = None
    """Do not resample after this step, None for no limit."""
    dead_window: int = 12_500
    """A feature that did not fire in this many steps is dead."""
    inputs: int = 819_200
    """Size of the random subset of inputs that replacement directions are drawn from."""
    encoder_scale: float = 0.2
    """New encoder rows get this times the mean alive encoder norm."""
    weighting: Literal["squared_loss", "sqrt_loss"] = "squared_loss"
    """Draw inputs with probability ~ loss^2 (Bricken et al. 2023) or ~ sqrt(loss) = ||e|| (dictionary_learning)."""
    encoder_init: Literal["input", "mean_alive"] = "input"
    """New encoder row: the normalised input (Bricken 2023) or the mean alive row (dictionary_learning, 2023)."""
    reset_decoder_moments: bool = True
    """Also zero Adam's moments of resampled decoder rows (Bricken 2023; dictionary_learning 2023 did not)."""


class Recipe(Strict):
    """The complete training recipe of a dictionary: everything `dictctl train` needs to regenerate it."""

    preset: str
    """Named recipe this one starts from (bricken2023, marks2023, anthropic2024, farrell2024, topk, ...)."""
    model: ModelRef
    """Model (and revision) whose activations are read."""
    hook: HookPoint
    """Where activations are read."""
    output_hook: HookPoint | None = None
    """Transcoders: where the target is read (e.g. the MLP's output); None: an SAE reconstructing `hook`."""
    skip: bool = False
    """Add a trained linear term x @ W_skip (Paulo et al. 2025's skip-transcoders; sparsify's skip_connection)."""
    dataset: DatasetSpec
    """Training text."""
    context_length: int = Field(default=128, gt=1)
    """Tokens per context."""
    tokens: int = Field(gt=0)
    """Total activations (tokens) to train on."""
    batch_size: int = Field(default=8192, gt=0)
    """Activations per optimisation step."""
    buffer_contexts: int = Field(default=2048, gt=0)
    """Contexts whose activations fill the shuffling buffer; refilled when half used."""
    harvest_batch_size: int = Field(default=64, gt=0)
    """Contexts per model forward when filling the buffer."""
    architecture: Architecture = "relu"
    """Kind of dictionary trained."""
    d_dict: int = Field(gt=0, le=MAX_SIZE)
    """Number of features."""
    k: int | None = Field(default=None, gt=0, le=MAX_SIZE)
    """topk/batchtopk: active features per token."""
    pre_encoder_bias: bool = True
    """Subtract b_dec before encoding (Bricken 2023); Anthropic 2024 drops it."""
    penalty: Penalty = Field(default_factory=Penalty)
    """Sparsity penalty."""
    optimizer: Optimizer = Field(default_factory=Optimizer)
    """Optimiser and schedule."""
    decoder_norm: Literal["unit", "at_most_one", "free"] = "unit"
    """Decoder column constraint: = 1 (Bricken 2023), <= 1 (Anthropic 2024) or unconstrained."""
    prune_below: float | None = None
    """After training, drop features whose decoder norm is below this (0.99 in Anthropic 2024)."""
    resampling: Resampling = Field(default_factory=Resampling)
    """Dead-feature handling."""
    input_normalization: Literal["none", "sqrt_d", "unit_mean_square"] = "none"
    """Scale inputs (folded back after training) to mean L2 norm sqrt(d_in), or to mean squared norm 1."""
    mse: Literal["mean", "sum_dims", "normalized"] = "mean"
    """MSE over elements, summed over dimensions (Anthropic 2024), or over the batch's variance (Gao 2024)."""
    init: Literal["tied", "kaiming"] = "tied"
    """tied: W_enc = W_dec^T, b_enc = 0 (Gao 2024); kaiming: nn.Linear's default encoder (Bricken 2023)."""
    decoder_init_norm: float = Field(default=1.0, gt=0)
    """Initial L2 norm of each decoder row (a random direction), then held to `decoder_norm`; 0.1 in Anthropic 2024."""
    b_dec_init: Literal["geometric_median", "zero"] = "geometric_median"
    """b_dec starts at the first batch's geometric median (Gao 2024) or at zero (dictionary_learning)."""
    exclude_bos: bool = True
    """Drop BOS positions from the activations (their norms are outliers)."""
    prepend_bos: bool = False
    """Prepend the tokenizer's BOS token to every context."""
    seed: int = 0
    """Seed of data order, initialisation and resampling."""
    holdout_tokens: int = Field(default=16384, ge=0)
    """Tokens at the head of the seeded, shuffled stream that training skips, so the run's stats are measured
    on text it never trained on (whole documents: training starts at the first document after them)."""
    dtype: Dtype = "float32"
    """Training dtype of the dictionary."""
    model_dtype: ModelDtype = "float32"
    """Dtype the model is loaded and run in while harvesting: its activations are those of this precision (cast
    to `dtype` in the buffer). bfloat16 or float16 halve a big model's memory; float32 for the existing entries."""
    autocast: Literal["none", "bfloat16", "float16"] = "none"
    """Precision of the dictionary's forward in training (torch autocast; weights and Adam stay in `dtype`)."""
    threshold_decay: float = Field(default=0.999, ge=0, lt=1)
    """batchtopk: decay of the running average of the smallest kept activation (the inference threshold)."""
    unknowns: list[str] = Field(default_factory=list)
    """What is not known about the original recipe (for entries reproduced from a paper)."""

    @model_validator(mode="before")
    @classmethod
    def _transcoder_bias(cls, data: Any) -> Any:
        return transcoder_defaults(data)

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        problem = recipe_contradiction(self)
        if problem:
            raise ValueError(problem)
        if self.buffer_contexts * self.context_length < self.batch_size:
            raise ValueError("the buffer holds fewer activations than one batch: raise `buffer_contexts`")
        if self.tokens < self.batch_size:
            raise ValueError("`tokens` is below `batch_size`: the run would take no step and write an untrained "
                             "dictionary")
        return self


def k_problem(architecture: str, k: int | None) -> str | None:
    """Why `k` does not suit `architecture` (topk/batchtopk need it, the others have none), else None."""
    if architecture in ("topk", "batchtopk") and k is None:
        return f"`architecture` {architecture} needs `k` (active features per token)"
    if architecture not in ("topk", "batchtopk") and k is not None:
        return f"`k` is only for topk/batchtopk, not `architecture` {architecture}"
    return None


# architecture -> the penalty kinds that make sense with it (TopK/BatchTopK need none: k sets the sparsity).
PENALTIES_FOR = {"relu": ("l1", "tanh", "approx_l0"), "topk": ("none",), "batchtopk": ("none",),
                 "jumprelu": ("l0",), "gated": ("l1",)}


def transcoder_defaults(data: Any) -> Any:
    """A card or recipe with an `output_hook` and no `pre_encoder_bias` gets none: b_dec lives in the output
    space, so subtracting it from the input means nothing (SAELens' Transcoder refuses apply_b_dec_to_input;
    sparsify's encode skips `x - b_dec` when `transcode`)."""
    if isinstance(data, dict) and data.get("output_hook") is not None and "pre_encoder_bias" not in data:
        return {**data, "pre_encoder_bias": False}
    return data


def transcoder_problem(output_hook: HookPoint | None, pre_encoder_bias: bool, skip: bool,
                       d_out: int | None = None) -> str | None:
    """Why the transcoder fields contradict each other or the rest (naming them in backticks), else None."""
    if output_hook is None and d_out is not None:
        return "`d_out` is for transcoders: give `output_hook`, the hook point the prediction is written to"
    if output_hook is not None and pre_encoder_bias:
        return ("`pre_encoder_bias` contradicts `output_hook`: a transcoder's b_dec lives in the output space, "
                "so it is not subtracted from the input (set pre_encoder_bias: false)")
    return None


def recipe_contradiction(r: Recipe) -> str | None:
    """The first pair of fields that contradict each other, as a message naming them in backticks; else None."""
    topk = r.architecture in ("topk", "batchtopk")
    if k_problem(r.architecture, r.k):
        return k_problem(r.architecture, r.k)
    if transcoder_problem(r.output_hook, r.pre_encoder_bias, r.skip):
        return transcoder_problem(r.output_hook, r.pre_encoder_bias, r.skip)
    if r.output_hook is not None and r.resampling.kind == "anthropic":
        return ("`resampling.kind` anthropic sets dead decoder rows to inputs, which a transcoder's decoder "
                "(`output_hook`'s space) cannot take: use none, or aux_k with topk/batchtopk")
    if r.penalty.kind not in PENALTIES_FOR[r.architecture]:
        return (f"`penalty.kind` {r.penalty.kind} contradicts `architecture` {r.architecture}, "
                f"which takes {' or '.join(PENALTIES_FOR[r.architecture])}")
    if r.prune_below is not None and r.decoder_norm != "at_most_one":
        return (f"`prune_below` needs `decoder_norm` at_most_one (with {r.decoder_norm} decoder norms "
                "pruning by norm would drop all or nothing)")
    if r.penalty.aux_k is not None and not topk:
        return f"`penalty.aux_k` (AuxK) is only for topk/batchtopk, not `architecture` {r.architecture}"
    if r.penalty.density_coefficient > 0 and r.penalty.kind != "approx_l0":
        return "`penalty.density_coefficient` (minimum-density term) needs `penalty.kind` approx_l0"
    if r.resampling.kind == "ghost_grads" and r.architecture != "relu":
        return f"`resampling.kind` ghost_grads is defined for relu, not `architecture` {r.architecture}"
    return None
