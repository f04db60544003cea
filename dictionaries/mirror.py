"""Mirroring a registry entry onto the Hub in native format, evaluated where possible, and pinned there.

`mirror(name, "org/name")` fetches the entry's original files (a plain URL with hash check, or the member of
a Hub zip, through `fetch.fetch`), converts them to a native folder (`formats`), runs the evaluation it is
handed when a model can be loaded (the CLI hands it `training.evaluate`; `dictionaries/` never imports
`training/`), publishes the folder (`publish.publish`) and re-points the registry entry at the new
commit. The original files stay named in `card.provenance.original` and `card.files.source`.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from dictionaries import __version__
from dictionaries.card import Card, Files, read_card
from dictionaries.constants import CARD_FILE
from dictionaries.files import owned_tempdir
from dictionaries.localhub import LocalHub
from dictionaries.publish import PublishResult, check_repo_id, publish
from dictionaries.registry import Entry, load_registry

Evaluator = Callable[[Path], object]
"""Measures a native folder's stats and writes them into its card.json (e.g. training.evaluate)."""


def mirrored_card(entry: Entry, original: str) -> Card:
    """The entry's card for its native copy: same identity, stats and recipe; files to be written natively,
    the original location kept in provenance."""
    card = entry.card
    when = datetime.date.today().isoformat()
    note = (f"Mirrored on {when} by dictionaries {__version__}: converted from {card.files.format} files at "
            f"{original} to the native format.")
    provenance = card.provenance.model_copy(update={
        "original": card.provenance.original or original,
        "notes": [*card.provenance.notes, note]})
    files = Files(format="native", items=[], source=original)
    return card.model_copy(update={"files": files, "provenance": provenance})


def convert_entry(entry: Entry, dest: Path, *, progress: bool = True) -> Card:
    """Fetch the entry's original files and write them to `dest` as a native folder; the card written."""
    from dictionaries.fetch import describe, fetch
    from dictionaries.formats import read_folder, write_native
    from dictionaries.pinning import files_to_load

    location, files = files_to_load(entry, progress=progress)  # an unpinned entry: at the commit it resolves to
    original = describe(location)
    source = fetch(location, files, progress=progress)
    dictionary = read_folder(source, format=entry.card.files.format, card=entry.card)
    return write_native(dictionary, dest, card=mirrored_card(entry, original))


def run_evaluation(folder: Path, evaluate: Evaluator | None, why_not: str) -> str:
    """Run `evaluate` on the folder; when there is none or no model can be loaded (OSError, which covers
    unreachable hubs and missing model files), say so in the card's provenance notes: the stats stay as
    they were. Returns one line saying what happened (the last of the result's notes)."""
    if evaluate is not None:
        try:
            evaluate(folder)
            return "evaluated: the card's stats are now measured by this package"
        except OSError as e:  # ConnectionError, HubUnreachableError, transformers' missing-model OSError
            why_not = f"no model could be loaded for evaluation ({type(e).__name__}: {e})"
    card = read_card(folder / CARD_FILE)
    kept = card.stats.source if card.stats else "absent"
    note = f"Not evaluated when mirrored: {why_not}; stats stay {kept}."
    card = card.model_copy(update={"provenance": card.provenance.model_copy(
        update={"notes": [*card.provenance.notes, note]})})
    (folder / CARD_FILE).write_text(card.to_json())  # card.json itself is not among the hashed files
    return note


def mirror(name: str, repo: str, *, subfolder: str | None = None, branch: str = "main", force: bool = False,
           register: bool = True, evaluate: Evaluator | None = None, why_not: str = "no evaluator was given",
           endpoint: str | None = None, token: str | None = None, local_hub: LocalHub | str | Path | None = None,
           registry_path: str | Path | None = None, progress: bool = True) -> PublishResult:
    """Fetch, convert, evaluate (when possible), publish and pin the registry entry `name`.

    `subfolder` defaults to the entry's name (`pythia70m/mlp3/8192`), so one repo can hold a whole set.
    With `register` (the default) the entry in the registry at `registry_path` (default: the one in use)
    is re-pointed at the new commit, after the commit succeeded.
    """
    check_repo_id(repo)
    registry = load_registry(registry_path)
    entry = registry.get(name)
    with owned_tempdir("dictionaries-mirror-") as work:  # removed by a later run if this one is killed
        folder = work / "native"
        convert_entry(entry, folder, progress=progress)
        evaluated = run_evaluation(folder, evaluate, why_not)
        result = publish(folder, repo, subfolder=entry.name if subfolder is None else subfolder, branch=branch,
                         force=force, register=register, endpoint=endpoint, token=token, local_hub=local_hub,
                         registry_path=registry.path if register else None)
    return replace(result, notes=[*(result.notes or []), evaluated])
