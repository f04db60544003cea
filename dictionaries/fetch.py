"""A card's location -> a local folder holding its files, each verified against the card's sha256.

Three kinds of location (registry.py): a folder of a Hub repo at a pinned commit (through `hub.py`, into
the standard HF cache), a plain HTTPS folder (original releases outside the Hub, kept under
`<HF_HOME>/dictionaries/url/<hash of url>/`) and a folder inside a zip in a Hub repo (extracted under
`zip/<zip sha256>/`). An unregistered `hf://` folder is fetched whole and its card.json's files verified.

Hashing a large file on every load would cost more than reading it, so `fetch` remembers a verified file in
`<HF_HOME>/dictionaries/verified/<sha256>.json` (path, size, inode, mtime) and hashes again only when the
stat changed. That fast path cannot see a byte flipped in place with size and mtime kept (bit rot), so
`dictctl download` and `verify=True` always re-hash. On a mismatch the cached copy is dropped and fetched
once more; a second mismatch raises HashMismatchError.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlparse

from dictionaries.card import FileEntry, read_card
from dictionaries.constants import CARD_FILE
from dictionaries.errors import (
    HashMismatchError,
    HubUnreachableError,
    MissingFileError,
    UnverifiedFilesWarning,
)
from dictionaries.files import inside, sha256_of, write_atomic
from dictionaries.hub import (
    dictionaries_cache,
    download_hub_file,
    download_hub_folder,
    drop_cached_hub_file,
    file_url,
    hub_path,
    hub_settings,
    hub_timeout,
    in_subfolder,
    parse_hub_path,
)
from dictionaries.registry import HubLocation, HubZipLocation, Location, UrlLocation

Download = Callable[[bool], Path]
"""Fetches one file and returns its local path; called with True to fetch it again after a mismatch."""


def fetch(location: Location, files: Sequence[FileEntry], *, force: bool = False, progress: bool = True,
          verify: bool = False) -> Path:
    """A local folder holding `files`, each checked against its sha256 (or warned about when it has none).

    `force` downloads again; `verify` re-hashes every file instead of trusting the verification record.
    """
    checker = _Checker(force=force, verify=verify)
    if isinstance(location, HubLocation):
        folder = _fetch_hub(location, files, checker, progress)
    elif isinstance(location, UrlLocation):
        folder = _fetch_url(location, files, checker, progress)
    else:
        folder = _fetch_zip(location, files, checker, progress)
    checker.warn(describe(location))
    return folder


def fetch_hub_folder(path: str, *, force: bool = False, progress: bool = True, verify: bool = False) -> Path:
    """An unregistered `hf://org/repo/sub@rev` folder, downloaded whole; the files its card.json lists are
    then verified like an entry's, at the commit the revision resolved to."""
    location = parse_hub_path(path)
    folder, commit = download_hub_folder(location, force=force, progress=progress)
    if not (folder / CARD_FILE).is_file():
        return folder  # a foreign folder: no card, nothing to verify against
    try:
        card = read_card(folder / CARD_FILE)
    except (ValueError, OSError):  # CardError, UnicodeDecodeError: a corrupted cached card.json
        # The card cannot list its own hash, so its cached copy is checked by reading it. Drop the snapshot
        # link and the blob behind it, so that the copy fetched again is new bytes (not the cached blob),
        # fetch the card alone at the commit the folder resolved to, and read it again: it must read now.
        drop_cached_hub_file(folder / CARD_FILE)
        download_hub_file(location.repo, in_subfolder(location.subfolder, CARD_FILE), commit,
                          repo_type=location.repo_type, force=True, progress=progress)
        card = read_card(folder / CARD_FILE)
    pinned = location.model_copy(update={"revision": commit})
    return fetch(pinned, card.files.items, force=force, progress=progress, verify=verify)


def plan_fetch(location: Location, files: Sequence[FileEntry]) -> list[str]:
    """The URLs `fetch` asks for (zip members as `<zip url>#<member path>`), without touching the network."""
    if isinstance(location, HubLocation):
        return [file_url(location.repo, in_subfolder(location.subfolder, f.path), location.revision,
                         location.repo_type) for f in files]
    if isinstance(location, UrlLocation):
        return [location.url.rstrip("/") + "/" + f.path for f in files]
    zip_url = file_url(location.repo, location.filename, location.revision)
    return [f"{zip_url}#{location.member}{f.path}" for f in files]


def describe(location: Location) -> str:
    """Where an entry's files live, as one string (a URL, or an hf:// path with revision)."""
    if isinstance(location, UrlLocation):
        return location.url
    if isinstance(location, HubZipLocation):
        return hub_path(location.repo, location.filename, location.revision) + f"#{location.member}"
    return hub_path(location.repo, location.subfolder, location.revision)


# ---- verification ---------------------------------------------------------------------------------------
class _Checker:
    """Checks each downloaded file against its sha256 and collects the hashes of files the card has none for."""

    def __init__(self, *, force: bool, verify: bool):
        self.force, self.verify = force, verify
        self.unverified: dict[str, tuple[str, int]] = {}

    def ensure(self, what: str, entry: FileEntry, download: Download, drop: Callable[[Path], None]) -> Path:
        """Download, check the sha256; on a mismatch drop the copy, fetch once more, check again."""
        path = download(False)
        if entry.sha256 is None:
            self.unverified[entry.path] = (sha256_of(path), path.stat().st_size)
            return path
        if is_verified(path, entry.sha256, rehash=self.verify):
            return path
        drop(path)
        path = download(True)
        if not is_verified(path, entry.sha256, rehash=True):
            raise HashMismatchError(what, entry.sha256, sha256_of(path))
        return path

    def warn(self, what: str) -> None:
        """One UnverifiedFilesWarning listing the sha256 and size of every file that had none recorded."""
        if self.unverified:
            warnings.warn(UnverifiedFilesWarning(what, self.unverified), stacklevel=4)


def is_verified(path: Path, sha256: str, *, rehash: bool = False) -> bool:
    """Whether `path` has this sha256: from the record when the file's stat is unchanged (unless `rehash`),
    else hashed now (and the record renewed)."""
    record_path = dictionaries_cache() / "verified" / f"{sha256}.json"
    real = Path(path).resolve()
    stat = real.stat()
    fingerprint = {"path": str(real), "size": stat.st_size, "ino": stat.st_ino, "mtime_ns": stat.st_mtime_ns}
    if not rehash:
        try:
            if json.loads(record_path.read_text()) == fingerprint:
                return True
        except (OSError, ValueError):
            pass
    if sha256_of(real) != sha256:
        record_path.unlink(missing_ok=True)
        return False
    write_atomic(record_path, json.dumps(fingerprint))
    return True


def _unlink(path: Path) -> None:
    Path(path).unlink(missing_ok=True)


# ---- the three kinds of location -----------------------------------------------------------------------
def _fetch_hub(location: HubLocation, files: Sequence[FileEntry], checker: _Checker, progress: bool) -> Path:
    folder: Path | None = None
    for entry in files:
        filename = in_subfolder(location.subfolder, inside("", entry.path).as_posix())

        def download(again: bool, filename: str = filename) -> Path:
            return download_hub_file(location.repo, filename, location.revision, repo_type=location.repo_type,
                                     force=checker.force or again, progress=progress)

        path = checker.ensure(hub_path(location.repo, filename, location.revision), entry, download,
                              drop_cached_hub_file)
        folder = path.parents[len(Path(entry.path).parts) - 1]
    if folder is None:
        raise MissingFileError(describe(location), "The card lists no files to fetch.")
    return folder


def _fetch_url(location: UrlLocation, files: Sequence[FileEntry], checker: _Checker, progress: bool) -> Path:
    folder = dictionaries_cache() / "url" / hashlib.sha256(location.url.encode()).hexdigest()[:32]
    for entry in files:
        url = location.url.rstrip("/") + "/" + entry.path
        target = inside(folder, entry.path)  # a card path with '..' would leave the cache: refused

        def download(again: bool, url: str = url, target: Path = target) -> Path:
            if checker.force or again or not target.exists():
                download_url(url, target, progress=progress)
            return target

        checker.ensure(url, entry, download, _unlink)
    return folder


def _fetch_zip(location: HubZipLocation, files: Sequence[FileEntry], checker: _Checker, progress: bool) -> Path:
    """Download the zip (its sha256 checked once, then remembered), extract only the member folder."""
    what = hub_path(location.repo, location.filename, location.revision)

    def download_zip(again: bool) -> Path:
        return download_hub_file(location.repo, location.filename, location.revision,
                                 force=checker.force or again, progress=progress)

    zip_entry = FileEntry(path=location.filename, size=location.size, sha256=location.sha256)
    zip_path = checker.ensure(what, zip_entry, download_zip, drop_cached_hub_file)
    zip_sha = location.sha256 or checker.unverified[location.filename][0]
    root = dictionaries_cache() / "zip" / zip_sha
    folder = root / location.member
    done = root / f".complete-{hashlib.sha256(location.member.encode()).hexdigest()[:16]}"
    if checker.force or not done.exists():
        extract_member(zip_path, location.member, root, progress=progress)
        done.touch()
    for entry in files:
        def member_file(again: bool, entry: FileEntry = entry) -> Path:
            if again:
                extract_member(zip_path, location.member, root, progress=progress)
            target = inside(folder, entry.path)
            if not target.is_file():
                raise MissingFileError(f"{what}#{location.member}{entry.path}", "The archive has no such member.")
            return target

        checker.ensure(f"{what}#{location.member}{entry.path}", entry, member_file, _unlink)
    return folder


# ---- plain HTTPS and zip members --------------------------------------------------------------------------
def download_url(url: str, target: Path, *, progress: bool = True) -> Path:
    """Stream `url` into `target` atomically (temp file + rename) with a progress bar; honours HF_HUB_OFFLINE."""
    import urllib.error
    import urllib.request

    from tqdm.auto import tqdm

    origin = "{0.scheme}://{0.netloc}".format(urlparse(url))
    if hub_settings().offline:
        raise HubUnreachableError(url, origin, offline=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.incomplete")
    try:
        with urllib.request.urlopen(url, timeout=hub_timeout()) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name,
                      disable=not progress) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
        os.replace(tmp, target)
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 410):
            raise MissingFileError(url, f"The server answered {exc.code}.") from None
        raise HubUnreachableError(f"{url} (HTTP {exc.code})", origin, offline=False) from None
    except (urllib.error.URLError, OSError) as exc:
        raise HubUnreachableError(f"{url} ({exc})", origin, offline=False) from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def extract_member(zip_path: Path, member: str, root: Path, *, progress: bool = True) -> Path:
    """Extract the files under folder `member` of the zip into `root/member` (atomically, via a temp folder)."""
    from tqdm.auto import tqdm

    member = member.rstrip("/") + "/"
    with zipfile.ZipFile(zip_path) as archive:
        infos = [i for i in archive.infolist() if i.filename.startswith(member) and not i.is_dir()]
        if not infos:
            raise MissingFileError(f"{zip_path}#{member}", "The archive has no such folder.")
        for info in infos:
            parts = Path(info.filename).parts
            if Path(info.filename).is_absolute() or ".." in parts:
                raise MissingFileError(f"{zip_path}#{info.filename}", "Refusing a member that leaves the folder.")
        tmp = root / f".extract-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with tqdm(total=sum(i.file_size for i in infos), unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"extract {member}", disable=not progress) as bar:
            for info in infos:
                archive.extract(info, tmp)
                bar.update(info.file_size)
    final = root / member
    shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp / member, final)
    shutil.rmtree(tmp, ignore_errors=True)
    return final
