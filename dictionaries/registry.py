"""The registry: `registry.yaml` (name -> where the files live + card file) and the cards under `cards/`.

Loading validates every card and the index as a whole (a name listed twice is an error, whatever the YAML
style); look-ups go by name or alias, and an unknown name raises an error listing the closest names. Where
the files live is `locations.py`; what a user types is resolved in `references.py`; an entry is written by
`registration.py` (a journal that the reader here finishes if a kill cut it). Nothing here imports torch, so
`dictctl list` answers at once. The registry read is the one shipped with the package, or the one
`DICTIONARIES_REGISTRY` points to.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import ValidationError, field_validator

from dictionaries.card import (
    NAME_PATTERN,
    REVISION_PATTERN,
    Card,
    format_validation_error,
    read_card,
    safe_yaml_loader,
)
from dictionaries.constants import ENV_REGISTRY
from dictionaries.errors import CardError, InvalidArgumentError, RegistryError, UnknownNameError
from dictionaries.files import locked, relative_path_problem, replay_journal
from dictionaries.locations import HubLocation, HubZipLocation, Location, UrlLocation
from dictionaries.recipe import Architecture, Site, Strict

__all__ = ["HubLocation", "HubZipLocation", "Location", "UrlLocation", "Registry", "Entry", "load_registry",
           "default_registry_path"]  # the locations stay importable from here, where they lived first


class IndexEntry(Strict):
    """One line of registry.yaml."""

    card: str
    """Card path relative to `cards/`."""
    location: Location
    """Where the files live."""

    @field_validator("card")
    @classmethod
    def _inside_cards(cls, v: str) -> str:
        problem = relative_path_problem(v)  # an entry may never read a card from outside cards/
        if problem:
            raise ValueError(problem)
        return v


class Index(Strict):
    """registry.yaml as a whole."""

    version: Literal[1] = 1
    """Format version of registry.yaml."""
    entries: dict[str, IndexEntry]
    """Name -> entry."""


@dataclass(frozen=True)
class Entry:
    """A registry entry: its name, card and file location."""

    name: str
    card: Card
    location: HubLocation | HubZipLocation | UrlLocation

    @property
    def site(self) -> str | None:
        return self.card.hook.site if self.card.hook else None

    @property
    def layer(self) -> int | None:
        return self.card.hook.layer if self.card.hook else None


def default_registry_path() -> Path:
    """registry.yaml: `$DICTIONARIES_REGISTRY`, else the copy inside the installed wheel, else the checkout's."""
    if os.environ.get(ENV_REGISTRY):
        return Path(os.environ[ENV_REGISTRY]).expanduser()
    here = Path(__file__).resolve().parent
    shipped = here / "_registry" / "registry.yaml"
    return shipped if shipped.exists() else here.parent / "registry.yaml"


class Registry:
    """The validated registry: every card parsed, names and aliases unique."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.cards_dir = self.path.parent / "cards"
        self.entries: dict[str, Entry] = {}
        self._aliases: dict[str, str] = {}
        index = self._read_index()
        for name, item in index.entries.items():
            self._add(name, item)

    def _read_index(self) -> Index:
        if not self.path.exists():
            raise RegistryError(f"no registry at {self.path} (set {ENV_REGISTRY} to a registry.yaml)")
        try:
            data = yaml.load(self.path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise CardError(str(self.path), "<root>", f"not valid UTF-8 YAML: {str(e).splitlines()[0]}") from None
        except IsADirectoryError:
            raise RegistryError(f"{self.path} is a folder, not a registry.yaml "
                                f"(point {ENV_REGISTRY} at the file)") from None
        try:
            index = Index.model_validate(data)
        except ValidationError as e:
            raise format_validation_error(str(self.path), e) from None
        for name, item in index.entries.items():
            rev = getattr(item.location, "revision", None)
            if rev is not None and not REVISION_PATTERN.match(rev):
                raise CardError(str(self.path), f"entries.{name}.location.revision",
                                f"{rev!r} is not a 40-hex commit; pin entries to commits, not branches")
        return index

    def _add(self, name: str, item: IndexEntry) -> None:
        where = f"{self.path}: entry {name!r}"
        if not NAME_PATTERN.match(name):
            raise CardError(str(self.path), f"entries.{name}",
                            "name must look like <model>/<site><layer>/<size>[-<variant>]")
        card_path = self.cards_dir / item.card
        if not card_path.exists():
            raise RegistryError(f"{where}: card file {card_path} does not exist")
        card = read_card(card_path)
        if card.name != name:
            raise CardError(str(card_path), "name", f"card says {card.name!r} but registry.yaml lists it as {name!r}")
        for key in (name, *card.aliases):
            if key in self.entries or key in self._aliases:
                raise RegistryError(f"{where}: name or alias {key!r} is used twice")
        self.entries[name] = Entry(name, card, item.location)
        self._aliases.update({alias: name for alias in card.aliases})

    # ---- look-up -------------------------------------------------------------------------------
    def get(self, name: str) -> Entry:
        """The entry for a name or alias; an unknown name raises UnknownNameError with close matches."""
        key = name.strip().lower()
        key = self._aliases.get(key, key)
        if key in self.entries:
            return self.entries[key]
        raise UnknownNameError(name, self.suggest(name))

    def __contains__(self, name: str) -> bool:
        key = name.strip().lower()
        return key in self.entries or key in self._aliases

    def suggest(self, name: str, n: int = 5) -> list[str]:
        """The names (and aliases) closest to `name`."""
        candidates = [*self.entries, *self._aliases]
        return difflib.get_close_matches(name.strip().lower(), candidates, n=n, cutoff=0.5)

    def match(self, pattern: str) -> list[Entry]:
        """Entries whose name matches a glob (`pythia70m/mlp*/8192`); a plain name must exist."""
        if not any(c in pattern for c in "*?["):
            return [self.get(pattern)]
        found = [e for n, e in self.entries.items() if fnmatch.fnmatchcase(n, pattern.lower())]
        if not found:
            raise UnknownNameError(pattern, self.suggest(pattern.replace("*", "")))
        return found

    def filter(self, *, model: str | None = None, site: str | None = None, layer: int | None = None,
               size: int | None = None, architecture: str | None = None) -> list[Entry]:
        """Entries matching every given criterion; `model` matches the name prefix or the HF id. A site or
        architecture that does not exist is an error (a typo would otherwise list nothing, as if none existed)."""
        for what, value, known in (("site", site, get_args(Site)), ("architecture", architecture,
                                                                     get_args(Architecture))):
            if value is not None and value not in known:
                raise InvalidArgumentError(what, value, f"expected one of {', '.join(known)}")
        out = []
        for e in self.entries.values():
            c = e.card
            if model and not (e.name.split("/")[0] == model.lower()
                              or (c.model and c.model.id.lower() == model.lower())):
                continue
            if site and e.site != site:
                continue
            if layer is not None and e.layer != layer:
                continue
            if size is not None and c.d_dict != size:
                continue
            if architecture and c.architecture != architecture:
                continue
            out.append(e)
        return out


class _UniqueKeyLoader(safe_yaml_loader()):
    """A safe YAML loader that refuses a key listed twice in one mapping, in block or flow style alike
    (plain YAML keeps the last silently, which would let a second entry re-point a name)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is listed twice (lines {seen[key] + 1} and "
                                f"{key_node.start_mark.line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


@lru_cache(maxsize=8)
def _load(path: str, mtime: float) -> Registry:
    return Registry(path)


def load_registry(path: str | Path | None = None) -> Registry:
    """The registry at `path` (default: `default_registry_path()`), validated; cached until the file changes."""
    p = Path(path) if path is not None else default_registry_path()
    _finish_registration(p)
    mtime = p.stat().st_mtime if p.exists() else 0.0
    return _load(str(p), mtime)



def _journal(reg: Path) -> Path:
    """The journal of a registration in progress (or killed), beside registry.yaml."""
    return reg.parent / f".{reg.name}.journal"


def _finish_registration(reg: Path) -> None:
    """Replay the journal a killed registration left, before reading; under the lock, so that a registration
    in progress is waited for instead of read half-done. A registry we may not write is read as it is."""
    if _journal(reg).exists():
        try:
            with _registry_lock(reg):
                replay_journal(_journal(reg))
        except OSError:
            pass


def _registry_lock(reg: Path) -> AbstractContextManager[None]:
    """Serialise registrations into one registry (two publishes at once would otherwise lose an entry): a lock
    on the registry's folder, the same for every process whatever its temp folder, and no file added."""
    return locked(reg.parent)
