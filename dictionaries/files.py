"""Files on disk: sha256, the one atomic writer, paths that stay inside their folder, and safe reads.

Everything that writes a file others may read mid-way (cards, the registry, verification records, checkpoint
pointers) goes through `write_atomic`, so a reader sees the old content or the new one, never a mix; files
that must change together (a registry entry and its card) go through `write_together`, whose journal a
later run replays, so a kill between them leaves nothing half-changed; `locked` serialises writers across
processes; `owned_tempdir` makes work folders that a later run removes if their process was killed. Every
path that comes from a card, a registry or a Hub listing goes through `inside`, so no `../` or absolute
path can read or write outside the folder it belongs to. Weights are read as safetensors or, for legacy
files, with `torch.load(weights_only=True)` only; every unreadable file is a FormatError naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from dictionaries.errors import FormatError, MissingFileError, NonFiniteWeightsError

if TYPE_CHECKING:
    from torch import Tensor


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 23), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: str | Path, content: str | bytes, *, mode: int = 0o644) -> Path:
    """Write `content` to `path` through a temporary file in the same folder and a rename; returns `path`.

    The data is flushed and fsync'ed before the rename, so a crash leaves either the old file or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content.encode() if isinstance(content, str) else content)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600 files; cards and registries are read by everyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_together(journal: str | Path, contents: dict[Path, str | None]) -> None:
    """Change several files in the journal's folder as one: each path -> its new text (None: delete it).

    The journal records every new content first (written atomically: whole or absent), then each file is
    written atomically and the journal removed. A kill before the journal is whole leaves every file as it
    was; a kill after it leaves a journal that `replay_journal`, run by the next reader or writer, finishes.
    Callers hold a `locked` lock across both, so that no reader replays a journal still being applied.
    """
    journal = Path(journal)
    entries = {Path(p).resolve().relative_to(journal.parent.resolve()).as_posix(): c for p, c in contents.items()}
    write_atomic(journal, json.dumps(entries))
    replay_journal(journal)


def replay_journal(journal: str | Path) -> bool:
    """Finish the change a `write_together` journal records (writing a file twice is harmless), then remove
    the journal; False when there was none."""
    journal = Path(journal)
    try:
        entries = json.loads(journal.read_text())
    except FileNotFoundError:
        return False
    except ValueError as e:  # written atomically, so never half: not one of ours
        raise FormatError(str(journal), f"not a journal of write_together ({e})") from None
    for rel, content in entries.items():
        target = inside(journal.parent, rel)
        if content is None:
            target.unlink(missing_ok=True)
        else:
            write_atomic(target, content)
    journal.unlink(missing_ok=True)
    return True


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """An exclusive lock on `path` for the block, across processes: a folder (its inode stays while files in
    it are replaced), or a lock file, created if absent.

    fcntl.flock: the kernel releases it when its holder dies, so a killed process never leaves it taken.
    Not re-entrant: a second `locked` on the same path in one process waits for ever. No lock off POSIX.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path = Path(path)
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


@contextmanager
def owned_tempdir(prefix: str) -> Iterator[Path]:
    """A new folder `<temp dir>/<prefix><pid>-<random>`, removed on leaving the block, however it is left.

    A process killed with -9 cannot remove it, so each call first removes the folders of the same prefix
    whose process is gone (a reused pid only keeps a folder longer)."""
    root = Path(tempfile.gettempdir())
    for old in root.glob(f"{prefix}*"):
        pid = old.name[len(prefix):].split("-")[0]
        if old.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def relative_path_problem(rel: str) -> str | None:
    """Why `rel` is not a plain relative path inside its folder (absolute, `..`, empty parts), else None."""
    if not rel or "\\" in rel or "\x00" in rel:
        return "it must be a non-empty posix path without backslashes"
    p = PurePosixPath(rel)
    if p.is_absolute() or rel.startswith("~") or (len(rel) > 1 and rel[1] == ":"):
        return "it must be relative to the dictionary's folder, not absolute"
    if any(part in ("..", ".", "") for part in rel.split("/")):
        return "it may not contain '.', '..' or empty parts (it would leave the folder)"
    return None


def inside(folder: str | Path, rel: str) -> Path:
    """`folder / rel`, after checking that `rel` is a plain relative path (ValueError otherwise)."""
    problem = relative_path_problem(rel)
    if problem:
        raise ValueError(f"path {rel!r}: {problem}")
    return Path(folder) / rel


# ---- safe reads ---------------------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    """A JSON object from a file, or a FormatError naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(str(path), f"not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise FormatError(str(path), f"expected a JSON object, found {type(data).__name__}")
    return data


# A layout: tensor name -> (shape in named dimensions, required). d = d_in, F = d_dict; () is a scalar.
Layout = dict[str, tuple[tuple[str, ...], bool]]


def require(path: Path, what: str) -> Path:
    """`path`, or a MissingFileError saying a `what` folder needs it."""
    if not path.is_file():
        raise MissingFileError(str(path), f"A {what} folder needs it.")
    return path


def load_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file, or a FormatError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(str(path), f"not a readable safetensors file ({e})") from None


def check_weight_values(state: dict[str, Tensor], source: str) -> None:
    """Refuse weights a dictionary cannot be: tensors that are not floating point (FormatError) or that hold NaN
    or infinite values (NonFiniteWeightsError), either of which would otherwise load and compute nonsense."""
    import torch

    for name, tensor in state.items():
        if not torch.is_floating_point(tensor):
            raise FormatError(source, f"tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')}; dictionary "
                                      "weights are float32, float16, bfloat16 or float64")
    bad = {name: int((~torch.isfinite(t)).sum()) for name, t in state.items() if not bool(torch.isfinite(t).all())}
    if bad:
        raise NonFiniteWeightsError(source, bad)


def load_pickle(path: Path) -> dict[str, Tensor]:
    """A torch.save'd state dict of tensors, loaded with weights_only=True (never arbitrary pickles)."""
    import torch

    try:
        try:  # memory-mapped: the tensors are read as they are used (zip-format files, torch >= 1.6)
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (pre-zip) file cannot be mapped: read it whole
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError: all mean "not a plain state dict"
        raise FormatError(str(path), f"not a plain tensor state dict that loads with weights_only=True ({e}); "
                                     "arbitrary pickles are never loaded") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FormatError(str(path), "expected a state dict of tensors (what dictionary_learning saves)")
    return dict(state)
