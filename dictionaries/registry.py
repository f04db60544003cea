"""The registry: `registry.yaml` (name -> where the files live + card file) and the cards under `cards/`.

Loading validates every card and the index as a whole; look-ups go by name or alias, and an unknown name
raises an error listing the closest names. Nothing here imports torch, so `dictctl list` answers at once.
The registry read is the one shipped with the package, or the one `DICTIONARIES_REGISTRY` points to.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, ValidationError

from dictionaries.card import NAME_PATTERN, REVISION_PATTERN, Card, Strict, format_validation_error, read_card
from dictionaries.errors import CardError, RegistryError, UnknownNameError

ENV_REGISTRY = "DICTIONARIES_REGISTRY"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class HubLocation(Strict):
    """Files in a Hub repo folder, at a pinned commit."""

    kind: Literal["hub"] = "hub"
    """Discriminator."""
    repo: str
    """Hub repo id `org/name`."""
    revision: str
    """The 40-hex commit the files are pinned to."""
    subfolder: str = ""
    """Folder inside the repo holding the files ('' for the root)."""
    repo_type: Literal["model", "dataset"] = "model"
    """Kind of Hub repo."""


class HubZipLocation(Strict):
    """Files inside a zip archive in a Hub repo, at a pinned commit."""

    kind: Literal["hub_zip"] = "hub_zip"
    """Discriminator."""
    repo: str
    """Hub repo id `org/name`."""
    revision: str
    """The 40-hex commit the archive is pinned to."""
    filename: str
    """Path of the zip in the repo."""
    size: int | None = None
    """Size of the zip in bytes."""
    sha256: str | None = None
    """sha256 of the whole zip."""
    member: str
    """Folder inside the zip holding the dictionary's files (ending in `/`)."""


class UrlLocation(Strict):
    """Files at a plain HTTPS folder (original releases outside the Hub)."""

    kind: Literal["url"] = "url"
    """Discriminator."""
    url: str
    """Base URL; each file's path is appended to it."""


Location = Annotated[HubLocation | HubZipLocation | UrlLocation, Field(discriminator="kind")]


class IndexEntry(Strict):
    """One line of registry.yaml."""

    card: str
    """Card path relative to `cards/`."""
    location: Location
    """Where the files live."""


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
            data = yaml.load(self.path.read_text(), Loader=_Loader)
        except yaml.YAMLError as e:
            raise CardError(str(self.path), "<root>", f"not valid YAML: {e}") from None
        _reject_duplicate_keys(self.path)
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
            raise CardError(str(self.path), f"entries.{name}", "name must look like <model>/<site><layer>/<size>[-<variant>]")
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
        """Entries matching every given criterion; `model` matches the name prefix or the HF id."""
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


def _reject_duplicate_keys(path: Path) -> None:
    """YAML silently keeps the last of two equal keys; a duplicated registry name is an error instead."""
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        m = re.match(r"^  ([^\s#][^:]*):\s*$", line)
        if m:
            name = m.group(1).strip().strip("'\"")
            if name in seen:
                raise CardError(str(path), f"entries.{name}", f"listed twice (lines {seen[name]} and {number})")
            seen[name] = number


@lru_cache(maxsize=8)
def _load(path: str, mtime: float) -> Registry:
    return Registry(path)


def load_registry(path: str | Path | None = None) -> Registry:
    """The registry at `path` (default: `default_registry_path()`), validated; cached until the file changes."""
    p = Path(path) if path is not None else default_registry_path()
    mtime = p.stat().st_mtime if p.exists() else 0.0
    return _load(str(p), mtime)
