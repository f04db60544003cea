"""Publishing to a local hub is all or nothing, with real processes: kill -9 at chosen points, and four
publishes to one repo at once.

A child process runs `publish(..., register=True)` and sends itself SIGKILL at a chosen point (the git
command that makes the commit, right after it, between the card and registry.yaml): no `finally`, no
clean-up. Afterwards every commit on main must hold exactly its own files, the mirror's index must be clean,
the registry and its cards must agree with the files at the commits they pin, and no temporary copy of the
weights may be left in the child's temp folder.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dictionaries.publish import publish
from dictionaries.registry import load_registry

from helpers import make_folder

ROOT = Path(__file__).resolve().parents[1]
FILES = {"README.md", "card.json", "weights.safetensors"}

_CHILD = """
import os, signal, sys
from pathlib import Path
from dictionaries import files, localhub
from dictionaries.publish import publish

point, folder, repo, sub, hub_root, registry = sys.argv[1:7]

def die():
    os.kill(os.getpid(), signal.SIGKILL)  # a real kill -9: no finally, no clean-up

real_git, real_write = localhub._git, files.write_atomic

def git(cwd, *args, **kw):
    if point == "at-commit" and ("update-ref" in args or "commit" in args):
        die()  # the files are in git (objects, or the old code's index); main does not have them yet
    out = real_git(cwd, *args, **kw)
    if point == "after-commit" and ("update-ref" in args or "commit" in args):
        die()  # main has the commit; nothing is registered yet
    return out

def write_atomic(path, content, **kw):
    if point == "between-card-and-registry" and Path(path).name == "registry.yaml":
        die()  # the card is written, registry.yaml is not
    return real_write(path, content, **kw)

localhub._git, files.write_atomic = git, write_atomic
from dictionaries import registry as registry_module
if hasattr(registry_module, "write_atomic"):  # where registry.py imports it by name
    registry_module.write_atomic = write_atomic
publish(folder, repo, subfolder=sub, register=True, force=True, local_hub=hub_root, registry_path=registry)
"""


def child(point: str, folder: Path, repo: str, sub: str, hub, registry: Path, tmp: Path) -> subprocess.Popen:
    """A process publishing `folder` (its temp folder: `tmp`), killing itself at `point` ("none": never)."""
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    return subprocess.Popen([sys.executable, "-c", _CHILD, point, str(folder), repo, sub, str(hub.root),
                             str(registry)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def git(path: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, check=True).stdout


def publish_commits(path: Path) -> list[tuple[str, str, set[str]]]:
    """(message, its dictionary's subfolder, the files the commit changed) for every publish commit on main."""
    out = []
    for line in git(path, "log", "--format=%H %s", "main").splitlines():
        sha, message = line.split(" ", 1)
        if message.startswith("Publish "):
            changed = set(git(path, "diff-tree", "--no-commit-id", "--name-only", "-r", f"{sha}^", sha).split())
            out.append((message, sha, changed))
    return out


def assert_each_commit_holds_its_own_files(path: Path, subfolders: dict[str, str]) -> None:
    """Each publish commit names one dictionary and changed that dictionary's files and no others (a
    republished README.md may be unchanged)."""
    for message, sha, changed in publish_commits(path):
        own = {f"{subfolders[message.split(' ')[1]]}/{f}" for f in FILES}
        assert changed <= own, (message, sha, changed - own)
        assert {f for f in own if not f.endswith("README.md")} <= changed, (message, sha)


def assert_clean(path: Path) -> None:
    assert git(path, "status", "--porcelain") == ""  # nothing staged or changed for a later commit to take
    assert not list((path / ".git").glob("dictionaries-index-*"))


def assert_registry_agrees(hub, registry: Path, names: list[str]) -> None:
    """Every registered entry's card hashes are those of the files at the commit its entry pins."""
    reg = load_registry(registry)
    for name in names:
        entry = reg.get(name)
        for item in entry.card.files.items:
            data = subprocess.run(["git", "cat-file", "blob", f"{entry.location.revision}:"
                                   f"{entry.location.subfolder}/{item.path}"], cwd=hub.repo_path(entry.location.repo),
                                  capture_output=True, check=True).stdout
            assert hashlib.sha256(data).hexdigest() == item.sha256, (name, item.path)


@pytest.mark.parametrize("point", ["at-commit", "after-commit", "between-card-and-registry"])
def test_a_publish_killed_at_any_point_leaves_nothing_half_done(point, tmp_path, local_hub, registry):
    repo = f"faults/killed-{point}"
    make_folder(tmp_path / "a1", seed=1, name="toy/mlp0/16-a")
    make_folder(tmp_path / "a2", seed=2, name="toy/mlp0/16-a")  # the same entry, new weights
    make_folder(tmp_path / "b", seed=3, name="toy/mlp0/16-b")
    first = publish(tmp_path / "a1", repo, subfolder="a", register=True, local_hub=local_hub,
                    registry_path=registry)

    proc = child(point, tmp_path / "a2", repo, "a", local_hub, registry, tmp_path / "tmp")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]

    pinned = load_registry(registry).get("toy/mlp0/16-a").location.revision
    head = local_hub.head(repo)
    if point == "at-commit":
        assert head == first.location.revision == pinned
    elif point == "after-commit":
        assert head != first.location.revision == pinned  # committed, not registered: the old entry stays
    else:
        assert head == pinned != first.location.revision  # the killed registration was finished on reading
    assert_registry_agrees(local_hub, registry, ["toy/mlp0/16-a"])

    after = publish(tmp_path / "b", repo, subfolder="b", register=True, local_hub=local_hub, registry_path=registry)
    path = local_hub.repo_path(repo)
    assert publish_commits(path)[0][1] == after.location.revision
    assert_each_commit_holds_its_own_files(path, {"toy/mlp0/16-a": "a", "toy/mlp0/16-b": "b"})
    assert_clean(path)
    assert_registry_agrees(local_hub, registry, ["toy/mlp0/16-a", "toy/mlp0/16-b"])
    assert not list(registry.parent.glob(".registry.yaml*"))  # no journal or temporary left
    assert list((tmp_path / "tmp").iterdir()) == []  # no staged copy of the weights outlived the kill


def test_four_publishes_to_one_repo_at_once_each_commit_their_own_files(tmp_path, local_hub, registry):
    repo = "faults/parallel"
    names = {f"toy/mlp0/16-p{i}": f"p{i}" for i in range(4)}
    procs = []
    for i, (name, sub) in enumerate(names.items()):
        make_folder(tmp_path / sub, seed=10 + i, name=name)
        procs.append(child("none", tmp_path / sub, repo, sub, local_hub, registry, tmp_path / "tmp"))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]

    path = local_hub.repo_path(repo)
    commits = publish_commits(path)
    assert sorted(message.split(" ")[1] for message, _, _ in commits) == sorted(names)
    assert_each_commit_holds_its_own_files(path, names)
    assert_clean(path)
    assert_registry_agrees(local_hub, registry, list(names))
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_killed_runs_work_folder_is_removed_by_the_next_run(tmp_path, monkeypatch):
    """mirror's work folder (converted weights) is an owned_tempdir: a later run removes a dead process's."""
    from dictionaries.files import owned_tempdir

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # tempfile caches the temp folder: read TMPDIR again
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"dictionaries-mirror-{gone.stdout.strip()}-x1"
    (dead / "native").mkdir(parents=True)
    (dead / "native" / "weights.safetensors").write_bytes(b"w" * 1000)
    alive = tmp_path / f"dictionaries-mirror-{os.getpid()}-x2"
    alive.mkdir()
    with owned_tempdir("dictionaries-mirror-") as work:
        assert work.parent == tmp_path
        assert not dead.exists()
        assert alive.exists()  # a live process's folder is left alone
    assert not work.exists()
