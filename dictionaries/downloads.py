"""Downloads that need no Hub client: the HF environment read at call time, plain-HTTPS files, zip members.

`hub.py` (the only importer of huggingface_hub) builds on these for original releases outside the Hub
(`<HF_HOME>/dictionaries/url/`), members of zip archives (`zip/<zip sha256>/`) and the records of files
already verified (`verified/<sha256>.json`: path, size, inode and mtime, so a large file is hashed once).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from tqdm.auto import tqdm

from dictionaries.card import sha256_of
from dictionaries.errors import HubUnreachableError, MissingFileError

_DEFAULT_ENDPOINT = "https://huggingface.co"


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
    endpoint = os.environ.get("HF_ENDPOINT", _DEFAULT_ENDPOINT).rstrip("/")
    return HubSettings(endpoint, cache, home, offline)


def dictionaries_cache() -> Path:
    """`<HF_HOME>/dictionaries`: extracted zip members, plain-URL downloads and verification records."""
    return hub_settings().home / "dictionaries"


def is_verified(path: Path, sha256: str) -> bool:
    """Whether `path` has this sha256: from the record when the file's stat is unchanged, else hashed now."""
    record_path = dictionaries_cache() / "verified" / f"{sha256}.json"
    real = Path(path).resolve()
    stat = real.stat()
    fingerprint = {"path": str(real), "size": stat.st_size, "ino": stat.st_ino, "mtime_ns": stat.st_mtime_ns}
    try:
        if json.loads(record_path.read_text()) == fingerprint:
            return True
    except (OSError, ValueError):
        pass
    if sha256_of(real) != sha256:
        return False
    record_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(record_path, json.dumps(fingerprint).encode())
    return True


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def download_url(url: str, target: Path, *, progress: bool = True) -> Path:
    """Stream `url` into `target` atomically (temp file + rename) with a progress bar; honours HF_HUB_OFFLINE."""
    import urllib.error
    import urllib.request

    s = hub_settings()
    origin = "{0.scheme}://{0.netloc}".format(urlparse(url))
    if s.offline:
        raise HubUnreachableError(url, origin, offline=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.incomplete")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as out:
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
    import shutil
    import zipfile

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
