"""The metadata card of a dictionary (DESIGN.md section 4) as strict pydantic models.

A card is what a researcher reads before trusting a dictionary: identity and architecture, the model and
hook point it reads, its files with hashes, measured or reported stats, the recipe that regenerates it,
and its provenance. Cards live as YAML under `cards/` and as `card.json` inside each native folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dictionaries.errors import CardError

Architecture = Literal["relu", "topk", "batchtopk", "jumprelu", "gated"]
Site = Literal["embed", "attn", "mlp", "resid"]
SourceFormat = Literal["native", "dictionary_learning", "saelens", "sparsify"]
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.\-]*/(embed|attn|mlp|resid)(\d+)?/\d+(-[a-z0-9][a-z0-9\-]*)?$")
REVISION_PATTERN = re.compile(r"^[0-9a-f]{40}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


class Strict(BaseModel):
    """Base of every model in the package: unknown fields are errors, docstrings become descriptions."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class Links(Strict):
    """Where to read more about a dictionary."""

    paper: str | None = None
    """The paper or post that introduced the dictionary or its recipe."""
    code: str | None = None
    """The code that trained it originally."""
    neuronpedia: str | None = None
    """The Neuronpedia id of the dictionary, where one exists."""


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


class FileEntry(Strict):
    """One file of a dictionary, relative to its folder."""

    path: str
    """Path relative to the dictionary's folder (or Hub subfolder)."""
    size: int | None = None
    """Size in bytes, None until first hashed."""
    sha256: str | None = None
    """Hex sha256, None until first hashed (the entry is then not verified)."""

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and not SHA256_PATTERN.match(v):
            raise ValueError("sha256 must be 64 lower-case hex digits")
        return v


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 23), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(path: str | Path, root: str | Path) -> FileEntry:
    """A FileEntry for `path` (relative to `root`), hashed now."""
    path = Path(path)
    return FileEntry(path=path.relative_to(root).as_posix(), size=path.stat().st_size, sha256=sha256_of(path))


class Files(Strict):
    """The files of a dictionary and the format they are in."""

    format: SourceFormat = "native"
    """The format of the files as stored: native, or a foreign format converted at load time."""
    items: list[FileEntry]
    """Every file the loader needs."""
    source: str | None = None
    """Where the files originally came from when they were converted or mirrored (URL or hub path)."""

    @property
    def verified(self) -> bool:
        """True when every file has a recorded sha256."""
        return all(f.sha256 is not None for f in self.items)


class Sensitivity(Strict):
    """Apollo 2024 sensitive-directions test: median step at which the KL of the final logits reaches 0.5."""

    random: float | None = None
    """Median step for random directions matched to the activations' mean and covariance."""
    real: float | None = None
    """Median step toward other real activations."""
    dictionary: float | None = None
    """Median step along the dictionary's most active decoder directions."""
    samples: int | None = None
    """How many base activations were perturbed."""
    max_step: float | None = None
    """Largest step tried, in units of the base activation's norm (a median of inf: KL 0.5 never reached)."""


class Stats(Strict):
    """The stats of DESIGN.md section 7, with how and where they were obtained."""

    source: Literal["measured", "reported"]
    """`measured` by this package's evaluation, or `reported` by the original authors."""
    reference: str | None = None
    """For reported stats, where they were reported (URL)."""
    dataset: str | None = None
    """The eval dataset."""
    tokens: int | None = None
    """Eval token count."""
    context_length: int | None = None
    """Tokens per context."""
    baseline: str = "zero_ablation"
    """What the loss-recovered baseline replaces the activation with."""
    exclude_bos: bool | None = None
    """Whether BOS positions were left out of the stats."""
    mse: float | None = None
    """Mean over tokens and dimensions of (x - x_hat)^2."""
    l1: float | None = None
    """Mean over tokens of the sum of |f|."""
    l0: float | None = None
    """Mean over tokens of the number of active features."""
    frac_alive: float | None = None
    """Fraction of features active on at least one eval token."""
    fvu: float | None = None
    """Fraction of variance unexplained."""
    variance_explained: float | None = None
    """1 - FVU."""
    ce_clean: float | None = None
    """Cross-entropy of the unmodified model."""
    ce_spliced: float | None = None
    """Cross-entropy with the activation replaced by the reconstruction."""
    ce_zero: float | None = None
    """Cross-entropy with the activation replaced by zeros."""
    frac_loss_recovered: float | None = None
    """(CE_zero - CE_spliced) / (CE_zero - CE_clean)."""
    kl: float | None = None
    """KL divergence of spliced to clean next-token distributions, mean over tokens."""
    density: dict[str, float] | None = None
    """Summary of the feature density histogram (dead count, count above 1e-1, median log10 density)."""
    sensitivity: Sensitivity | None = None
    """Sensitive-directions figures, where measured."""
    package_version: str | None = None
    """Version of `dictionaries` that measured the stats."""
    date: str | None = None
    """ISO date of the measurement or report."""

    @model_validator(mode="after")
    def _reported_has_reference(self) -> Stats:
        if self.source == "reported" and not self.reference:
            raise ValueError("reported stats need a `reference` saying where they were reported")
        return self


class Provenance(Strict):
    """Who made the dictionary, when, and from which code."""

    trained_by: str | None = None
    """Person or group that trained it."""
    date: str | None = None
    """ISO date of training (or of the original release)."""
    code: str | None = None
    """Code that trained it: repository URL and commit, or `dictionaries <version>`."""
    original: str | None = None
    """Where the original files live, when this entry mirrors or converts them."""
    notes: list[str] = Field(default_factory=list)
    """Anything else a reader should know about how the entry came to be."""


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
    aux_k: int | None = None
    """TopK/BatchTopK: number of dead features used by the AuxK loss (Gao et al. 2024), None disables it."""
    aux_coefficient: float = 1 / 32
    """Weight of the AuxK loss."""
    aux_dead_tokens: int = Field(default=10_000_000, gt=0)
    """AuxK: a feature that did not fire on this many tokens is dead (Gao et al. 2024 use 10M)."""
    bandwidth: float = Field(default=1e-3, gt=0)
    """JumpReLU: width of the rectangle kernel of the threshold's straight-through estimator."""
    initial_threshold: float = Field(default=1e-3, ge=0)
    """JumpReLU: starting value of every feature's threshold."""


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


class Recipe(Strict):
    """The complete training recipe of a dictionary: everything `dictctl train` needs to regenerate it."""

    preset: str
    """Named recipe this one starts from (bricken2023, marks2023, anthropic2024, farrell2024, topk, ...)."""
    model: ModelRef
    """Model (and revision) whose activations are read."""
    hook: HookPoint
    """Where activations are read."""
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
    d_dict: int = Field(gt=0)
    """Number of features."""
    k: int | None = None
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
    input_normalization: Literal["none", "sqrt_d"] = "none"
    """sqrt_d scales inputs to mean L2 norm sqrt(d_in) during training (folded back into the weights)."""
    mse: Literal["mean", "sum_dims"] = "mean"
    """MSE averaged over elements, or summed over dimensions and averaged over tokens (Anthropic 2024)."""
    exclude_bos: bool = True
    """Drop BOS positions from the activations (their norms are outliers)."""
    prepend_bos: bool = False
    """Prepend the tokenizer's BOS token to every context."""
    seed: int = 0
    """Seed of data order, initialisation and resampling."""
    dtype: str = "float32"
    """Training dtype of the dictionary."""
    threshold_decay: float = Field(default=0.999, ge=0, lt=1)
    """batchtopk: decay of the running average of the smallest kept activation (the inference threshold)."""
    unknowns: list[str] = Field(default_factory=list)
    """What is not known about the original recipe (for entries reproduced from a paper)."""

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        problem = recipe_contradiction(self)
        if problem:
            raise ValueError(problem)
        if self.buffer_contexts * self.context_length < self.batch_size:
            raise ValueError("the buffer holds fewer activations than one batch: raise `buffer_contexts`")
        return self


# architecture -> the penalty kinds that make sense with it (TopK/BatchTopK need none: k sets the sparsity).
PENALTIES_FOR = {"relu": ("l1", "tanh", "approx_l0"), "topk": ("none",), "batchtopk": ("none",),
                 "jumprelu": ("l0",), "gated": ("l1",)}


def recipe_contradiction(r: Recipe) -> str | None:
    """The first pair of fields that contradict each other, as a message naming them in backticks; else None."""
    topk = r.architecture in ("topk", "batchtopk")
    if topk and r.k is None:
        return f"`architecture` {r.architecture} needs `k` (active features per token)"
    if not topk and r.k is not None:
        return f"`k` is only for topk/batchtopk, not `architecture` {r.architecture}"
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


class Card(Strict):
    """Everything known about one dictionary."""

    name: str
    """Registry name `<model>/<site><layer>/<size>[-<variant>]`, or a free name for unregistered folders."""
    aliases: list[str] = Field(default_factory=list)
    """Other names the dictionary answers to."""
    architecture: Architecture
    """The kind of dictionary module."""
    d_in: int = Field(gt=0)
    """Width of the activation it reads."""
    d_dict: int = Field(gt=0)
    """Number of features."""
    k: int | None = Field(default=None, gt=0)
    """Active features per token for topk (per token on average for batchtopk)."""
    pre_encoder_bias: bool = True
    """Whether b_dec is subtracted from the input before encoding (Bricken et al. 2023)."""
    dtype: str = "float32"
    """Dtype of the stored weights."""
    license: str | None = None
    """SPDX license id of the weights, None if unknown."""
    authors: list[str] = Field(default_factory=list)
    """Authors of the dictionary."""
    links: Links = Field(default_factory=Links)
    """Paper, code, Neuronpedia."""
    model: ModelRef | None = None
    """The model the dictionary belongs to, None when unknown (some foreign folders)."""
    hook: HookPoint | None = None
    """Where it attaches, None when unknown."""
    files: Files
    """Its files."""
    stats: Stats | None = None
    """Headline stats, measured or reported."""
    recipe: Recipe | None = None
    """The training recipe that regenerates it."""
    provenance: Provenance = Field(default_factory=Provenance)
    """Where it came from."""

    @model_validator(mode="after")
    def _consistent(self) -> Card:
        if self.architecture in ("topk", "batchtopk") and self.k is None:
            raise ValueError(f"architecture {self.architecture} needs `k`")
        if self.architecture not in ("topk", "batchtopk") and self.k is not None:
            raise ValueError(f"`k` is only for topk/batchtopk, not {self.architecture}")
        return self

    @property
    def verified(self) -> bool:
        """True when every file has a recorded sha256."""
        return self.files.verified

    def to_json(self) -> str:
        """The card as the `card.json` of a native folder."""
        return json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2) + "\n"


def format_validation_error(path: str, error: ValidationError) -> CardError:
    """Turn pydantic's error into a CardError naming the file, the first bad field and the problem."""
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "<root>"
    problem = first["msg"]
    if first["type"] == "extra_forbidden":
        problem = "unknown field (not part of the card schema; see `dictctl schema`)"
    more = len(error.errors()) - 1
    if more:
        problem += f" (and {more} more problem{'s' if more > 1 else ''})"
    return CardError(path, field, problem)


def parse_card(data: Any, path: str) -> Card:
    """Validate a card from parsed YAML/JSON, raising a CardError that names `path`."""
    if not isinstance(data, dict):
        raise CardError(path, "<root>", f"a card is a mapping, found {type(data).__name__}")
    try:
        return Card.model_validate(data)
    except ValidationError as e:
        raise format_validation_error(path, e) from None


def read_card(path: str | Path) -> Card:
    """Read a card from a `.yaml`/`.yml` or `.json` file."""
    import yaml

    path = Path(path)
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise CardError(str(path), "<root>", f"not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    return parse_card(data, str(path))


def card_schema() -> dict:
    """The JSON Schema of a card (`dictctl schema`)."""
    return Card.model_json_schema()
