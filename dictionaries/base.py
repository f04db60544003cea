"""The strict pydantic base every model of the package inherits, and the small types cards and recipes share.

Cards (`card.py`) and their recipe section (`recipe_spec.py`) both build on these: the architecture and
site names, the name/revision/hash patterns, and where a dictionary sits in a model (ModelRef, HookPoint).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict


Architecture = Literal["relu", "topk", "batchtopk", "jumprelu", "gated"]
Site = Literal["embed", "attn", "mlp", "resid"]
SourceFormat = Literal["native", "dictionary_learning", "saelens", "sparsify"]
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.\-]*/(embed|attn|mlp|resid)(\d+)?/\d+(-[a-z0-9][a-z0-9\-]*)?$")
REVISION_PATTERN = re.compile(r"^[0-9a-f]{40}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


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
