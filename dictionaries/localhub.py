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

A commit is all or nothing, like the Hub's. It is built with git's plumbing in a private index
(GIT_INDEX_FILE: read-tree of main, hash-object, update-index, write-tree, commit-tree) and switched in
with `update-ref main NEW OLD`, which fails if main moved; the shared index and working tree play no part,
so a process killed at any point leaves main as it was (at most unreachable objects, which `git gc`
drops), and a later commit holds only its own files. Commits to one repo take its lock in `locks/` in
turn (fcntl: released when the holder dies). The working tree is then brought to main (`reset --hard`) for
people and tests to read; olah serves main from the git objects, not from it.
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
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from dictionaries.errors import LocalHubError
from dictionaries.files import locked

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
        with locked(self._lock(repo_id, repo_type)):
            if _head(path) is not None:
                if not exist_ok:
                    raise LocalHubError(f"repo {repo_id} already exists at {path}")
                return path
            path.mkdir(parents=True, exist_ok=True)
            _git(path, "init", "-q", "-b", "main")
            self._commit_locked(path, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                                "initial commit", (), None)
        return path

    def commit(self, repo_id: str, files: Mapping[str, bytes | str | Path], message: str,
               delete: Iterable[str] = (), repo_type: str = "model",
               check: Callable[[Callable[[str], bytes | None]], None] | None = None) -> str:
        """Write `files` (repo path -> bytes or a local file), remove `delete`, commit to main in one commit,
        all or nothing (see the module's docstring); the 40-hex sha.

        `check`, if given, is called under the repo's lock with a reader of main's files (repo path -> bytes,
        None if absent) before anything is written: what it raises stops the commit, so a check of the
        target and the commit it allows cannot be split by another commit."""
        for rel in [*files, *delete]:
            _check_relative(rel)
        path = self.create_repo(repo_id, repo_type)
        with locked(self._lock(repo_id, repo_type)):
            if check is not None:
                check(lambda rel: self.read(repo_id, rel, repo_type=repo_type))
            sha = self._commit_locked(path, files, message, delete, _head(path))
        return sha

    def _commit_locked(self, path: Path, files: Mapping[str, bytes | str | Path], message: str,
                       delete: Iterable[str], parent: str | None) -> str:
        """The commit itself, the repo's lock held: a private index from `parent`, then update-ref."""
        for stale in (path / ".git").glob("dictionaries-index-*"):  # a killed commit's: the lock is ours now
            stale.unlink(missing_ok=True)
        index = path / ".git" / f"dictionaries-index-{os.getpid()}"
        env = {"GIT_INDEX_FILE": str(index)}
        try:
            _git(path, "read-tree", *([parent] if parent else ["--empty"]), env=env)
            for rel in delete:
                if not _git(path, "ls-files", "--", rel, env=env).strip():
                    raise LocalHubError(f"cannot delete {rel!r} from {path.name}: no such file")
                _git(path, "rm", "-r", "-q", "--cached", "--", rel, env=env)
            lines = [f"100644 {_blob(path, rel, content)}\t{rel}\n" for rel, content in files.items()]
            _git(path, "update-index", "--add", "--replace", "--index-info", env=env, stdin="".join(lines).encode())
            tree = _git(path, "write-tree", env=env).strip()
            sha = _git(path, *_IDENTITY, "commit-tree", tree, *(["-p", parent] if parent else []), "-m", message,
                       env=env).strip()
            _git(path, *_IDENTITY, "update-ref", "-m", message, "refs/heads/main", sha, parent or "0" * 40)
        finally:
            index.unlink(missing_ok=True)
        try:  # the working tree follows main, for people and tests; olah does not read it
            _git(path, *_IDENTITY, "reset", "-q", "--hard")
        except LocalHubError:
            pass  # another git process holds the index: the next commit brings the tree up to date
        return sha

    def read(self, repo_id: str, rel: str, revision: str = "main", repo_type: str = "model") -> bytes | None:
        """The bytes of `rel` in the repo at `revision` (from git, not the working tree), None if absent."""
        path = self.repo_path(repo_id, repo_type)
        if _head(path) is None:
            return None
        try:
            return _run_git(path, "cat-file", "blob", f"{revision}:{rel}")
        except LocalHubError:
            return None

    def head(self, repo_id: str, repo_type: str = "model") -> str:
        """The commit `main` points at."""
        return _git(self.repo_path(repo_id, repo_type), "rev-parse", "HEAD").strip()

    def _lock(self, repo_id: str, repo_type: str) -> Path:
        return self.root / "locks" / f"{_REPO_DIRS[repo_type]}--{repo_id.replace('/', '--')}.lock"


def _head(path: Path) -> str | None:
    """The commit main points at, None when the repo or main does not exist yet."""
    if not (path / ".git").exists():
        return None
    try:
        return _git(path, "rev-parse", "--verify", "-q", "refs/heads/main").strip() or None
    except LocalHubError:
        return None


def _blob(path: Path, rel: str, content: bytes | str | Path) -> str:
    """Store one file's bytes as a git blob (exactly these bytes: no filters) and return its id; a local file
    is streamed by git, not read into memory here."""
    if isinstance(content, bytes):
        _check_servable(content, rel)
        return _git(path, "hash-object", "-w", "--no-filters", "--stdin", stdin=content).strip()
    local = Path(content).resolve()
    if 120 < local.stat().st_size < 150:
        _check_servable(local.read_bytes(), rel)
    return _git(path, "hash-object", "-w", "--no-filters", "--", str(local)).strip()


def _olah_command(config: Path) -> list[str]:
    """`olah-cli -c config`, preferring the console script next to this interpreter."""
    beside = Path(sys.executable).with_name("olah-cli")
    exe = str(beside) if beside.exists() else shutil.which("olah-cli")
    if exe is None:
        return [sys.executable, "-c", "import sys; from olah.server import cli; sys.exit(cli())", "-c", str(config)]
    return [exe, "-c", str(config)]


def _run_git(cwd: Path, *args: str, env: Mapping[str, str] | None = None, stdin: bytes | None = None) -> bytes:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1", **(env or {})}
    result = subprocess.run(["git", *args], cwd=cwd, env=env, input=stdin, capture_output=True)
    if result.returncode != 0:
        raise LocalHubError(f"git {' '.join(args)} failed in {cwd}: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout


def _git(cwd: Path, *args: str, env: Mapping[str, str] | None = None, stdin: bytes | None = None) -> str:
    return _run_git(cwd, *args, env=env, stdin=stdin).decode()


def _check_relative(rel: str) -> None:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not rel or p.parts[0] == ".git":
        raise LocalHubError(f"repo path {rel!r} must be relative, inside the repo and not under .git")


def _check_servable(data: bytes, rel: str) -> None:
    """olah decodes 121..149-byte blobs as UTF-8 to look for git-lfs pointers; binary ones make it fail."""
    size = len(data)
    if 120 < size < 150:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise LocalHubError(f"{rel}: olah cannot serve a binary file of {size} bytes (121..149 bytes "
                                "are parsed as git-lfs pointers); make it larger or smaller") from None
