"""`load_dictionary`: a ready torch module from a registry name, a local folder or an `hf://` Hub folder.

A reference is resolved once (`references.resolve_one`). A registry name (or alias) is fetched at its pinned
revision with every file checked against the card (`fetch.fetch`), then read in the format the card names
(`formats.read_folder`). A local folder or an unregistered Hub folder is read from its own `card.json`
(native) or foreign config (detected).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dictionaries.errors import UnknownNameError
from dictionaries.references import resolve, resolve_one
from dictionaries.registry import Entry, Registry, load_registry

if TYPE_CHECKING:
    import torch

    from dictionaries.architectures import Dictionary


def load_dictionary(ref: str | Path, *, device: torch.device | str | None = None,
                    dtype: torch.dtype | str | None = None, force_download: bool = False,
                    registry: Registry | None = None) -> Dictionary:
    """The dictionary `ref` names, created directly on `device` with `dtype` when given.

    `ref` is one of: a registry name or alias (`pythia70m/mlp3/8192`); a local folder (an explicit path such
    as `./runs/d`, or any existing directory that is not a registry name); `hf://org/repo/sub@rev`.
    `force_download` fetches the files again even when they are cached.
    """
    from dictionaries.fetch import fetch_hub_folder
    from dictionaries.formats import read_folder

    found = resolve_one(ref, registry)
    if found.hub is not None:
        return read_folder(fetch_hub_folder(found.hub, force=force_download), device=device, dtype=dtype)
    if found.folder is not None:
        return read_folder(found.folder, device=device, dtype=dtype)
    entry = found.entry
    folder = fetch_entry(entry, force=force_download)
    return read_folder(folder, format=entry.card.files.format, card=entry.card, device=device, dtype=dtype)


def fetch_entry(entry: Entry, *, force: bool = False, progress: bool = True, verify: bool = False) -> Path:
    """Download a registry entry's files into the cache (verified) and return their folder."""
    from dictionaries.fetch import fetch
    from dictionaries.pinning import files_to_load

    location, files = files_to_load(entry, progress=progress)  # an unpinned entry: this machine's pin
    return fetch(location, files, force=force, progress=progress, verify=verify)


def download(refs: list[str], *, force: bool = False, progress: bool = True,
             registry: Registry | None = None) -> dict[str, Path]:
    """`dictctl download`: fetch every entry the names or globs match, re-hashing every file (the load path's
    stat-based shortcut cannot see bit rot); name -> cached folder."""
    reg = registry if registry is not None else load_registry()
    found = [r for ref in refs for r in resolve(ref, reg)]
    others = [r.text for r in found if r.entry is None]
    if others:
        raise UnknownNameError(others[0], others[1:5], problem="is not a registry entry (download fetches registry "
                                                               "entries; a folder or hf:// path is loaded as it is)")
    entries = {r.entry.name: r.entry for r in found}
    return {name: fetch_entry(e, force=force, progress=progress, verify=True) for name, e in entries.items()}
