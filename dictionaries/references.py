"""References: what a user types to mean dictionaries, resolved against the registry.

`resolve` turns a name, alias or glob, a folder or a glob of folders, or an `hf://` path into `Ref`s, the one
resolver every command uses; `card_of` reads the card a reference names without downloading anything.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dictionaries.card import Card, read_card
from dictionaries.constants import CARD_FILE
from dictionaries.errors import MissingFileError, UnknownNameError
from dictionaries.registry import Entry, Registry, load_registry


@dataclass(frozen=True)
class Ref:
    """One dictionary a reference resolved to: exactly one of `entry`, `folder`, `hub` is set."""

    text: str
    entry: Entry | None = None
    folder: Path | None = None
    hub: str | None = None  # an hf:// path, parsed by hub.parse_hub_path where it is fetched


_PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")


def resolve(refs: str | Path | Sequence[str | Path], registry: Registry | None = None) -> list[Ref]:
    """Every dictionary meant by `refs`: registry names, aliases and globs; folders (an explicit path, or an
    existing folder that is not a registry name) and globs of folders; `hf://org/repo/sub@rev` paths."""
    if isinstance(refs, (list, tuple)):
        return [r for item in refs for r in resolve(item, registry)]
    text = str(refs)
    if text.startswith("hf://"):
        return [Ref(text, hub=text)]
    path = Path(text).expanduser()
    if not path.is_dir() and any(c in text for c in "*?["):  # a glob of folders, if it matches any
        folders = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_dir())
        if folders:
            return [Ref(str(p), folder=p) for p in folders]
    explicit = isinstance(refs, Path) or text.startswith(_PATH_PREFIXES)
    reg = registry if registry is not None or explicit else load_registry()
    if explicit or (path.is_dir() and text not in reg):
        if not path.is_dir():
            raise MissingFileError(str(path), "No such folder (give a registry name, a folder or hf://org/repo/folder).")
        return [Ref(text, folder=path)]
    return [Ref(e.name, entry=e) for e in reg.match(text)]


def resolve_one(ref: str | Path, registry: Registry | None = None) -> Ref:
    """The one dictionary `ref` means; a glob matching several is an error naming them."""
    found = resolve(ref, registry)
    if len(found) != 1:
        raise UnknownNameError(str(ref), [r.text for r in found[:5]],
                               problem=f"matches {len(found)} dictionaries; give one name or folder")
    return found[0]


def card_of(ref: str | Path, registry: Registry | None = None) -> Card:
    """The card of a registry name or of a native folder's card.json (no download, no torch)."""
    found = resolve_one(ref, registry)
    if found.entry is not None:
        return found.entry.card
    if found.folder is None or not (found.folder / CARD_FILE).is_file():
        where = found.folder / CARD_FILE if found.folder is not None else found.text
        raise MissingFileError(str(where), "Only registry names and native folders (with card.json) have a card "
                                           "to read here.")
    return read_card(found.folder / CARD_FILE)
