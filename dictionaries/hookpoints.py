"""Hook names of other libraries mapped to nnsight module paths of Hugging Face models.

TransformerLens (SAELens' `blocks.L.hook_mlp_out`, ...), dictionary_learning (`mlp_out_layer3`, the folder
names of the pythia sets) and sparsify (`layers.3.mlp`, relative to the base model) each name hook points
their own way. A name becomes a HookPoint (module, io, site, layer) only when the model family is known
(GPT-NeoX, GPT-2, Llama-like); otherwise it is left unset. Pure strings: nothing here imports torch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# family -> module paths, "{L}" standing for the block index
FAMILIES: dict[str, dict[str, str]] = {
    "gpt_neox": {"base": "gpt_neox", "block": "gpt_neox.layers.{L}", "mlp": "gpt_neox.layers.{L}.mlp",
                 "attn": "gpt_neox.layers.{L}.attention", "attn_z": "gpt_neox.layers.{L}.attention.dense",
                 "mlp_post": "gpt_neox.layers.{L}.mlp.dense_4h_to_h", "embed": "gpt_neox.embed_in"},
    "gpt2": {"base": "transformer", "block": "transformer.h.{L}", "mlp": "transformer.h.{L}.mlp",
             "attn": "transformer.h.{L}.attn", "attn_z": "transformer.h.{L}.attn.c_proj",
             "mlp_post": "transformer.h.{L}.mlp.c_proj", "embed": "transformer.wte"},
    "llama": {"base": "model", "block": "model.layers.{L}", "mlp": "model.layers.{L}.mlp",
              "attn": "model.layers.{L}.self_attn", "attn_z": "model.layers.{L}.self_attn.o_proj",
              "mlp_post": "model.layers.{L}.mlp.down_proj", "embed": "model.embed_tokens"},
}
_ORGS = {"pythia-": "EleutherAI/", "gemma-": "google/"}


def model_id(name: Any) -> str | None:
    """A Hugging Face id for a model name as other libraries write it (`pythia-70m-deduped` ->
    `EleutherAI/pythia-70m-deduped`, `gpt2-small` -> `gpt2`); None for no name."""
    if not name or not isinstance(name, str):
        return None
    if name == "gpt2-small":
        return "gpt2"
    for prefix, org in _ORGS.items():
        if name.startswith(prefix):
            return org + name
    return name


def family(model: str | None) -> str | None:
    """gpt_neox, gpt2 or llama (Llama, Mistral, Qwen, Gemma: `model.layers.L`), None when unknown."""
    name = (model or "").lower()
    if "pythia" in name or "neox" in name:
        return "gpt_neox"
    if "gpt2" in name:
        return "gpt2"
    if any(f in name for f in ("llama", "mistral", "qwen", "gemma")):
        return "llama"
    return None


def _hook(model: str | None, part: str, site: str, layer: int | None, io: str = "output") -> dict | None:
    fam = family(model)
    if fam is None:
        return None
    return {"module": FAMILIES[fam][part].replace("{L}", str(layer)), "io": io, "site": site,
            "layer": layer if site != "embed" else None}


_TL = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_mlp_out|hook_attn_out|attn\.hook_z|"
                 r"mlp\.hook_post)$")


def saelens_hook(model: str | None, hook_name: str | None) -> dict | None:
    """HookPoint fields for a TransformerLens hook name; None when the name or the family is unknown.

    resid_pre L is the input of block L; attn.hook_z (heads flattened) is the input of the attention's
    output projection and mlp.hook_post the input of the MLP's down projection. resid_mid has no module.
    """
    if hook_name == "hook_embed":
        return _hook(model, "embed", "embed", None)
    m = _TL.match(hook_name or "")
    if not m:
        return None
    layer, what = int(m.group(1)), m.group(2)
    if what == "hook_resid_pre":  # the input of block L is the output of block L-1 (or the embedding)
        hook = _hook(model, "block", "resid", layer, io="input")
        return hook and {**hook, "site": "resid" if layer else "embed", "layer": layer - 1 if layer else None}
    part, site, io = {"hook_resid_post": ("block", "resid", "output"), "hook_mlp_out": ("mlp", "mlp", "output"),
                      "hook_attn_out": ("attn", "attn", "output"), "attn.hook_z": ("attn_z", "attn", "input"),
                      "mlp.hook_post": ("mlp_post", "mlp", "input")}[what]
    return _hook(model, part, site, layer, io=io)


_DL_SUBMODULE = re.compile(r"^(mlp|attn|resid)[a-z_]*?_?layer_?(\d+)$")


def dictionary_learning_model(folder: Path) -> str | None:
    """The model named by a dictionary_learning folder path `<model>/<submodule>/<set>/` (the pythia sets),
    when its family is known; None otherwise."""
    parent = folder.resolve().parent
    looks_like_set = parent.name == "embed" or _DL_SUBMODULE.match(parent.name)
    return model_id(parent.parent.name) if looks_like_set and family(parent.parent.name) else None


def dictionary_learning_hook(model: str | None, submodule: Any, layer: Any, io: Any,
                             folder: Path) -> tuple[dict | None, str]:
    """HookPoint fields from dictionary_learning's `submodule_name` (`mlp_out_layer3`, `resid_post_layer_3`,
    `embed`) or, without one, its folder name (the pythia sets: `.../mlp_out_layer3/0_8192/`), or `layer`
    alone (dictionary_learning's `get_submodule` then means the block's output). Also a note saying how."""
    how = ""
    if not submodule:
        if folder.parent.name == "embed" or _DL_SUBMODULE.match(folder.parent.name):
            submodule, how = folder.parent.name, f"hook point taken from the folder name {folder.parent.name!r}"
        elif isinstance(layer, int):
            submodule, how = f"resid_layer{layer}", f"hook point: output of block {layer} (config names only layer)"
    io = "input" if io == "in" else "output"
    if submodule == "embed":
        return _hook(model, "embed", "embed", None, io), how
    m = _DL_SUBMODULE.match(str(submodule or ""))
    if not m:
        return None, f"submodule {submodule!r} not mapped to a module path: set card.hook by hand" if submodule else ""
    site, n = m.group(1), int(m.group(2))
    return _hook(model, {"resid": "block"}.get(site, site), site, n, io), how


_SPARSIFY = re.compile(r"^(?:layers|h)\.(\d+)(?:\.(mlp|attention|self_attn|attn))?$")


def sparsify_hook(model: str | None, hookpoint: str) -> dict | None:
    """HookPoint fields for a sparsify hookpoint (a module path under the model's base model)."""
    fam = family(model)
    if fam is None:
        return None
    m = _SPARSIFY.match(hookpoint)
    if hookpoint in ("embed_in", "wte", "embed_tokens"):
        site, layer = "embed", None
    elif m:
        site, layer = ("resid" if m.group(2) is None else "mlp" if m.group(2) == "mlp" else "attn"), int(m.group(1))
    else:
        return None
    return {"module": f"{FAMILIES[fam]['base']}.{hookpoint}", "io": "output", "site": site, "layer": layer}
