"""The card of a dictionary (DESIGN.md section 4) as strict pydantic models, and reading cards from files.

A card is what a researcher reads before trusting a dictionary: identity and architecture, the model and
hook point it reads, its files with hashes, measured or reported stats, the recipe that regenerates it
(`recipe.py`) and its provenance. Cards live as YAML under `cards/` and as `card.json` inside each native
folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from dictionaries.errors import CardError, MissingFileError
from dictionaries.files import relative_path_problem
from dictionaries.recipe import (
    MAX_SIZE,
    Architecture,
    DatasetSpec,
    Dtype,
    HookPoint,
    ModelRef,
    Recipe,
    Strict,
    k_problem,
    transcoder_defaults,
    transcoder_problem,
)

SourceFormat = Literal["native", "dictionary_learning", "saelens", "sparsify", "gemma_scope", "llama_scope",
                       "goodfire"]
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.\-]*/(embed|attn|mlp|resid)(\d+)?/\d+(-[a-z0-9][a-z0-9\-]*)?$")
REVISION_PATTERN = re.compile(r"^[0-9a-f]{40}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
HUB_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.\-]{0,94}[A-Za-z0-9_])?$")


def repo_id_problem(repo: str) -> str | None:
    """Why the Hub would refuse `repo` as a repo id `org/name` (huggingface_hub's own rules), else None."""
    parts = repo.split("/")
    if len(parts) != 2:
        return "a repo id has exactly one '/' between the organisation (or user) and the name"
    for part in parts:
        if not HUB_NAME_PATTERN.match(part) or "--" in part or ".." in part or part.endswith(".git"):
            return (f"{part!r} is not a Hub name (letters, digits, '-', '_' and '.', at most 96, not starting or "
                    "ending in '-' or '.', no '--' or '..')")
    return None


class Links(Strict):
    """Where to read more about a dictionary."""

    paper: str | None = None
    """The paper or post that introduced the dictionary or its recipe."""
    code: str | None = None
    """The code that trained it originally."""
    neuronpedia: str | None = None
    """The Neuronpedia id of the dictionary, where one exists."""


class FileEntry(Strict):
    """One file of a dictionary, relative to its folder."""

    path: str
    """Path relative to the dictionary's folder (or Hub subfolder)."""
    size: int | None = Field(default=None, ge=0)
    """Size in bytes, None until first hashed."""
    sha256: str | None = None
    """Hex sha256, None until first hashed (the entry is then not verified)."""

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str) -> str:
        problem = relative_path_problem(v)  # a card may never name a file outside its folder
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and not SHA256_PATTERN.match(v):
            raise ValueError("sha256 must be 64 lower-case hex digits")
        return v


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


class EvalSet(Strict):
    """Exactly which tokens the stats were measured on."""

    dataset: DatasetSpec
    """The whole dataset spec: path, configuration name, split, column, revision."""
    seed: int | None = None
    """Seed of the shuffled document order the contexts were read in (None: stored order)."""
    prepend_bos: bool = False
    """Whether each context started with the tokenizer's BOS token."""
    contexts: int
    """How many contexts: the first ones of that stream."""
    held_out: str | None = None
    """How these tokens relate to the training data, e.g. the documents a training run skipped; None: unknown."""


class Stats(Strict):
    """The stats of DESIGN.md section 7, with how and where they were obtained."""

    source: Literal["measured", "reported"]
    """`measured` by this package's evaluation, or `reported` by the original authors."""
    reference: str | None = None
    """For reported stats, where they were reported (URL)."""
    dataset: str | None = None
    """The eval dataset (its path or id; `eval_set` holds the whole spec)."""
    eval_set: EvalSet | None = None
    """Exactly which tokens were measured: dataset spec, order, BOS setting, count, relation to training."""
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
    hidden_change_spliced: float | None = None
    """No LM head, so no loss to recover: mean over tokens of ||h_spliced - h_clean|| / ||h_clean|| (final state)."""
    hidden_change_zero: float | None = None
    """The same relative change of the final hidden state with the activation replaced by zeros."""
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


class Card(Strict):
    """Everything known about one dictionary."""

    name: str
    """Registry name `<model>/<site><layer>/<size>[-<variant>]`, or a free name for unregistered folders."""
    aliases: list[str] = Field(default_factory=list)
    """Other names the dictionary answers to."""
    architecture: Architecture
    """The kind of dictionary module."""
    d_in: int = Field(gt=0, le=MAX_SIZE)
    """Width of the activation it reads."""
    d_dict: int = Field(gt=0, le=MAX_SIZE)
    """Number of features."""
    k: int | None = Field(default=None, gt=0, le=MAX_SIZE)
    """Active features per token for topk (per token on average for batchtopk)."""
    pre_encoder_bias: bool = True
    """Whether b_dec is subtracted from the input before encoding (Bricken et al. 2023)."""
    dtype: Dtype = "float32"
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
    """Where it attaches (a transcoder: where it reads), None when unknown."""
    output_hook: HookPoint | None = None
    """Transcoders: where the prediction is written (e.g. the MLP's output); None: an SAE reconstructing `hook`."""
    d_out: int | None = Field(default=None, gt=0, le=MAX_SIZE)
    """Transcoders: width of the output hook's activation where it differs from d_in; None: d_in."""
    skip: bool = False
    """The output adds a linear term x @ W_skip [d_in, d_out] (Paulo et al. 2025's skip-transcoders; sparsify's
    skip_connection on an SAE)."""
    files: Files
    """Its files."""
    stats: Stats | None = None
    """Headline stats, measured or reported."""
    recipe: Recipe | None = None
    """The training recipe that regenerates it."""
    provenance: Provenance = Field(default_factory=Provenance)
    """Where it came from."""

    @model_validator(mode="before")
    @classmethod
    def _transcoder_bias(cls, data: Any) -> Any:
        return transcoder_defaults(data)

    @model_validator(mode="after")
    def _consistent(self) -> Card:
        problem = k_problem(self.architecture, self.k) or transcoder_problem(
            self.output_hook, self.pre_encoder_bias, self.skip, self.d_out)
        if problem:
            raise ValueError(problem)
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


def safe_yaml_loader() -> type:
    """PyYAML's safe loader on libyaml's C parser where the wheel has it (about 10x faster), else the Python one."""
    import yaml

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_card(path: str | Path) -> Card:
    """Read a card from a `.yaml`/`.yml` or `.json` file."""
    import yaml

    path = Path(path)
    text = _card_text(path)
    try:
        # libyaml's parser where PyYAML has it: the registry reads every card at each command's start, and the
        # pure-Python parser took 1.7 s of `dictctl list`'s 2.2 s for 166 cards
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=safe_yaml_loader())
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise CardError(str(path), "<root>", f"not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    return parse_card(data, str(path))


def _card_text(path: Path) -> str:
    """A card file's text; one that is absent, not a file or not UTF-8 is an error naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MissingFileError(str(path), "No card there.") from None
    except UnicodeDecodeError as e:
        raise CardError(str(path), "<root>", f"not UTF-8 text (byte {e.start}: {e.reason}); save the card as "
                                             "UTF-8") from None
    except OSError as e:  # a folder, or no permission to read it
        raise CardError(str(path), "<root>", f"cannot be read ({e.strerror or e})") from None


def card_schema() -> dict:
    """The JSON Schema of a card (`dictctl schema`)."""
    return Card.model_json_schema()


def compare_stats(a: Card, b: Card) -> tuple[tuple[str, str], list[tuple[str, Any, Any, float | None]]]:
    """Two cards' stats side by side: ((name A, name B), [(stat, A, B, B - A or None)]) for `dictctl compare`.

    Nested figures (density, sensitivity) are flattened as `density.dead`, `sensitivity.random`, ...;
    B - A is None where either value is not a number (booleans and strings included).
    """
    flat = [_flatten(c.stats.model_dump(exclude_none=True) if c.stats else {}) for c in (a, b)]
    keys = list(dict.fromkeys([*flat[0], *flat[1]]))
    names = (a.name, b.name if b.name != a.name else f"{b.name} (B)")

    def diff(x: Any, y: Any) -> float | None:
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y))
        return y - x if numbers else None

    return names, [(k, flat[0].get(k), flat[1].get(k), diff(flat[0].get(k), flat[1].get(k))) for k in keys]


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"density": {"dead": 3}} -> {"density.dead": 3}."""
    return {key: val for k, v in d.items()
            for key, val in (_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}).items()}
