"""Publishing a native dictionary folder: validate, stage, upload in one commit, give back its registry entry.

`publish(folder, "org/name")` re-hashes every file the card lists and checks the weights' tensor names and
shapes against the card before anything leaves the machine, refuses to replace a different dictionary at
the target without `force`, stages the repo contents (the folder's files where they are, card.json and a
README.md model card with Hub YAML front matter as bytes: no temporary copies for a kill to leave behind)
and uploads them in ONE commit: to the real Hub through `hub.upload_commit` (`HfApi.create_commit`), or to
a local hub (DESIGN.md section 5) by committing into its git mirror, all or nothing, with the target
checked again under the repo's lock (`LocalHub.commit`). The registry entry pins the commit created;
`register=True` writes it into registry.yaml and cards/ as one change (`registration.register_entry`) only
after the commit exists, so an interrupted publish registers nothing, or the whole entry.

A local hub is chosen by passing a `LocalHub` (or its root folder) as `local_hub`, or by setting
`DICTIONARIES_LOCAL_HUB` to its root; anything else goes to the Hub at `endpoint` (default `HF_ENDPOINT`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from dictionaries import __version__
from dictionaries.card import NAME_PATTERN, Card, FileEntry, read_card
from dictionaries.constants import (
    CARD_FILE,
    DEFAULT_ENDPOINT,
    ENV_LOCAL_HUB,
    README_FILE,
    WEIGHTS_FILE,
)
from dictionaries.errors import (
    CardError,
    CardFilesMismatchError,
    FormatError,
    LocalHubError,
    MissingFileError,
    PublishError,
    RepoNameError,
    TargetOccupiedError,
)
from dictionaries.files import sha256_of
from dictionaries.localhub import LocalHub
from dictionaries.registration import entry_block, register_entry
from dictionaries.registry import HubLocation

# Hub repo id parts: letters, digits, '-', '_', '.'; no '--' or '..'; not starting/ending in '-' or '.'.
_REPO_PART = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.\-]{0,94}[A-Za-z0-9_])?$")
_BRANCH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./\-]{0,199}$")
DASHBOARD_DIR = "dashboard"
"""Where a dashboard site goes in the repo (beside the weights)."""


@dataclass(frozen=True)
class PublishResult:
    """What a publish did (or, for a dry run, would do)."""

    name: str
    card: Card
    target: str
    staged: Path  # the staging folder (dry run, --staging-dir), else the folder the files went up from
    uploaded: list[str]
    location: HubLocation | None = None
    dry_run: bool = False
    registered: Path | None = None
    notes: list[str] | None = None

    def entry_yaml(self) -> str:
        """The registry.yaml lines for this entry (empty for a dry run: no commit exists yet)."""
        if self.location is None:
            return ""
        return entry_block(self.name, f"{self.name}.yaml", self.location)


# ---- checks that need nothing but the arguments ------------------------------------------------
def check_repo_id(repo: str) -> str:
    """`repo` if it is a valid Hub model repo id `org/name`, else RepoNameError saying why."""
    parts = repo.split("/")
    if len(parts) != 2:
        raise RepoNameError(repo, "it needs exactly one '/' between the organisation (or user) and the name")
    for part in parts:
        if not _REPO_PART.match(part):
            raise RepoNameError(repo, f"{part!r} has a character the Hub does not allow, is empty or too long")
        if "--" in part or ".." in part or part.endswith(".git"):
            raise RepoNameError(repo, f"{part!r} contains '--' or '..' or ends in '.git'")
    return repo


def check_subfolder(subfolder: str) -> str:
    """A clean relative posix path ('' for the repo root), else RepoNameError."""
    sub = subfolder.strip("/")
    parts = sub.split("/") if sub else []
    if any(p in ("", ".", "..") or p.startswith(".") for p in parts) or "\\" in sub:
        raise RepoNameError(subfolder, "the subfolder must be a relative path without '.', '..' or hidden parts")
    return sub


# ---- the folder --------------------------------------------------------------------------------
def validate_folder(folder: str | Path) -> Card:
    """The folder's card, after re-hashing every file it lists and checking the weights against it."""
    folder = Path(folder)
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        raise MissingFileError(str(card_path), "Publishing needs a native folder: convert it first "
                                               "(`dictctl convert SRC DST`) or write it with formats.write_native.")
    card = read_card(card_path)
    if card.files.format != "native":
        raise FormatError(str(folder), f"card.json says the files are {card.files.format!r}; only native folders "
                                       "are published (`dictctl convert` writes one)")
    for item in card.files.items:
        path = folder / item.path
        if item.path == CARD_FILE:  # a registry card copied into a folder: card.json cannot hash itself
            continue
        if not path.is_file():
            raise MissingFileError(str(path), "card.json lists it but the folder does not have it.")
        if item.size is not None and path.stat().st_size != item.size:
            raise CardFilesMismatchError(str(path), "size", f"{item.size} bytes", f"{path.stat().st_size} bytes")
        digest = sha256_of(path)
        if digest != item.sha256:
            raise CardFilesMismatchError(str(path), "sha256", item.sha256, digest)
    if not any(item.path == WEIGHTS_FILE for item in card.files.items):
        raise CardFilesMismatchError(str(folder / WEIGHTS_FILE), "listing", "the weights listed", "not listed")
    check_weights(folder / WEIGHTS_FILE, card)
    return card


def check_weights(path: Path, card: Card) -> None:
    """The weights' tensor names, shapes and dtypes are exactly those of the card's module, every value finite."""
    from dictionaries.architectures import build_dictionary
    from dictionaries.files import check_weight_values, load_safetensors

    expected = {k: tuple(p.shape) for k, p in build_dictionary(card, device="meta").named_parameters()}
    state = load_safetensors(path)  # a file that is not safetensors is a FormatError naming it
    found = {k: tuple(v.shape) for k, v in state.items()}
    if set(found) != set(expected):
        raise CardFilesMismatchError(str(path), "the tensor names", sorted(expected), sorted(found))
    for key, shape in expected.items():
        if found[key] != shape:
            raise CardFilesMismatchError(str(path), f"the shape of {key!r}", shape, found[key])
        dtype = str(state[key].dtype).removeprefix("torch.")
        if dtype != card.dtype:
            raise CardFilesMismatchError(str(path), f"the dtype of {key!r}", card.dtype, dtype)
    check_weight_values(state, str(path))


def upload_list(folder: Path, card: Card) -> list[Path]:
    """The local files that go up: card.json, every file the card lists, and the folder's other top-level
    files (density and sensitivity plots, density safetensors); never README.md (regenerated), hidden files
    or subfolders (checkpoints)."""
    listed = [folder / CARD_FILE, *(folder / item.path for item in card.files.items if item.path != CARD_FILE)]
    extra = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.name != README_FILE and p not in listed)
    return [*listed, *extra]


# ---- staging -----------------------------------------------------------------------------------
def stage(folder: Path, card: Card, repo: str, subfolder: str, dest: Path | None,
          dashboard: Path | None = None, layout: str = "native") -> dict[str, Path | bytes]:
    """What goes up: repo path -> a file of the folder, or bytes (card.json, read once, and a README.md model
    card), and the files of a `dictctl dashboard` site under dashboard/, linked from the model card. Nothing
    is copied unless `dest` is given (a dry run, `--staging-dir`): then the upload is written into
    `dest/<subfolder>/` and the mapping names those copies. Copies of large weights in a temporary folder
    would outlive a killed publish; the files are read where they are instead. `layout` (publish_layouts.py)
    adds SAELens' files or puts them in place of the native ones."""
    from dictionaries.hub import model_card_metadata
    from dictionaries.publish_layouts import stage_layout

    staged: dict[str, Path | bytes] = {}
    for src in upload_list(folder, card):
        rel = src.relative_to(folder).as_posix()
        staged[_repo_path(subfolder, rel)] = src.read_bytes() if rel == CARD_FILE else src
    staged = stage_layout(staged, folder, card, subfolder, layout)
    plots = [p for p in staged if p.endswith(".png")]
    for src in dashboard_files(dashboard) if dashboard is not None else []:
        staged[_repo_path(subfolder, f"{DASHBOARD_DIR}/{src.relative_to(dashboard).as_posix()}")] = src
    readme = model_card_text(card, repo, subfolder, [Path(p).name for p in plots], dashboard=dashboard is not None,
                             layout=layout)
    meta = model_card_metadata(readme)  # parse it back the way the Hub parses it: a broken header fails here
    if meta.get("library_name") != ("dictionaries" if layout == "native" else "saelens"):
        raise FormatError(README_FILE, "the staged model card lost its `library_name` front matter")
    staged[_repo_path(subfolder, README_FILE)] = readme.encode()
    if dest is None:
        return staged
    copies: dict[str, Path | bytes] = {}
    for rel, content in staged.items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            shutil.copyfile(content, target)
        copies[rel] = target
    return copies


def dashboard_files(site: Path) -> list[Path]:
    """The files of a dashboard site (index.html and data/meta.js required), hidden ones left out."""
    for needed in ("index.html", "data/meta.js"):
        if not (site / needed).is_file():
            raise MissingFileError(str(site / needed), "Pass a folder written by `dictctl dashboard`.")
    return sorted(p for p in site.rglob("*") if p.is_file() and not p.is_symlink()
                  and not any(part.startswith(".") for part in p.relative_to(site).parts))


def _repo_path(subfolder: str, rel: str) -> str:
    return f"{subfolder}/{rel}" if subfolder else rel


def model_card_text(card: Card, repo: str, subfolder: str, plots: list[str], dashboard: bool = False,
                    layout: str = "native") -> str:
    """The repo README.md: Hub YAML front matter, what the dictionary is, its stats, plots and usage."""
    meta: dict = {"library_name": "dictionaries", "license": (card.license or "other").lower()}
    tags = ["sparse-autoencoder", "sae", "dictionary-learning", "interpretability", card.architecture]
    if card.model is not None:
        meta["base_model"] = card.model.id
        tags.append(card.model.id.split("/")[-1].lower())
    if card.hook is not None:
        tags.append(card.hook.site)
    meta["tags"] = tags
    from dictionaries.publish_layouts import front_matter, usage_lines

    meta = front_matter(meta, layout)
    where = f"`{card.hook.module}` ({card.hook.io})" if card.hook else "an unrecorded hook point"
    model = f"`{card.model.id}`" if card.model else "an unrecorded model"
    from dictionaries.hub import hub_path

    path = hub_path(repo, subfolder)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {card.name}", "",
             f"A {card.architecture} sparse-autoencoder dictionary with {card.d_dict} features over the "
             f"{card.d_in}-dimensional activations of {model} at {where}.", ""]
    if card.authors:
        lines += [f"Authors: {', '.join(card.authors)}.", ""]
    if card.provenance.original:
        lines += [f"Original files: {card.provenance.original}", ""]
    lines += _stats_lines(card)
    lines += [f"![{Path(p).stem}]({p})" for p in plots] + ([""] if plots else [])
    if dashboard:  # the site runs from disk: the files' page, and the folder to download and open
        lines += ["## Feature dashboard", "", f"Every feature's contexts, logit lens and neighbours: "
                  f"[{DASHBOARD_DIR}/index.html]({DASHBOARD_DIR}/index.html) (download the `{DASHBOARD_DIR}/` "
                  "folder and open index.html in a browser; it needs no server).", ""]
    lines += ["## Usage", "", "```python", "from dictionaries import load_dictionary, attach", "",
              f'd = load_dictionary("{path}")   # or by registry name: load_dictionary("{card.name}")',
              "with attach(model, d) as sae:", '    with model.trace("The Eiffel Tower is in"):',
              "        f = sae.features.save()", "```", "", *usage_lines(repo, subfolder, layout),
              f"Published with `dictionaries` {__version__}; `card.json` holds the full card (files with "
              "sha256, stats, training recipe, provenance).", ""]
    return "\n".join(lines)


def _stats_lines(card: Card) -> list[str]:
    s = card.stats
    if s is None:
        return ["No stats recorded yet (`dictctl eval` measures them).", ""]
    if s.source == "measured":
        version = f" {s.package_version}" if s.package_version else ""
        how = f"Measured by `dictionaries`{version} on {s.dataset or 'an unrecorded dataset'}"
        how += f", {s.tokens} tokens" if s.tokens else ""
    else:
        how = f"Reported by the original authors ({s.reference}); not measured here"
    rows = [(k, v) for k, v in s.model_dump(exclude_none=True).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("tokens", "context_length")]
    return (["## Stats", "", how + ".", "", "| stat | value |", "|---|---|"]
            + [f"| {k} | {v:.4g} |" for k, v in rows] + [""])


# ---- where it goes -----------------------------------------------------------------------------
def resolve_local_hub(local_hub: LocalHub | str | Path | None) -> LocalHub | None:
    """The local hub to commit into: the one given, else `$DICTIONARIES_LOCAL_HUB`, else None (real Hub)."""
    if isinstance(local_hub, LocalHub):
        return local_hub
    root = local_hub or os.environ.get(ENV_LOCAL_HUB)
    return LocalHub(root) if root else None


def existing_card(repo: str, subfolder: str, branch: str, local: LocalHub | None,
                  endpoint: str | None, token: str | None) -> dict | None:
    """The card.json already at the target (parsed JSON, or {} if unreadable), None if there is none."""
    rel = _repo_path(subfolder, CARD_FILE)
    if local is not None:
        raw = local.read(repo, rel)
    else:
        from dictionaries.hub import read_remote_file

        raw = read_remote_file(repo, rel, revision=branch, endpoint=endpoint, token=token)
    return _parse_card(raw)


def _parse_card(raw: bytes | None) -> dict | None:
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def check_target(card: Card, existing: dict | None, target: str, force: bool) -> None:
    """Refuse (unless forced) when the target holds a dictionary whose weights hash differs from ours."""
    if existing is None or force:
        return
    ours = _weights_hash(card.model_dump(mode="json"))
    theirs = _weights_hash(existing)
    if theirs != ours:
        raise TargetOccupiedError(target, existing.get("name", "unreadable card.json"), theirs, ours)


def _weights_hash(card: dict) -> str | None:
    for item in (card.get("files") or {}).get("items") or []:  # native weights, or SAELens' (publish_layouts.py)
        if isinstance(item, dict) and item.get("path") in (WEIGHTS_FILE, "sae_weights.safetensors"):
            return item.get("sha256")
    return None


def upload(staged: dict[str, Path | bytes], repo: str, *, branch: str, private: bool, message: str,
           local: LocalHub | None, endpoint: str | None, token: str | None,
           check: Callable[[Callable[[str], bytes | None]], None] | None = None) -> str:
    """One commit holding every staged file; the 40-hex sha. On a local hub `check` runs under the repo's
    lock right before the commit (against the Hub it ran before the upload)."""
    if local is None:
        from dictionaries.hub import upload_commit

        return upload_commit(repo, staged, branch=branch, private=private, message=message,
                             endpoint=endpoint, token=token)
    target = f"local hub {local.root}: {repo}"
    if branch != "main":
        raise PublishError(target, f"a local hub serves branch main only, not {branch!r}")
    try:
        return local.commit(repo, staged, message, check=check)
    except LocalHubError as e:
        raise PublishError(target, str(e)) from e


# ---- the whole thing ---------------------------------------------------------------------------
def publish(folder: str | Path, repo: str, *, subfolder: str = "", branch: str = "main", private: bool = False,
            dry_run: bool = False, register: bool = False, force: bool = False, endpoint: str | None = None,
            token: str | None = None, local_hub: LocalHub | str | Path | None = None,
            staging_dir: str | Path | None = None, registry_path: str | Path | None = None,
            dashboard: str | Path | None = None, layout: str = "native") -> PublishResult:
    """Validate `folder`, stage it with a model card, upload it in one commit and return its registry entry.

    `dry_run` stages into `staging_dir` (default: a new temporary folder, kept) and uploads nothing.
    `register` writes the entry into registry.yaml (`registry_path`, default the registry in use) and
    its card into cards/ after the commit succeeded. `dashboard` (a `dictctl dashboard` folder) goes up in the
    same commit, under dashboard/. `layout` native, saelens or both (publish_layouts.py).
    """
    from dictionaries.publish_layouts import check_layout_name, staged_card

    folder = Path(folder)
    check_repo_id(repo)
    subfolder = check_subfolder(subfolder)
    check_layout_name(layout, subfolder)
    if not _BRANCH.match(branch) or ".." in branch:
        raise RepoNameError(f"{repo}@{branch}", f"branch {branch!r} is not a valid git branch name")
    card = validate_folder(folder)
    site = Path(dashboard) if dashboard is not None else None
    if site is not None:
        dashboard_files(site)  # a wrong folder fails before anything is sent
    if register and not NAME_PATTERN.match(card.name):
        raise CardError(str(folder / CARD_FILE), "name", f"{card.name!r} is not a registry name "
                        "(<model>/<site><layer>/<size>[-<variant>]); fix it before --register")
    local = resolve_local_hub(local_hub)
    hub_url = endpoint or os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT)
    where = f"local hub {local.root}" if local else hub_url
    target = f"{where}: {repo}/{subfolder}@{branch}" if subfolder else f"{where}: {repo}@{branch}"
    notes = ["--private has no meaning on a local hub (it serves every repo)"] if local and private else []
    if local is None and dry_run:
        notes.append("the target was not checked (dry run against the Hub: no network or token needed)")
    else:
        if local is None:
            from dictionaries.hub import require_token

            token = require_token(token, repo, endpoint)  # before any request: no token, nothing sent
        check_target(card, existing_card(repo, subfolder, branch, local, endpoint, token), target, force)
    dest = Path(staging_dir) if staging_dir else None
    if dry_run and dest is None:
        dest = Path(tempfile.mkdtemp(prefix="dictionaries-publish-"))  # kept: the user inspects it
    staged = stage(folder, card, repo, subfolder, dest, site, layout)
    card = entry_card(staged_card(staged[_repo_path(subfolder, CARD_FILE)]), staged[_repo_path(subfolder, CARD_FILE)])
    if dry_run:
        return PublishResult(card.name, card, target, dest, sorted(staged), dry_run=True, notes=notes)

    def still_free(read: Callable[[str], bytes | None]) -> None:  # again, under the local repo's lock
        check_target(card, _parse_card(read(_repo_path(subfolder, CARD_FILE))), target, force)

    sha = upload(staged, repo, branch=branch, private=private, local=local, endpoint=endpoint, token=token,
                 message=f"Publish {card.name} ({card.architecture}, {card.d_in}x{card.d_dict})", check=still_free)
    location = HubLocation(repo=repo, revision=sha, subfolder=subfolder)
    registered = register_entry(card, location, registry_path) if register else None
    return PublishResult(card.name, card, target, dest or folder, sorted(staged), location, registered=registered,
                         notes=notes)


# ---- the registry ------------------------------------------------------------------------------
def entry_card(card: Card, card_json: Path | bytes) -> Card:
    """The registry's card: the folder's card with card.json itself added to the files (with its hash), since
    the loader reads it from the fetched folder; card.json cannot list its own hash, the registry can."""
    data = card_json if isinstance(card_json, bytes) else Path(card_json).read_bytes()
    own = FileEntry(path=CARD_FILE, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    items = [own, *(i for i in card.files.items if i.path != CARD_FILE)]
    return card.model_copy(update={"files": card.files.model_copy(update={"items": items})})
