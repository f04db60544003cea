"""A real Hub-compatible server on loopback: `olah` serving local git repositories (DESIGN.md section 5).

Used by the tests, the offline demo and publishing to a local hub. Layout under `root`:
`mirrors/models/<org>/<name>` (plain git repos, branch `main`, one per Hub repo), `cache/` (olah's
`repos-path`), `olah.toml` and `olah.log`. olah reads the mirrors with GitPython on every request and
resolves `main` from the git refs each time, so a new commit is visible at once (no stale cache: its
cache only holds what it proxies from an upstream, and it runs with `offline = true`).

olah reads a committed file whole into memory and serves it with the git blob id as etag. A blob of 121
to 149 bytes is checked for a git-lfs pointer by decoding it as UTF-8, which fails for binary files of
that size: `commit` refuses them (pad the file or change it). Nothing here imports huggingface_hub
(only `hub.py` does); committing is plain `git` through subprocess, with the identity given per call
(`-c user.name=... -c user.email=...`, so no global git config is needed; olah itself only reads).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

from dictionaries.errors import LocalHubError

_IDENTITY = ("-c", "user.name=dictionaries localhub", "-c", "user.email=localhub@localhost",
             "-c", "commit.gpgsign=false", "-c", "core.hooksPath=/dev/null")
_REPO_DIRS = {"model": "models", "dataset": "datasets"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class LocalHub:
    """An `olah` server on 127.0.0.1 serving the git repos under `root/mirrors` through the Hub's HTTP API."""

    def __init__(self, root: str | Path, port: int | None = None):
        self.root = Path(root).resolve()
        self.port = port
        self.mirrors = self.root / "mirrors"
        self.process: subprocess.Popen | None = None

    # ---- server ---------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """The base URL to put in HF_ENDPOINT, e.g. http://127.0.0.1:8090."""
        if self.port is None:
            raise LocalHubError("the local hub has no port yet: call start() first")
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> LocalHub:
        """Write the config, launch `olah-cli -c olah.toml` and wait until it answers HTTP."""
        if self.process is not None and self.process.poll() is None:
            return self
        if self.port is None:
            self.port = free_port()
        elif not _port_is_free(self.port):  # else we would wait on whoever answers there
            raise LocalHubError(f"port {self.port} on 127.0.0.1 is in use; pick another or pass port=None")
        self.mirrors.mkdir(parents=True, exist_ok=True)
        (self.root / "cache").mkdir(exist_ok=True)
        config = self.root / "olah.toml"
        config.write_text(self._config_text())
        self._log = open(self.root / "olah.log", "ab")
        self.process = subprocess.Popen(_olah_command(config), cwd=self.root, stdout=self._log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_until_up(timeout)
        return self

    def stop(self) -> None:
        """Terminate the server (then kill it if it does not exit within 10 s)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        self._log.close()

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _config_text(self) -> str:
        netloc = f"127.0.0.1:{self.port}"
        return "\n".join([
            "[basic]", 'host = "127.0.0.1"', f"port = {self.port}",
            f'repos-path = "{(self.root / "cache").as_posix()}"',
            f'mirrors-path = ["{self.mirrors.as_posix()}"]',
            'mirror-scheme = "http"', f'mirror-netloc = "{netloc}"', f'mirror-lfs-netloc = "{netloc}"',
            "", "[accessibility]", "offline = true", "",
        ])

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LocalHubError(f"olah exited with code {self.process.returncode} before answering; "
                                    f"see {self.root / 'olah.log'}:\n{self.log_tail()}")
            try:
                # Any HTTP answer (even 404) means the server is up; refused connections mean not yet.
                urllib.request.urlopen(f"{self.endpoint}/api/models/_/_", timeout=2).close()
                return
            except urllib.error.HTTPError:
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.2)
        self.stop()
        raise LocalHubError(f"olah did not answer on {self.endpoint} within {timeout:.0f} s; "
                            f"see {self.root / 'olah.log'}")

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of olah's log (for error messages)."""
        path = self.root / "olah.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    # ---- repositories ---------------------------------------------------------------------------
    def repo_path(self, repo_id: str, repo_type: str = "model") -> Path:
        """The git working tree that serves `repo_id` (`org/name`)."""
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
            raise LocalHubError(f"repo id {repo_id!r} is not of the form 'org/name'")
        if repo_type not in _REPO_DIRS:
            raise LocalHubError(f"repo type {repo_type!r} is not one of {sorted(_REPO_DIRS)}")
        return self.mirrors / _REPO_DIRS[repo_type] / parts[0] / parts[1]

    def create_repo(self, repo_id: str, repo_type: str = "model", exist_ok: bool = True) -> Path:
        """A git repo on branch `main` with an initial commit (like the Hub's `.gitattributes` one)."""
        path = self.repo_path(repo_id, repo_type)
        if (path / ".git").exists():
            if not exist_ok:
                raise LocalHubError(f"repo {repo_id} already exists at {path}")
            return path
        path.mkdir(parents=True, exist_ok=True)
        _git(path, "init", "-q", "-b", "main")
        (path / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
        _git(path, "add", ".gitattributes")
        _git(path, *_IDENTITY, "commit", "-q", "-m", "initial commit")
        return path

    def commit(self, repo_id: str, files: Mapping[str, bytes | str | Path], message: str,
               delete: Iterable[str] = (), repo_type: str = "model") -> str:
        """Write `files` (repo path -> bytes or a local file), remove `delete`, commit to main; the 40-hex sha."""
        path = self.create_repo(repo_id, repo_type)
        for rel in files:
            _check_relative(rel)
        for rel in delete:
            _check_relative(rel)
            target = path / rel
            if not target.exists():
                raise LocalHubError(f"cannot delete {rel!r} from {repo_id}: no such file")
            _git(path, "rm", "-r", "-q", "--", rel)
        for rel, content in files.items():
            target = path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, (str, Path)) and not isinstance(content, bytes):
                shutil.copyfile(content, target)
            else:
                target.write_bytes(content)
            _check_servable(target, rel)
            _git(path, "add", "--", rel)
        _git(path, *_IDENTITY, "commit", "-q", "--allow-empty", "-m", message)
        return _git(path, "rev-parse", "HEAD").strip()

    def head(self, repo_id: str, repo_type: str = "model") -> str:
        """The commit `main` points at."""
        return _git(self.repo_path(repo_id, repo_type), "rev-parse", "HEAD").strip()


def _olah_command(config: Path) -> list[str]:
    """`olah-cli -c config`, preferring the console script next to this interpreter."""
    beside = Path(sys.executable).with_name("olah-cli")
    exe = str(beside) if beside.exists() else shutil.which("olah-cli")
    if exe is None:
        return [sys.executable, "-c", "import sys; from olah.server import cli; sys.exit(cli())", "-c", str(config)]
    return [exe, "-c", str(config)]


def _git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1"}
    result = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise LocalHubError(f"git {' '.join(args)} failed in {cwd}: {result.stderr.strip()}")
    return result.stdout


def _check_relative(rel: str) -> None:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not rel or p.parts[0] == ".git":
        raise LocalHubError(f"repo path {rel!r} must be relative, inside the repo and not under .git")


def _check_servable(target: Path, rel: str) -> None:
    """olah decodes 121..149-byte blobs as UTF-8 to look for git-lfs pointers; binary ones make it fail."""
    size = target.stat().st_size
    if 120 < size < 150:
        try:
            target.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise LocalHubError(f"{rel}: olah cannot serve a binary file of {size} bytes (121..149 bytes "
                                "are parsed as git-lfs pointers); make it larger or smaller") from None
