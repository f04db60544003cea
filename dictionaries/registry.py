"""The registry: `registry.yaml` (name -> where the files live + card file) and the cards under `cards/`.

Loading validates every card and the index as a whole (a name listed twice is an error, whatever the YAML
style); look-ups go by name or alias, and an unknown name raises an error listing the closest names.
`resolve` turns what a user types to mean dictionaries (a name, alias or glob, a folder or a glob of
folders, an `hf://` path) into `Ref`s, the one resolver every command uses. `register_entry` writes an
entry and its card as one change (a journal that the next reader finishes if a kill cut it). Nothing here
imports torch, so `dictctl list` answers at once. The registry read is the one shipped with the package, or
the one `DICTIONARIES_REGISTRY` points to.
"""

from __future__ import annotations

import difflib
import fnmatch
import glob
import os
import re
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, get_args

import yaml
from pydantic import Field, ValidationError, field_validator

from dictionaries.card import (
    NAME_PATTERN,
    REVISION_PATTERN,
    Card,
    format_validation_error,
    read_card,
    repo_id_problem,
)
from dictionaries.constants import CARD_FILE, ENV_REGISTRY
from dictionaries.errors import (
    CardError,
    InvalidArgumentError,
    MissingFileError,
    RegistryError,
    UnknownNameError,
)
from dictionaries.files import locked, relative_path_problem, replay_journal, write_together
from dictionaries.recipe import Architecture, Site, Strict


def _valid_repo(repo: str) -> str:
    problem = repo_id_problem(repo)  # refused here, not deep inside huggingface_hub at download time
    if problem:
        raise ValueError(problem)
    return repo


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

    _repo = field_validator("repo")(_valid_repo)


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

    _repo = field_validator("repo")(_valid_repo)


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


class _UniqueKeyLoader(yaml.SafeLoader):
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


# ---- references: what a user types to mean dictionaries --------------------------------------------
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


# ---- writing an entry ------------------------------------------------------------------------------
def register_entry(card: Card, location: HubLocation, registry_path: str | Path | None = None) -> Path:
    """Write (or replace) the entry in registry.yaml and its card in cards/ as one change; the registry path.

    `publish --register` and `mirror` call it only after the commit it points at exists. Comments and other
    entries in registry.yaml are kept: only the entry's own block is replaced or appended. Both files go
    through one journal (`files.write_together`): a kill between the card and registry.yaml is finished by
    the next `load_registry` or registration, so the registry never pins one commit while the card holds
    another's hashes. If the registry no longer validates afterwards, both are put back as they were.
    """
    reg = Path(registry_path) if registry_path else default_registry_path()
    with _registry_lock(reg):
        replay_journal(_journal(reg))  # a registration killed half-way is finished first
        for pattern in (f".{reg.name}.*.tmp", f".{_journal(reg).name}.*.tmp"):  # a killed registration's
            for stale in reg.parent.glob(pattern):                                # write_atomic temporaries
                stale.unlink(missing_ok=True)
        text = reg.read_text()
        old = ((yaml.safe_load(text) or {}).get("entries") or {}).get(card.name)
        card_rel = old["card"] if old else f"{card.name}.yaml"
        card_path = reg.parent / "cards" / card_rel
        old_card = card_path.read_text() if card_path.exists() else None
        header = f"# Card of {card.name}: see DESIGN.md section 4 and `dictctl schema`.\n"
        card_text = header + yaml.safe_dump(card.model_dump(mode="json", exclude_none=True), sort_keys=False,
                                            width=110)
        new_text = _replace_entry(text, card.name, entry_block(card.name, card_rel, location))
        write_together(_journal(reg), {card_path: card_text, reg: new_text})
        try:
            Registry(reg)  # validated as load_registry would (which would wait on the lock held here)
        except BaseException:
            write_together(_journal(reg), {card_path: old_card, reg: text})
            raise
    return reg


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


def entry_block(name: str, card_rel: str, location: HubLocation) -> str:
    """The lines of registry.yaml for one entry."""
    body = {name: {"card": card_rel, "location": location.model_dump(mode="json")}}
    return "\n".join("  " + line for line in yaml.safe_dump(body, sort_keys=False).splitlines()) + "\n"


def _replace_entry(text: str, name: str, block: str) -> str:
    """registry.yaml's text with `name`'s block replaced (or appended), comments elsewhere kept."""
    lines = text.splitlines(keepends=True)
    head = re.compile(rf"^  ['\"]?{re.escape(name)}['\"]?:\s*$")
    start = next((i for i, line in enumerate(lines) if head.match(line)), None)
    if start is None:
        return text + ("" if text.endswith("\n") else "\n") + block
    end = start + 1
    while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
        end += 1
    return "".join(lines[:start]) + block + "".join(lines[end:])
