"""`load_dictionary`: a ready torch module from a registry name, a local folder or an `hf://` Hub folder.

A registry name (or alias) is fetched at its pinned revision with every file checked against the card
(`hub.fetch`), then read in the format the card names (`formats.read_folder`). A local folder or an
unregistered Hub folder is read from its own `card.json` (native) or foreign config (detected).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dictionaries.errors import MissingFileError
from dictionaries.registry import Registry, load_registry

if TYPE_CHECKING:
    import torch

    from dictionaries.architectures import Dictionary

_PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")


def load_dictionary(name_or_path: str | Path, *, device: torch.device | str | None = None,
                    dtype: torch.dtype | str | None = None, force_download: bool = False,
                    registry: Registry | None = None) -> Dictionary:
    """The dictionary named `name_or_path`, created directly on `device` with `dtype` when given.

    `name_or_path` is one of: a registry name or alias (`pythia70m/mlp3/8192`); a local folder (an explicit
    path such as `./runs/d`, or any existing directory that is not a registry name); `hf://org/repo/sub@rev`.
    `force_download` fetches the files again even when they are cached.
    """
    from dictionaries.formats import read_folder

    text = str(name_or_path)
    if text.startswith("hf://"):
        from dictionaries.hub import fetch_card_and_files, parse_hub_path

        folder = fetch_card_and_files(parse_hub_path(text), force=force_download)
        return read_folder(folder, device=device, dtype=dtype)
    folder = _local_folder(name_or_path, registry)
    if folder is not None:
        return read_folder(folder, device=device, dtype=dtype)
    reg = registry if registry is not None else load_registry()
    entry = reg.get(text)  # UnknownNameError with the closest names
    folder = fetch_entry(entry.name, force=force_download, registry=reg)
    return read_folder(folder, format=entry.card.files.format, card=entry.card, device=device, dtype=dtype)


def fetch_entry(name: str, *, force: bool = False, progress: bool = True, registry: Registry | None = None) -> Path:
    """Download a registry entry's files into the cache (verified) and return their folder."""
    from dictionaries.hub import fetch

    reg = registry if registry is not None else load_registry()
    entry = reg.get(name)
    return fetch(entry.location, entry.card.files.items, force=force, progress=progress)


def download(names: list[str], *, force: bool = False, progress: bool = True,
             registry: Registry | None = None) -> dict[str, Path]:
    """`dictctl download`: fetch (and verify) every entry matching the names or globs; name -> cached folder."""
    reg = registry if registry is not None else load_registry()
    entries = {e.name: e for pattern in names for e in reg.match(pattern)}
    return {name: fetch_entry(name, force=force, progress=progress, registry=reg) for name in entries}


def _local_folder(name_or_path: str | Path, registry: Registry | None) -> Path | None:
    """The folder meant by an explicit path, or an existing directory that is not a registry name; else None."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    explicit = isinstance(name_or_path, Path) or text.startswith(_PATH_PREFIXES)
    if explicit:
        if not path.is_dir():
            raise MissingFileError(str(path), "No such folder (give a registry name, a folder or hf://org/repo/folder).")
        return path
    if path.is_dir():
        reg = registry if registry is not None else load_registry()
        if text not in reg:
            return path
    return None
