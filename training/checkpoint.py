"""Checkpoints of a training session, and resuming from them bit-identically.

`<out>/checkpoint/step-<S>/` holds `trainers.pt` (recipes, names, every trainer's state, the samplers'
generators, the step), written by rank 0, and `rank<r>.pt` (stream position, buffer state, torch RNG) by
each rank; `<out>/checkpoint/latest` names the current one. A new checkpoint is written under a temporary
name and switched in with os.replace, so a kill at any moment leaves the previous one whole. Files are
read back with `torch.load(weights_only=True)`. A resumed run reads the same batches and ends with the
same weights as an uninterrupted one (bit-identical on the CPU).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from dictionaries.errors import CorruptCheckpointError, RecipeMismatchError
from dictionaries.files import write_atomic
from training.session import Session, barrier

CHECKPOINT_DIR = "checkpoint"


def save_checkpoint(s: Session) -> Path:
    """Write step-<S>/ under a temporary name, switch `latest` to it, drop older ones; returns its path."""
    root = s.out / CHECKPOINT_DIR
    final = root / f"step-{s.step}"
    tmp = root / f"step-{s.step}.tmp"
    if s.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(s.world)
    torch.save({"stream": s.stream.state_dict(), "buffer": s.buffer.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / f"rank{s.rank}.pt")
    if s.rank == 0:
        torch.save({"step": s.step, "world": s.world, "names": [j.name for j in s.jobs],
                    "recipes": [j.recipe.model_dump(mode="json") for j in s.jobs],
                    "trainers": [j.trainer.state_dict() for j in s.jobs],
                    "samplers": [j.sampler.get_state() for j in s.jobs]}, tmp / "trainers.pt")
    barrier(s.world)
    if s.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_atomic(root / "latest", final.name)
        for old in root.glob("step-*"):
            if old.name != final.name:
                shutil.rmtree(old, ignore_errors=True)
    barrier(s.world)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint folder `latest` names, or None when the run has none."""
    pointer = out / CHECKPOINT_DIR / "latest"
    if not pointer.exists():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    return folder if folder.is_dir() else None


def recipe_differences(saved: dict, now: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted field, saved value, current value) for every leaf where two recipe dumps differ."""
    diffs = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += recipe_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append((prefix + key, a, b))
    return diffs


def _load(path: Path, folder: Path, **kwargs) -> dict:
    """One checkpoint file; a truncated or damaged one (or one that is not a checkpoint's dict) is a
    CorruptCheckpointError naming the checkpoint folder."""
    try:
        state = torch.load(path, weights_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - zip, unpickling, EOF and OS errors all mean "cannot be read"
        raise CorruptCheckpointError(str(folder), f"{path.name}: {str(e).splitlines()[0] if str(e) else e!r}") from None
    if not isinstance(state, dict):
        raise CorruptCheckpointError(str(folder), f"{path.name} holds a {type(state).__name__}, not a checkpoint")
    return state


def check_checkpoint(folder: Path) -> None:
    """Open every file of a checkpoint without reading its tensors (memory-mapped), so that a damaged one is
    refused before a resumed run loads its model."""
    for path in [folder / "trainers.pt", *sorted(folder.glob("rank*.pt"))]:
        _load(path, folder, mmap=True)


def restore_checkpoint(s: Session, folder: Path) -> None:
    """Load a checkpoint into a fresh session; refuses one of other recipes, names or world size."""
    saved = _load(folder / "trainers.pt", folder)
    diffs = []
    if saved["names"] != [j.name for j in s.jobs]:
        diffs.append(("dictionaries", saved["names"], [j.name for j in s.jobs]))
    for name, old, job in zip(saved["names"], saved["recipes"], s.jobs):
        prefix = f"{name}: " if len(s.jobs) > 1 else ""
        diffs += [(prefix + f, a, b) for f, a, b in recipe_differences(old, job.recipe.model_dump(mode="json"))]
    if saved["world"] != s.world:
        diffs.append(("world size (torchrun processes)", saved["world"], s.world))
    if diffs:
        raise RecipeMismatchError(str(folder), diffs)
    mine = _load(folder / f"rank{s.rank}.pt", folder)
    for job, state, gen in zip(s.jobs, saved["trainers"], saved["samplers"]):
        job.trainer.load_state_dict(state)
        job.sampler.set_state(gen)
    s.stream.load_state_dict(mine["stream"])
    s.buffer.load_state_dict(mine["buffer"])
    torch.set_rng_state(mine["torch_rng"])
    s.step = int(saved["step"])
