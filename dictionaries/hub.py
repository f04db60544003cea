"""The Hugging Face Hub: the only module that imports huggingface_hub (DESIGN.md section 5).

Downloads go through `hf_hub_download` / `snapshot_download` into the standard HF cache at a revision, so
HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_ENDPOINT and tokens all apply (read when called, not when
imported, so a changed environment is honoured); huggingface_hub's errors become the package's. Uploads
add every file in ONE commit (`HfApi.create_commit`). `hf://org/repo/sub@rev` paths are parsed and written
here, and nowhere else. Verifying what was downloaded is `fetch.py`'s work.

The Hub being down costs at most one time-out. What is cached at a pinned commit is used without any request
(a commit never changes). Before huggingface_hub is asked for anything it does not have, `check_reachable`
sends one request, without retries, bounded by `hub_timeout()` (DICTIONARIES_HUB_TIMEOUT, default 10 s):
huggingface_hub 2.4 retries a failed metadata request five times with back-off (`_http_backoff_base`,
429/5xx/time-outs) and, when nothing is cached, once more with a 60 s time-out (`_ETAG_RETRY_TIMEOUT` in
file_download.py); its HTTP client has no default time-out (`default_client_factory`: timeout=None) and the
API calls pass none. A refused connection, a server that does not answer and an HTTP 5xx thus fail at once
as one HubUnreachableError saying which, instead of a 24 s (503) to 395 s (silent server) stall behind
retry warnings.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from dictionaries.card import repo_id_problem
from dictionaries.constants import CACHE_SUBDIR, DEFAULT_ENDPOINT, ENV_HUB_TIMEOUT, HUB_TIMEOUT
from dictionaries.errors import HubPathError, HubUnreachableError, MissingFileError
from dictionaries.registry import HubLocation

_COMMIT = re.compile(r"[0-9a-f]{40}")
_NAME = r"[A-Za-z0-9][A-Za-z0-9._\-]*"
_BAD_REVISION = re.compile(r"[\s~^:?*\[\\]|^[-/]|/$|@\{")  # what git refuses in a ref name
_HUB_PATH = re.compile(rf"^hf://(?:(?P<type>datasets|models)/)?(?P<org>{_NAME})/(?P<repo>{_NAME})"
                       rf"(?P<sub>(?:/[^/@]+)*)/?(?:@(?P<rev>[^@]+))?$")


# ---- the environment, read at call time -----------------------------------------------------------------
@dataclass(frozen=True)
class HubSettings:
    """What the HF environment variables say right now."""

    endpoint: str
    cache_dir: Path
    home: Path
    offline: bool


def hub_settings() -> HubSettings:
    """HF_ENDPOINT, HF_HUB_CACHE (or HF_HOME/hub), HF_HOME and HF_HUB_OFFLINE as currently set."""
    xdg = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    home = Path(os.environ.get("HF_HOME", xdg / "huggingface")).expanduser()
    cache = Path(os.environ.get("HF_HUB_CACHE", home / "hub")).expanduser()
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")
    return HubSettings(endpoint, cache, home, offline)


def hub_timeout() -> float:
    """Seconds to wait for a Hub or plain HTTPS server: DICTIONARIES_HUB_TIMEOUT, else HUB_TIMEOUT."""
    try:
        return float(os.environ.get(ENV_HUB_TIMEOUT) or HUB_TIMEOUT)
    except ValueError:
        return HUB_TIMEOUT


def dictionaries_cache() -> Path:
    """`<HF_HOME>/dictionaries`: extracted zip members, plain-URL downloads and verification records."""
    return hub_settings().home / CACHE_SUBDIR


# ---- hf:// paths ----------------------------------------------------------------------------------------
def hub_path(repo: str, path: str = "", revision: str | None = None) -> str:
    """`hf://repo/path@revision` (the one way the package writes a Hub location as text)."""
    path = path.strip("/")
    return f"hf://{repo}" + (f"/{path}" if path else "") + (f"@{revision}" if revision else "")


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
    problem = repo_id_problem(f"{m['org']}/{m['repo']}")  # the Hub's rules, here rather than in huggingface_hub
    if problem:
        raise HubPathError(path, problem)
    if m["rev"] is not None and (".." in m["rev"] or _BAD_REVISION.search(m["rev"])):
        raise HubPathError(path, f"{m['rev']!r} is not a branch, tag or commit name")
    repo_type = "dataset" if m["type"] == "datasets" else "model"
    return HubLocation(repo=f"{m['org']}/{m['repo']}", revision=m["rev"] or "main", subfolder=sub,
                       repo_type=repo_type)


def in_subfolder(subfolder: str, path: str) -> str:
    """A file's path in the repo: `subfolder/path`, or `path` for the repo root."""
    return f"{subfolder.strip('/')}/{path}" if subfolder.strip("/") else path


def file_url(repo: str, filename: str, revision: str, repo_type: str = "model") -> str:
    """The URL huggingface_hub downloads a file from, at the current HF_ENDPOINT (no request is made)."""
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo, filename, repo_type=repo_type, revision=revision, endpoint=hub_settings().endpoint)


# ---- downloads ------------------------------------------------------------------------------------------
def download_hub_file(repo: str, filename: str, revision: str, *, repo_type: str = "model", force: bool = False,
                      progress: bool = True) -> Path:
    """`hf_hub_download` into the standard cache, with huggingface_hub's errors turned into ours."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    s = hub_settings()
    what = hub_path(repo, filename, revision)
    cached = try_to_load_from_cache(repo, filename, cache_dir=s.cache_dir, revision=revision, repo_type=repo_type)
    if isinstance(cached, str) and not force and _COMMIT.fullmatch(revision):
        return Path(cached)  # what hf_hub_download returns for a cached pinned commit, without its overhead
    if not s.offline and (force or not isinstance(cached, str)):
        check_reachable(s.endpoint, what, repo, revision, repo_type)  # one bounded request, no retries
    try:  # a cached file of a branch: huggingface_hub falls back to it, without retries, if the Hub is down
        return Path(hf_hub_download(repo, filename, revision=revision, repo_type=repo_type, cache_dir=s.cache_dir,
                                    endpoint=s.endpoint, force_download=force, local_files_only=s.offline,
                                    etag_timeout=hub_timeout(),
                                    tqdm_class=None if progress else _silent_tqdm()))
    except Exception as exc:  # noqa: BLE001 - every huggingface_hub failure is mapped below
        raise _hub_error(exc, repo, filename, revision, repo_type) from exc


def _hub_error(exc: Exception, repo: str, filename: str, revision: str, repo_type: str) -> Exception:
    """Our error for a huggingface_hub exception (2.4.0's classes; olah answers 401 for a missing file)."""
    from huggingface_hub import errors as hf

    s = hub_settings()
    what = hub_path(repo, filename, revision)
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
    if isinstance(exc, hf.HFValidationError):  # a repo id or revision huggingface_hub refuses before any request
        return HubPathError(what, str(exc).splitlines()[0])
    return exc


def _repo_exists(repo: str, revision: str, repo_type: str) -> bool:
    from huggingface_hub import HfApi

    try:
        HfApi(endpoint=hub_settings().endpoint).repo_info(repo, revision=revision, repo_type=repo_type)
        return True
    except Exception:  # noqa: BLE001 - any failure means we cannot say it exists
        return False


def resolve_commit(repo: str, revision: str = "main", *, repo_type: str = "model") -> str:
    """The 40-hex commit a branch or tag of a Hub repo points to now (one bounded reachability request first)."""
    from huggingface_hub import HfApi

    s = hub_settings()
    what = hub_path(repo, revision=revision)
    if s.offline:
        raise HubUnreachableError(what, s.endpoint, offline=True)
    check_reachable(s.endpoint, what, repo, revision, repo_type)
    try:
        sha = HfApi(endpoint=s.endpoint).repo_info(repo, revision=revision, repo_type=repo_type).sha
    except Exception as exc:  # noqa: BLE001 - huggingface_hub's errors become ours, as for downloads
        raise _hub_error(exc, repo, ".", revision, repo_type) from exc
    if not sha or not _COMMIT.fullmatch(sha):
        raise MissingFileError(what, f"The Hub gave no commit for {revision!r} of {repo}.")
    return sha


def check_reachable(endpoint: str, what: str, repo: str = "", revision: str = "main", repo_type: str = "model",
                    timeout: float | None = None) -> None:
    """One request to the repo's revision (`/api/<type>s/<repo>/revision/<rev>`), no retries, at most `timeout`
    (default `hub_timeout()`): HubUnreachableError saying why unless the server answers below HTTP 500 (a 401
    or 404 is an answer: huggingface_hub's own request then says what is missing) and not 429."""
    import urllib.error
    import urllib.request

    timeout = hub_timeout() if timeout is None else timeout
    url = f"{endpoint.rstrip('/')}/api/{repo_type}s/{repo}/revision/{quote(revision, safe='')}" if repo else endpoint
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
        return
    except urllib.error.HTTPError as e:
        if e.code < 500 and e.code != 429:
            return
        reason = f"answered HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:  # TimeoutError itself, or wrapped in a URLError
        cause = getattr(e, "reason", e)
        late = f"did not answer within {timeout:g} s ({ENV_HUB_TIMEOUT})"
        reason = late if isinstance(cause, TimeoutError) else f"could not be reached ({cause})"
    raise HubUnreachableError(what, endpoint, offline=False, reason=reason)


def drop_cached_hub_file(path: Path) -> None:
    """Remove a snapshot entry and the blob it links to, so that the next download fetches it again."""
    path = Path(path)
    blob = path.resolve()
    for p in {path, blob}:
        p.unlink(missing_ok=True)


def download_hub_folder(location: HubLocation, *, force: bool = False, progress: bool = True) -> tuple[Path, str]:
    """Every file under the location's subfolder (`snapshot_download`); (local folder, the commit it resolved to).

    A pinned commit already in the cache is used without a request; a branch is looked up on the Hub, and
    if the Hub cannot be reached its last cached commit is used, as huggingface_hub does offline."""
    from huggingface_hub import snapshot_download

    s = hub_settings()
    sub = location.subfolder.strip("/")
    what = hub_path(location.repo, sub, location.revision)
    cached = None if force else _cached_folder(location)
    if cached is not None and (s.offline or _COMMIT.fullmatch(location.revision)):
        return cached
    if not s.offline:
        try:
            check_reachable(s.endpoint, what, location.repo, location.revision, location.repo_type)
        except HubUnreachableError:
            if cached is not None:
                return cached
            raise
    try:
        snapshot = Path(snapshot_download(location.repo, revision=location.revision, repo_type=location.repo_type,
                                          allow_patterns=[f"{sub}/*"] if sub else None, cache_dir=s.cache_dir,
                                          endpoint=s.endpoint, force_download=force, local_files_only=s.offline,
                                          etag_timeout=hub_timeout(),
                                          tqdm_class=None if progress else _silent_tqdm()))
    except Exception as exc:  # noqa: BLE001 - every huggingface_hub failure is mapped
        raise _hub_error(exc, location.repo, sub or ".", location.revision, location.repo_type) from exc
    folder = snapshot / sub if sub else snapshot
    if not folder.is_dir() or not any(folder.iterdir()):
        raise MissingFileError(what, f"The repo {location.repo} has no folder {sub!r} at {location.revision}.")
    return folder, snapshot.name


def _cached_folder(location: HubLocation) -> tuple[Path, str] | None:
    """(folder, commit) from the cache alone, when huggingface_hub's cached file listing of the commit says the
    folder is complete (or has no listing); None when it is not cached."""
    from huggingface_hub import snapshot_download

    sub = location.subfolder.strip("/")
    try:
        snapshot = Path(snapshot_download(location.repo, revision=location.revision, repo_type=location.repo_type,
                                          allow_patterns=[f"{sub}/*"] if sub else None,
                                          cache_dir=hub_settings().cache_dir, local_files_only=True))
    except (OSError, ValueError):  # LocalEntryNotFoundError, IncompleteSnapshotError: not (wholly) cached
        return None
    folder = snapshot / sub if sub else snapshot
    return (folder, snapshot.name) if folder.is_dir() and any(folder.iterdir()) else None


def _silent_tqdm() -> type:
    """huggingface_hub's bars switched off (`progress=False`)."""
    from tqdm.auto import tqdm

    class Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


# ---- upload ---------------------------------------------------------------------------------------------
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
    check_reachable(endpoint, hub_path(repo, path, revision), repo, revision)  # at once, not after retries
    api = huggingface_hub.HfApi(endpoint=endpoint, token=token)
    try:
        if not api.file_exists(repo, path, revision=revision):
            return None
        return Path(api.hf_hub_download(repo, path, revision=revision, cache_dir=hub_settings().cache_dir)).read_bytes()
    except HfHubHTTPError as e:
        raise _auth_failure(e, repo, endpoint) from None


def upload_commit(repo: str, files: dict[str, Path | bytes], *, branch: str = "main", private: bool = False,
                  message: str, endpoint: str | None = None, token: str | None = None) -> str:
    """Create the repo (and branch) if needed and add every file in ONE commit; the commit's 40-hex sha.

    `files` maps repo paths to local files or bytes. The Hub applies a commit whole or not at all, so a
    failure here leaves the repo as it was.
    """
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    from dictionaries.errors import PublishError

    token = require_token(token, repo, endpoint)
    endpoint = _upload_endpoint(endpoint)
    check_reachable(endpoint, hub_path(repo, revision=branch) + " (upload)", repo, branch)
    api = huggingface_hub.HfApi(endpoint=endpoint, token=token)
    operations = [huggingface_hub.CommitOperationAdd(path_in_repo=rel, path_or_fileobj=local if isinstance(
                  local, bytes) else str(local)) for rel, local in sorted(files.items())]
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
