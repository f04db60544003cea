"""Hook names of other libraries mapped to nnsight module paths of Hugging Face models.

TransformerLens (SAELens' `blocks.L.hook_mlp_out`, ...), dictionary_learning (`mlp_out_layer3`, the folder
names of the pythia sets) and sparsify (`layers.3.mlp`, relative to the base model) each name hook points
their own way. Each name is mapped onto a site of `model_families.py` (resid_pre, mlp_out, ...) and so onto
the module of that site in the model's family; the family comes from the model's name (a card's model) or,
passed as `fam`, from a loaded model's config. Without a family the hook point is left unset (None). Pure
strings: nothing here imports torch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dictionaries.model_families import CARD_SITE, SITES, Family, embed_path, guess_family, site_path

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
    """The model-family name (`gpt_neox`, `gpt2`, `gemma2`, ...) a model name points to, None when unknown."""
    fam = guess_family(model)
    return fam.name if fam else None


def _site(model: str | None, site: str, layer: int, fam: Family | None) -> dict | None:
    """HookPoint fields of a table site, None when the family is unknown or has no module for the site."""
    fam = fam or guess_family(model)
    found = site_path(fam, site, layer) if fam else None
    return None if found is None or isinstance(found, str) else found.card_fields


def _embed(model: str | None, io: str, fam: Family | None) -> dict | None:
    fam = fam or guess_family(model)
    return fam and {"module": embed_path(fam), "io": io, "site": "embed", "layer": None}


_TL = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_mid|hook_resid_post|hook_mlp_in|hook_mlp_out|"
                 r"hook_attn_out|attn\.hook_z|mlp\.hook_post|ln2\.hook_normalized)$")
_TL_SITES = {"hook_resid_pre": "resid_pre", "hook_resid_mid": "resid_mid", "hook_resid_post": "resid_post",
             "hook_mlp_in": "resid_mid", "hook_mlp_out": "mlp_out", "hook_attn_out": "attn_out",
             "attn.hook_z": "attn_z", "mlp.hook_post": "mlp_post", "ln2.hook_normalized": "mlp_in"}
"""TransformerLens hook -> table site. hook_mlp_in is the MLP block's input before its norm, i.e. resid_mid
(TransformerBlock.forward); ln2.hook_normalized is what the MLP reads (mlp_in)."""


def saelens_site(hook_name: str) -> tuple[str, int] | None:
    """The (table site, layer) of a TransformerLens hook name such as `blocks.3.hook_resid_post`; None if other."""
    m = _TL.match(hook_name or "")
    return (_TL_SITES[m.group(2)], int(m.group(1))) if m else None


def saelens_hook(model: str | None, hook_name: str | None, fam: Family | None = None) -> dict | None:
    """HookPoint fields for a TransformerLens hook name; None when the name, the family or its module is unknown
    (resid_mid of a parallel block has none).

    resid_pre L is the input of block L, kept in the card as the resid output of block L - 1 (or embed);
    attn.hook_z (heads flattened) is the input of the attention's output projection and mlp.hook_post the
    input of the MLP's down projection.
    """
    if hook_name == "hook_embed":
        return _embed(model, "output", fam)
    m = _TL.match(hook_name or "")
    return _site(model, _TL_SITES[m.group(2)], int(m.group(1)), fam) if m else None


_DL_SUBMODULE = re.compile(r"^(mlp|attn|resid)[a-z_]*?_?layer_?(\d+)$")


def dictionary_learning_model(folder: Path) -> str | None:
    """The model named by a dictionary_learning folder path `<model>/<submodule>/<set>/` (the pythia sets),
    when its family is known; None otherwise."""
    parent = folder.resolve().parent
    looks_like_set = parent.name == "embed" or _DL_SUBMODULE.match(parent.name)
    return model_id(parent.parent.name) if looks_like_set and family(parent.parent.name) else None


def dictionary_learning_hook(model: str | None, submodule: Any, layer: Any, io: Any,
                             folder: Path, fam: Family | None = None) -> tuple[dict | None, str]:
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
        return _embed(model, io, fam), how
    m = _DL_SUBMODULE.match(str(submodule or ""))
    site = m and {("mlp", "output"): "mlp_out", ("mlp", "input"): "mlp_in", ("attn", "output"): "attn_out",
                  ("resid", "output"): "resid_post", ("resid", "input"): "resid_pre"}.get((m.group(1), io))
    if not site:
        return None, f"submodule {submodule!r} ({io}) not mapped to a module path: set card.hook by hand" \
            if submodule else ""
    return _site(model, site, int(m.group(2)), fam), how


def _sparsify_site(fam: Family, rel: str) -> str | None:
    """The card site of a module path relative to block L: a table site's module read at its output, or the
    module holding an mlp or attention site (Gemma 2's `mlp`, whose output the post-norm follows)."""
    if rel == "":
        return "resid"
    paths = {site: fam.sites[site].partition(":") for site in SITES if site in fam.sites}
    for site, (module, _, io) in paths.items():
        if module == rel and io == "output":
            return CARD_SITE[site]
    for site, (module, _, _) in paths.items():
        if CARD_SITE[site] != "resid" and (module == rel or module.startswith(rel + ".")):
            return CARD_SITE[site]
    return None


def sparsify_hook(model: str | None, hookpoint: str, fam: Family | None = None) -> dict | None:
    """HookPoint fields for a sparsify hookpoint (a module path under the model's base model, read at its
    output); None when the family is unknown or the module is no site of it."""
    fam = fam or guess_family(model)
    if fam is None:
        return None
    module = f"{fam.base}.{hookpoint}"
    if hookpoint == fam.embed:
        return {"module": module, "io": "output", "site": "embed", "layer": None}
    m = re.match(rf"^{re.escape(fam.layers)}\.(\d+)(?:\.(.+))?$", hookpoint)
    site = m and _sparsify_site(fam, m.group(2) or "")
    return {"module": module, "io": "output", "site": site, "layer": int(m.group(1))} if site else None


_TL_BY_CARD_SITE = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}


def transformerlens_hook(model: str | None, hook: Any) -> str | None:
    """The TransformerLens hook name of a card's hook point (what SAELens' cfg.json records as hook_name): the name
    whose module and io (saelens_hook) are the card's, for the model's family; without a family (or a match), the
    name of the card's site kind at its layer (resid -> hook_resid_post, mlp -> hook_mlp_out, attn ->
    hook_attn_out, embed -> hook_embed). None without a hook point."""
    if hook is None:
        return None
    embed = hook.site == "embed" or hook.layer is None
    names = ["hook_embed", "blocks.0.hook_resid_pre"] if embed else [
        f"blocks.{layer}.{name}" for layer in (hook.layer, hook.layer + 1) for name in _TL_SITES]
    for tl in names:  # a block's input is recorded as the previous block's resid, so layer + 1 is tried too
        found = saelens_hook(model, tl)
        if found and (found["module"], found["io"]) == (hook.module, hook.io):
            return tl
    return "hook_embed" if embed else f"blocks.{hook.layer}.{_TL_BY_CARD_SITE[hook.site]}"
