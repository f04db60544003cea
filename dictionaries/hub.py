"""Downloading and uploading dictionaries: the only module that imports huggingface_hub (DESIGN.md section 5).

`fetch(location, files)` gives a local folder holding an entry's files, each checked against the card's
sha256. Hub files go through `hf_hub_download` into the standard HF cache at the pinned commit, so
HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_ENDPOINT and tokens all apply (read when called, not when
imported, so a changed environment is honoured). Original releases on plain HTTPS and members of zip
archives on the Hub are kept under `<HF_HOME>/dictionaries/` (`url/<hash of url>/`, `zip/<zip sha256>/`).

Hashing a large file on every load would cost more than reading it, so a verified file is remembered in
`<HF_HOME>/dictionaries/verified/<sha256>.json` with its path, size, inode and mtime; a file whose stat
changed (e.g. overwritten in the cache) is hashed again. On a mismatch the cached copy (snapshot link and
blob) is dropped and fetched once more; a second mismatch raises HashMismatchError.
"""

from __future__ import annotations

import hashlib
import re
import socket
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlparse

from tqdm.auto import tqdm

from dictionaries.card import FileEntry, read_card, sha256_of
from dictionaries.errors import (HashMismatchError, HubPathError, HubUnreachableError, MissingFileError,
                                 UnverifiedFilesWarning)
from dictionaries.downloads import (  # noqa: F401  (re-exported)
    HubSettings, dictionaries_cache, download_url, extract_member, hub_settings, is_verified,
)
from dictionaries.registry import HubLocation, HubZipLocation, UrlLocation

Location = HubLocation | HubZipLocation | UrlLocation
_COMMIT = re.compile(r"[0-9a-f]{40}")
_NAME = r"[A-Za-z0-9][A-Za-z0-9._\-]*"
_HUB_PATH = re.compile(rf"^hf://(?:(?P<type>datasets|models)/)?(?P<org>{_NAME})/(?P<repo>{_NAME})"
                       rf"(?P<sub>(?:/[^/@]+)*)/?(?:@(?P<rev>[^@]+))?$")


# ---- environment, read at call time ---------------------------------------------------------------


# ---- hf:// paths ----------------------------------------------------------------------------------
def parse_hub_path(path: str) -> HubLocation:
    """`hf://org/repo/sub/folder@rev` (rev optional, default `main`; `hf://datasets/...` for datasets)."""
    if not path.startswith("hf://"):
        raise HubPathError(path, "it does not start with hf://")
    m = _HUB_PATH.match(path)
    if m is None:
        raise HubPathError(path, "expected an org and a repo name after hf://, then an optional folder")
    sub = m["sub"].strip("/")
    if any(part in (".", "..") for part in sub.split("/")):
        raise HubPathError(path, "the folder may not contain '.' or '..'")
    repo_type = "dataset" if m["type"] == "datasets" else "model"
    return HubLocation(repo=f"{m['org']}/{m['repo']}", revision=m["rev"] or "main", subfolder=sub,
                       repo_type=repo_type)


# ---- what would be fetched ------------------------------------------------------------------------
def plan_fetch(location: Location, files: Sequence[FileEntry]) -> list[str]:
    """The URLs `fetch` asks for (zip members as `<zip url>#<member path>`), without touching the network."""
    from huggingface_hub import hf_hub_url

    endpoint = hub_settings().endpoint
    if isinstance(location, HubLocation):
        return [hf_hub_url(location.repo, _in_subfolder(location.subfolder, f.path), repo_type=location.repo_type,
                           revision=location.revision, endpoint=endpoint) for f in files]
    if isinstance(location, UrlLocation):
        return [_file_url(location.url, f.path) for f in files]
    zip_url = hf_hub_url(location.repo, location.filename, revision=location.revision, endpoint=endpoint)
    return [f"{zip_url}#{location.member}{f.path}" for f in files]


def _in_subfolder(subfolder: str, path: str) -> str:
    return f"{subfolder.strip('/')}/{path}" if subfolder.strip("/") else path


def _file_url(base: str, path: str) -> str:
    return base.rstrip("/") + "/" + path


# ---- fetch ----------------------------------------------------------------------------------------
def fetch(location: Location, files: Sequence[FileEntry], *, force: bool = False, progress: bool = True) -> Path:
    """A local folder holding `files`, each verified against its sha256 (or warned about when it has none)."""
    if isinstance(location, HubLocation):
        return _fetch_hub(location, files, force, progress)
    if isinstance(location, UrlLocation):
        return _fetch_url(location, files, force, progress)
    return _fetch_zip(location, files, force, progress)


def _fetch_hub(location: HubLocation, files: Sequence[FileEntry], force: bool, progress: bool) -> Path:
    unverified: dict[str, tuple[str, int]] = {}
    folder: Path | None = None
    for entry in files:
        filename = _in_subfolder(location.subfolder, entry.path)
        what = f"hf://{location.repo}/{filename}@{location.revision}"

        def download(again: bool, filename: str = filename) -> Path:
            return download_hub_file(location.repo, filename, location.revision, repo_type=location.repo_type,
                                     force=force or again, progress=progress)

        path = ensure_verified(what, entry, download, drop=drop_cached_hub_file, unverified=unverified)
        folder = path.parents[len(Path(entry.path).parts) - 1]
    warn_unverified(f"hf://{location.repo}/{location.subfolder}@{location.revision}", unverified)
    if folder is None:
        raise MissingFileError(f"hf://{location.repo}/{location.subfolder}@{location.revision}",
                               "The card lists no files to fetch.")
    return folder


def ensure_verified(what: str, entry: FileEntry, download: Callable[[bool], Path], *,
                    drop: Callable[[Path], None], unverified: dict[str, tuple[str, int]]) -> Path:
    """Download (`download(again)`), check the sha256; on a mismatch drop the copy, fetch once more, check again."""
    path = download(False)
    if entry.sha256 is None:
        unverified[entry.path] = (sha256_of(path), path.stat().st_size)
        return path
    if is_verified(path, entry.sha256):
        return path
    drop(path)
    path = download(True)
    if not is_verified(path, entry.sha256):
        raise HashMismatchError(what, entry.sha256, sha256_of(path))
    return path


def warn_unverified(what: str, unverified: dict[str, tuple[str, int]]) -> None:
    """One UnverifiedFilesWarning listing the sha256 and size of every file that had none recorded."""
    if unverified:
        warnings.warn(UnverifiedFilesWarning(what, unverified), stacklevel=4)


# ---- verification records -------------------------------------------------------------------------


# ---- the Hub --------------------------------------------------------------------------------------
def download_hub_file(repo: str, filename: str, revision: str, *, repo_type: str = "model", force: bool = False,
                      progress: bool = True) -> Path:
    """`hf_hub_download` into the standard cache, with huggingface_hub's errors turned into ours."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    s = hub_settings()
    what = f"hf://{repo}/{filename}@{revision}"
    cached = try_to_load_from_cache(repo, filename, cache_dir=s.cache_dir, revision=revision, repo_type=repo_type)
    if isinstance(cached, str) and not force and _COMMIT.fullmatch(revision):
        return Path(cached)  # what hf_hub_download returns for a cached pinned commit, without its overhead
    if not s.offline and (force or not isinstance(cached, str)):
        check_reachable(s.endpoint, what)  # fail at once instead of after huggingface_hub's ~20 s of retries
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, repo_type=repo_type, cache_dir=s.cache_dir,
                                    endpoint=s.endpoint, force_download=force, local_files_only=s.offline,
                                    tqdm_class=None if progress else _SilentTqdm))
    except Exception as exc:  # noqa: BLE001 - every huggingface_hub failure is mapped below
        raise _hub_error(exc, repo, filename, revision, repo_type) from exc


def _hub_error(exc: Exception, repo: str, filename: str, revision: str, repo_type: str) -> Exception:
    """Our error for a huggingface_hub exception (2.4.0's classes; olah answers 401 for a missing file)."""
    from huggingface_hub import errors as hf

    s = hub_settings()
    what = f"hf://{repo}/{filename}@{revision}"
    if isinstance(exc, hf.GatedRepoError):
        return MissingFileError(what, f"The repo {repo} is gated: accept its terms on the Hub and set HF_TOKEN.")
    if isinstance(exc, hf.RevisionNotFoundError):
        return MissingFileError(what, f"Revision {revision!r} does not exist in {repo}.")
    if isinstance(exc, (hf.RemoteEntryNotFoundError, hf.RepositoryNotFoundError)):
        if _repo_exists(repo, revision, repo_type):
            return MissingFileError(what, f"The repo {repo} has no such file at {revision}.")
        return MissingFileError(what, f"No repo {repo} at {s.endpoint} (or it is private: set HF_TOKEN).")
    if isinstance(exc, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled, ConnectionError)) or (
            isinstance(exc, ValueError) and "Force download failed" in str(exc)):
        return HubUnreachableError(what, s.endpoint, s.offline)
    if isinstance(exc, hf.HfHubHTTPError):
        return HubUnreachableError(f"{what} (HTTP {exc.response.status_code})", s.endpoint, s.offline)
    return exc


def _repo_exists(repo: str, revision: str, repo_type: str) -> bool:
    from huggingface_hub import HfApi

    try:
        HfApi(endpoint=hub_settings().endpoint).repo_info(repo, revision=revision, repo_type=repo_type)
        return True
    except Exception:  # noqa: BLE001 - any failure means we cannot say it exists
        return False


def check_reachable(endpoint: str, what: str, timeout: float = 5.0) -> None:
    """Raise HubUnreachableError unless a TCP connection to the endpoint's host opens."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError:
        raise HubUnreachableError(what, endpoint, offline=False) from None


def drop_cached_hub_file(path: Path) -> None:
    """Remove a snapshot entry and the blob it links to, so that the next download fetches it again."""
    path = Path(path)
    blob = path.resolve()
    for p in {path, blob}:
        p.unlink(missing_ok=True)


def fetch_card_and_files(location: HubLocation, *, force: bool = False, progress: bool = True) -> Path:
    """An unregistered Hub folder, downloaded whole; files its card.json lists are verified like an entry's."""
    from huggingface_hub import snapshot_download

    s = hub_settings()
    what = f"hf://{location.repo}/{location.subfolder}@{location.revision}"
    sub = location.subfolder.strip("/")
    if not s.offline:
        check_reachable(s.endpoint, what)
    try:
        snapshot = Path(snapshot_download(location.repo, revision=location.revision, repo_type=location.repo_type,
                                          allow_patterns=[f"{sub}/*"] if sub else None, cache_dir=s.cache_dir,
                                          endpoint=s.endpoint, force_download=force, local_files_only=s.offline,
                                          tqdm_class=None if progress else _SilentTqdm))
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(exc, location.repo, sub or ".", location.revision, location.repo_type) from exc
    folder = snapshot / sub if sub else snapshot
    if not folder.is_dir() or not any(folder.iterdir()):
        raise MissingFileError(what, f"The repo {location.repo} has no folder {sub!r} at {location.revision}.")
    card_path = folder / "card.json"
    if card_path.exists():
        pinned = location.model_copy(update={"revision": snapshot.name})  # the commit it resolved to
        return fetch(pinned, read_card(card_path).files.items, progress=progress)
    return folder


# ---- plain HTTPS ----------------------------------------------------------------------------------
def _fetch_url(location: UrlLocation, files: Sequence[FileEntry], force: bool, progress: bool) -> Path:
    folder = dictionaries_cache() / "url" / hashlib.sha256(location.url.encode()).hexdigest()[:32]
    unverified: dict[str, tuple[str, int]] = {}
    for entry in files:
        url = _file_url(location.url, entry.path)
        target = folder / entry.path

        def download(again: bool, url: str = url, target: Path = target) -> Path:
            if force or again or not target.exists():
                download_url(url, target, progress=progress)
            return target

        ensure_verified(url, entry, download, drop=lambda p: Path(p).unlink(missing_ok=True), unverified=unverified)
    warn_unverified(location.url, unverified)
    return folder


# ---- zip archives on the Hub ----------------------------------------------------------------------
def _fetch_zip(location: HubZipLocation, files: Sequence[FileEntry], force: bool, progress: bool) -> Path:
    """Download the zip (its sha256 checked once, then remembered), extract only the member folder."""
    what = f"hf://{location.repo}/{location.filename}@{location.revision}"

    def download_zip(again: bool) -> Path:
        return download_hub_file(location.repo, location.filename, location.revision, force=force or again,
                                 progress=progress)

    unverified: dict[str, tuple[str, int]] = {}
    zip_entry = FileEntry(path=location.filename, size=location.size, sha256=location.sha256)
    zip_path = ensure_verified(what, zip_entry, download_zip, drop=drop_cached_hub_file, unverified=unverified)
    zip_sha = location.sha256 or unverified[location.filename][0]
    root = dictionaries_cache() / "zip" / zip_sha
    folder = root / location.member
    done = root / f".complete-{hashlib.sha256(location.member.encode()).hexdigest()[:16]}"
    if force or not done.exists():
        extract_member(zip_path, location.member, root, progress=progress)
        done.touch()
    for entry in files:
        def member_file(again: bool, entry: FileEntry = entry) -> Path:
            if again:
                extract_member(zip_path, location.member, root, progress=progress)
            if not (folder / entry.path).is_file():
                raise MissingFileError(f"{what}#{location.member}{entry.path}", "The archive has no such member.")
            return folder / entry.path

        ensure_verified(f"{what}#{location.member}{entry.path}", entry, member_file,
                        drop=lambda p: Path(p).unlink(missing_ok=True), unverified=unverified)
    warn_unverified(what, unverified)
    return folder


class _SilentTqdm(tqdm):
    """huggingface_hub's bars switched off (`progress=False`)."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


# ---- upload ---------------------------------------------------------------------------------------
# Publishing (dictionaries/publish.py) reaches the Hub only through these functions. The token comes from
# the argument, HF_TOKEN or the stored HF login; it is handed to huggingface_hub and never printed or logged.
def require_token(token: str | None, repo: str, endpoint: str | None) -> str:
    """The token to publish with (argument, else HF_TOKEN / the HF login); HubAuthError when there is none."""
    import huggingface_hub

    from dictionaries.errors import HubAuthError

    token = token or huggingface_hub.get_token()
    if not token:
        raise HubAuthError(repo, _upload_endpoint(endpoint), "no Hub token found (HF_TOKEN is unset and no "
                                                              "`hf auth login` token is stored)")
    return token


def _upload_endpoint(endpoint: str | None) -> str:
    """The argument, else HF_ENDPOINT as it is now (huggingface_hub reads it only once, at import)."""
    return (endpoint or hub_settings().endpoint).rstrip("/")


def _auth_failure(exc: Exception, repo: str, endpoint: str | None) -> Exception:
    """A 401/403 from the Hub as HubAuthError (the message never holds the token); other errors unchanged."""
    from dictionaries.errors import HubAuthError

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return HubAuthError(repo, _upload_endpoint(endpoint), f"the Hub refused the token (HTTP {status}: it is "
                                                              "wrong, expired or has no write access to the repo)")
    return exc


def read_remote_file(repo: str, path: str, *, revision: str = "main", endpoint: str | None = None,
                     token: str | None = None) -> bytes | None:
    """The bytes of `path` in a Hub model repo at `revision`, None if the repo, revision or file is absent."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    endpoint = _upload_endpoint(endpoint)
    check_reachable(endpoint, f"hf://{repo}/{path}@{revision}")  # at once, not after the client's retries
    api = huggingface_hub.HfApi(endpoint=endpoint, token=token)
    try:
        if not api.file_exists(repo, path, revision=revision):
            return None
        return Path(api.hf_hub_download(repo, path, revision=revision, cache_dir=hub_settings().cache_dir)).read_bytes()
    except HfHubHTTPError as e:
        raise _auth_failure(e, repo, endpoint) from None


def upload_commit(repo: str, files: dict[str, Path], *, branch: str = "main", private: bool = False,
                  message: str, endpoint: str | None = None, token: str | None = None) -> str:
    """Create the repo (and branch) if needed and add every file in ONE commit; the commit's 40-hex sha.

    `files` maps repo paths to local files. The Hub applies a commit whole or not at all, so a failure
    here leaves the repo as it was.
    """
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    from dictionaries.errors import PublishError

    token = require_token(token, repo, endpoint)
    endpoint = _upload_endpoint(endpoint)
    check_reachable(endpoint, f"hf://{repo}@{branch} (upload)")
    api = huggingface_hub.HfApi(endpoint=endpoint, token=token)
    operations = [huggingface_hub.CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(local))
                  for rel, local in sorted(files.items())]
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo, branch=branch, exist_ok=True)
        info = api.create_commit(repo, operations, commit_message=message, revision=branch)
    except HfHubHTTPError as e:
        err = _auth_failure(e, repo, endpoint)
        raise (err if err is not e else PublishError(f"{_upload_endpoint(endpoint)}: {repo}", str(e))) from None
    except Exception as e:  # a dropped connection or a server error half-way: the commit was not made
        raise PublishError(f"{_upload_endpoint(endpoint)}: {repo}", f"{type(e).__name__}: {e}") from None
    return info.oid


def model_card_metadata(text: str) -> dict:
    """The YAML front matter of a repo README.md, parsed the way the Hub parses it (huggingface_hub.ModelCard)."""
    import huggingface_hub

    return huggingface_hub.ModelCard(text, ignore_metadata_errors=False).data.to_dict()
