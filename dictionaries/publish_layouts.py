"""Publishing layouts: what a published repo folder holds besides (or instead of) the native files.

`native` (publish.py alone): card.json + weights.safetensors. `saelens`: SAELens' `cfg.json` +
`sae_weights.safetensors` (foreign_writers.saelens_files; `sparsity.safetensors` too when the folder holds
`dictctl eval`'s density) and a card.json describing those files (format
saelens), so that both SAELens (`SAE.from_pretrained(repo, subfolder)`, `SAE.load_from_disk`) and this package
(by folder, hf:// path or registry entry) load it. `both`: the native files and the SAELens pair side by side in
one commit (this package reads the native pair first, SAELens its own). The model card's front matter then says
`library_name: saelens` (what the Hub, Neuronpedia's and SAEDashboard's SAELens-based tools look for) with
`base_model` and tags, and the README shows the SAELens call; SAELens' cfg.json carries model_name, hook_name
and neuronpedia_id in its metadata.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dictionaries.card import Card, FileEntry, Files
from dictionaries.constants import CARD_FILE, DENSITY_FILE, WEIGHTS_FILE
from dictionaries.errors import InvalidArgumentError

LAYOUTS = ("native", "saelens", "both")
SAELENS_FILES = ("cfg.json", "sae_weights.safetensors")


def check_layout_name(layout: str, subfolder: str) -> str:
    """`layout` if known; SAELens loads a repo's SAE from a folder (its sae_id), so its layouts need a subfolder."""
    if layout not in LAYOUTS:
        raise InvalidArgumentError("--layout", layout, f"expected one of {', '.join(LAYOUTS)}")
    if layout != "native" and not subfolder:
        raise InvalidArgumentError("--subfolder", "", f"--layout {layout} needs a subfolder: SAELens loads a repo's "
                                                      "SAE from a folder, SAE.from_pretrained(repo, subfolder)")
    return layout


def stage_layout(staged: dict[str, Path | bytes], folder: Path, card: Card, subfolder: str,
                 layout: str) -> dict[str, Path | bytes]:
    """`staged` (the native upload: repo path -> file or bytes) with the SAELens files added (`both`) or put in
    place of the native weights and card (`saelens`). The dictionary is read from `folder` through the checked
    native reader, so the SAELens tensors are exactly the published ones."""
    from dictionaries.foreign_writers import saelens_files
    from dictionaries.formats import read_folder

    if layout == "native":
        return staged
    files = saelens_files(read_folder(folder, format="native", card=card), card)
    if (folder / DENSITY_FILE).is_file():
        files["sparsity.safetensors"] = saelens_sparsity(folder / DENSITY_FILE)
    staged = {**staged, **{f"{subfolder}/{name}": data for name, data in files.items()}}  # a subfolder is required
    if layout == "saelens":
        del staged[f"{subfolder}/{WEIGHTS_FILE}"]
        items = [FileEntry(path=n, size=len(b), sha256=hashlib.sha256(b).hexdigest()) for n, b in files.items()]
        own = card.model_copy(update={"files": Files(format="saelens", items=items, source=card.files.source)})
        staged[f"{subfolder}/{CARD_FILE}"] = own.to_json().encode()
    return staged


def saelens_sparsity(density: Path) -> bytes:
    """SAELens' `sparsity.safetensors` from `dictctl eval`'s density.safetensors: `sparsity` = log10(frequency +
    1e-10), [F], as SAELens' trainer saves it (training/sae_trainer.py _log_feature_sparsity) and its
    `from_pretrained` returns beside the SAE (the feature density SAEDashboard and Neuronpedia show)."""
    import torch
    from safetensors.torch import save

    from dictionaries.files import load_safetensors

    frequency = load_safetensors(density)["frequency"].float()
    return save({"sparsity": torch.log10(frequency + 1e-10).contiguous()})


def staged_card(content: Path | bytes) -> Card:
    """The card of a staged card.json (bytes, or the staging copy of a dry run)."""
    data = content if isinstance(content, bytes) else Path(content).read_bytes()
    return Card.model_validate(json.loads(data))


def front_matter(meta: dict, layout: str) -> dict:
    """The model card's YAML front matter for `layout` (the native one is `meta`)."""
    if layout == "native":
        return meta
    return {**meta, "library_name": "saelens", "tags": [*meta["tags"], "saelens", "dictionaries"]}


def usage_lines(repo: str, subfolder: str, layout: str) -> list[str]:
    """The README's SAELens section."""
    if layout == "native":
        return []
    return ["## Use with SAELens", "", "```python", "from sae_lens import SAE", "",
            f'sae = SAE.from_pretrained("{repo}", "{subfolder}")   # cfg.json + sae_weights.safetensors', "```", ""]
