"""Pin states of registry entries, and pinning: an entry's commit and file hashes resolved and recorded.

An entry is `pinned` when its files' commit (Hub locations) and every file's sha256 are in its card; `unhashed`
when the commit (or plain URL) is known but the hashes are not (the Pythia-70m releases); `unpinned` when a Hub
entry names no commit at all (`revision: null`: the public releases added from their documentation, which could
not be fetched where they were written). `dictctl pin` resolves the current commit, downloads, hashes and
rewrites the card and registry.yaml through `registration.register_entry` (one journalled change).

Loading an unpinned entry does the same into the local cache instead of the registry: the first load warns
(UnverifiedFilesWarning, with the commit and the hashes), resolves the branch's commit, downloads and hashes
the files and records them in `<HF_HOME>/dictionaries/pins/`; every later load on this machine reads that
record and fetches at that commit with those hashes, so a repo that moves afterwards does not move the load.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from dictionaries.card import FileEntry
from dictionaries.errors import UnverifiedFilesWarning
from dictionaries.files import sha256_of, write_atomic
from dictionaries.locations import HubLocation, HubZipLocation, Location
from dictionaries.registry import Entry, load_registry

PinState = Literal["pinned", "unhashed", "unpinned"]


def pin_state(entry: Entry) -> PinState:
    """`unpinned` (no commit), `unhashed` (commit or URL known, some file without sha256) or `pinned`."""
    location = entry.location
    if isinstance(location, HubLocation) and location.revision is None:
        return "unpinned"
    hashed = entry.card.verified and not (isinstance(location, HubZipLocation) and location.sha256 is None)
    return "pinned" if hashed else "unhashed"


def _record_path(entry: Entry) -> Path:
    """Where this machine records the commit and hashes an unpinned entry was first loaded at: keyed by the
    entry's name, location and file list, so that a changed card is resolved afresh."""
    from dictionaries.hub import dictionaries_cache

    key = json.dumps([entry.name, entry.location.model_dump(mode="json"), [f.path for f in entry.card.files.items]])
    return dictionaries_cache() / "pins" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def local_pin(entry: Entry) -> tuple[HubLocation, list[FileEntry]] | None:
    """The (pinned location, hashed files) recorded on this machine for an unpinned entry, or None."""
    try:
        data = json.loads(_record_path(entry).read_text())
        return (HubLocation.model_validate(data["location"]),
                [FileEntry.model_validate(f) for f in data["files"]])
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or a damaged record: resolved again
        return None


def resolve_pin(entry: Entry, *, progress: bool = True) -> tuple[Location, list[FileEntry]]:
    """The entry's location at the commit its branch points to now (Hub entries without one) and its files,
    each downloaded there and hashed (a file the card already hashes is verified against it by `fetch`)."""
    from dictionaries.fetch import fetch
    from dictionaries.hub import resolve_commit

    location: Location = entry.location
    if isinstance(location, HubLocation) and location.revision is None:
        commit = resolve_commit(location.repo, "main", repo_type=location.repo_type)
        location = location.model_copy(update={"revision": commit})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedFilesWarning)  # the hashes are what this returns
        folder = fetch(location, entry.card.files.items, progress=progress)
    files = []
    for f in entry.card.files.items:
        path = folder / f.path
        files.append(f.model_copy(update={"sha256": f.sha256 or sha256_of(path), "size": path.stat().st_size}))
    if isinstance(location, HubZipLocation) and location.sha256 is None:
        from dictionaries.hub import download_hub_file  # cached by the fetch above: no second download

        archive = download_hub_file(location.repo, location.filename, location.revision, progress=progress)
        location = location.model_copy(update={"sha256": sha256_of(archive), "size": archive.stat().st_size})
    return location, files


def files_to_load(entry: Entry, *, progress: bool = True) -> tuple[Location, list[FileEntry]]:
    """The location and files a load fetches: the card's, unless the entry is unpinned; then this machine's
    record, made on the first load (which warns once with the commit and hashes it recorded)."""
    if pin_state(entry) != "unpinned":
        return entry.location, list(entry.card.files.items)
    recorded = local_pin(entry)
    if recorded is not None:
        return recorded
    location, files = resolve_pin(entry, progress=progress)
    record = {"name": entry.name, "location": location.model_dump(mode="json"),
              "files": [f.model_dump(mode="json") for f in files], "date": datetime.date.today().isoformat()}
    write_atomic(_record_path(entry), json.dumps(record, indent=1))
    from dictionaries.fetch import describe

    warnings.warn(UnverifiedFilesWarning(
        f"{entry.name} is unpinned in the registry; pinned on this machine to {describe(location)} (later loads "
        f"stay there; `dictctl pin {entry.name}` records it in the card)",
        {f.path: (f.sha256 or "", f.size or 0) for f in files}), stacklevel=3)
    return location, files


def pin(refs: Sequence[str], *, registry_path: str | Path | None = None,
        progress: bool = True) -> list[tuple[str, str, PinState]]:
    """`dictctl pin`: resolve, download and hash every entry the names or globs match that is not pinned yet,
    and rewrite its card and registry line pinned; (name, where it is pinned now, the state it had) each."""
    from dictionaries.fetch import describe
    from dictionaries.registration import register_entry

    registry = load_registry(registry_path)
    entries = {e.name: e for ref in refs for e in registry.match(ref)}
    done = []
    for name, entry in entries.items():
        before = pin_state(entry)
        if before == "pinned":
            done.append((name, describe(entry.location), before))
            continue
        location, files = resolve_pin(entry, progress=progress)
        note = f"Pinned on {datetime.date.today().isoformat()} by `dictctl pin`: {describe(location)}."
        card = entry.card.model_copy(update={
            "files": entry.card.files.model_copy(update={"items": files}),
            "provenance": entry.card.provenance.model_copy(update={"notes": [*entry.card.provenance.notes, note]})})
        register_entry(card, location, registry.path)
        done.append((name, describe(location), before))
    return done

