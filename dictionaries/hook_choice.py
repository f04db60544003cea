"""Hook points for dictionaries of unknown models: chosen by the user, or found in the loaded model.

A foreign folder of a model the package does not know arrives with no hook point in its card (the model's
family, and so its module paths, is unknown). `hook_spec` checks what `--hook MODULE_PATH[:input|:output]`
or `--site S --layer L` say; `card_hook` turns that into a card's HookPoint without a model (`convert`: a
(site, layer) needs a known family in the card's model id); `model_hook` turns it into a HookPoint checked
against a loaded model (`eval`, `inspect`), and without one reads the foreign config's own hook name again
(SAELens' hook_name, sparsify's folder, dictionary_learning's submodule_name) and places it with the loaded
model's `config.model_type`, which names the family the card could not.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Union

from dictionaries.errors import HookPointError, InvalidArgumentError
from dictionaries.hookpoints import saelens_site, sparsify_hook
from dictionaries.model_families import SITES, family_of, guess_family, site_path
from dictionaries.recipe import HookPoint

HookSpec = Union[str, tuple[str, int]]
"""A module path ("transformer.h.3", "...:input") or a (site, layer) pair ("resid_post", 3)."""

_NO_HOOK = ("the card names no hook point and none could be found for this model; pass --hook MODULE_PATH"
            "[:input|:output] or --site SITE --layer L.")


def hook_spec(hook: str | None = None, site: str | None = None, layer: int | None = None) -> HookSpec | None:
    """The hook the user gave (None: none); InvalidArgumentError / HookPointError for a bad combination or value."""
    if hook is not None and (site is not None or layer is not None):
        raise InvalidArgumentError("--hook", hook, "give either --hook or --site with --layer, not both")
    if (site is None) != (layer is None):
        given = f"--site {site}" if layer is None else f"--layer {layer}"
        raise InvalidArgumentError("--site/--layer", given, "--site and --layer go together: give both")
    if hook is not None:
        path, _, io = hook.partition(":")
        if not path or not re.fullmatch(r"[A-Za-z0-9_.]+", path) or io not in ("", "input", "output"):
            raise HookPointError(hook, problem="expected MODULE_PATH, MODULE_PATH:input or MODULE_PATH:output.")
        return hook
    if site is None:
        return None
    if site not in SITES or layer < 0:
        raise HookPointError(f"{site}@{layer}", problem=f"sites are {', '.join(SITES)}, at a layer >= 0.")
    return site, layer


def _path_fields(path: str, io: str) -> dict[str, Any]:
    """HookPoint fields of a plain module path: its layer is the first index in it, its site guessed from its
    names (the card's site only describes the entry for listing; the path is what is attached to); a block's
    input is kept as model_families' SiteHook.card_fields keeps resid_pre (the previous block's resid)."""
    numbers = re.findall(r"\.(\d+)(?:\.|$)", path)
    layer = int(numbers[0]) if numbers else None
    tail = path.lower()
    if io == "input" and layer is not None and re.search(rf"\.{layer}$", path):  # a block's input: as resid_pre
        return {"module": path, "io": io, "site": "resid" if layer else "embed", "layer": layer - 1 if layer else None}
    site = ("embed" if layer is None and re.search(r"emb|wte", tail) else
            "attn" if "attn" in tail or "attention" in tail else
            "mlp" if re.search(r"mlp|intermediate|ffn|feed_forward|fc\d|\.output\.dense", tail) else "resid")
    return {"module": path, "io": io or "output", "site": site, "layer": layer}


def card_hook(card: Any, spec: HookSpec) -> HookPoint:
    """A card's HookPoint for `spec` without a model: a path as given; a (site, layer) through the family of
    the card's model id (HookPointError when it names none the table knows)."""
    if isinstance(spec, str):
        path, _, io = spec.partition(":")
        return HookPoint(**_path_fields(path, io))
    site, layer = spec
    model = card.model.id if card.model is not None else None
    fam = guess_family(model)
    if fam is None:
        raise HookPointError(f"{site}@{layer}", problem=f"the card's model {model!r} is of no family in "
                             "dictionaries/model_families.py; give --hook MODULE_PATH instead.")
    found = site_path(fam, site, layer)
    if isinstance(found, str):
        raise HookPointError(f"{site}@{layer}", problem=f"{found}.")
    return HookPoint(**found.card_fields)


def model_hook(model: Any, card: Any, spec: HookSpec | None = None) -> HookPoint:
    """The HookPoint to use in this loaded model: `spec` when given, else the card's, else the foreign config's
    hook name placed by the model's architecture; HookPointError when none is found."""
    from dictionaries.hooks import find_hook, parse_hook, site_hook

    if spec is None and card.hook is not None:
        # A family guessed from the card's model name assumes a head model (`bert.encoder...`); a bare base
        # model loaded from a folder lacks that prefix, so the foreign name is placed in the model itself.
        return card.hook if _has_module(model, card.hook.module) else (_foreign_hook(model, card) or card.hook)
    if spec is None:
        found = _foreign_hook(model, card)
        if found is None:
            raise HookPointError("<none>", problem=_NO_HOOK)
        return found
    if isinstance(spec, str):
        find_hook(model, spec)  # HookPointError naming close module names when the path is not in the model
        return HookPoint(**_path_fields(*parse_hook(spec)))
    return HookPoint(**site_hook(model, *spec).card_fields)


def _has_module(model: Any, path: str) -> bool:
    from dictionaries.hooks import torch_model

    try:
        torch_model(model).get_submodule(path)
    except AttributeError:
        return False
    return True


def _foreign_hook(model: Any, card: Any) -> HookPoint | None:
    """The hook named in the original SAELens, sparsify or dictionary_learning folder (still on disk) placed in
    `model`."""
    from dictionaries.files import read_json
    from dictionaries.hooks import site_hook, torch_model

    source = card.files.source or card.provenance.original
    folder = Path(source) if source and "://" not in source else None
    if folder is not None and (folder / "ae.pt").is_file():  # dictionary_learning: its config's submodule_name
        from dictionaries.dictionary_learning_format import dictionary_learning_hook_in

        fam = family_of(getattr(getattr(torch_model(model), "config", None), "model_type", None))
        fields = dictionary_learning_hook_in(folder, fam) if fam else None
        return HookPoint(**fields) if fields else None
    if folder is None or not (folder / "cfg.json").is_file():
        return None
    cfg = read_json(folder / "cfg.json")
    flat = {**cfg, **(cfg.get("metadata") or {})} if isinstance(cfg, dict) else {}
    name = flat.get("hook_name") or flat.get("hook_point")
    if name:  # SAELens: a TransformerLens name, found through the table of the model's own family
        where = saelens_site(str(name))
        return HookPoint(**site_hook(model, *where).card_fields) if where else None
    fam = family_of(getattr(getattr(torch_model(model), "config", None), "model_type", None))
    fields = sparsify_hook(None, folder.name, fam) if fam else None  # sparsify: the folder is the hookpoint
    return HookPoint(**fields) if fields else None


def set_hooks(model: Any, dictionaries: Any, spec: HookSpec | None = None) -> None:
    """Give every dictionary's card the hook point `model_hook` finds for it in `model` (cards are replaced,
    not edited: a card is shared by every module loaded from it)."""
    for d in dictionaries:
        d.card = d.card.model_copy(update={"hook": model_hook(model, d.card, spec)})
