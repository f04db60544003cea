"""Checkpoints of a training session, and resuming from them bit-identically.

`<out>/checkpoint/step-<S>/` holds `trainers.pt` (recipes, names, every trainer's state, the samplers'
generators, the step, the notes of changes made on earlier resumes), written by rank 0, and `rank<r>.pt`
(stream position, buffer state, torch RNG) by each rank; `<out>/checkpoint/latest` names the current one.
A new checkpoint is written under a temporary name, fsync'ed and switched in with os.replace, so a kill (or
a power cut) at any moment leaves the previous one whole; one whose weights are not all finite is never
written (`check_finite`). Files are read back with `torch.load(weights_only=True)`. A resumed run reads the
same batches and ends with the same weights as an uninterrupted one (bit-identical on the CPU); a resume
may change only what training/resume.py allows.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from dictionaries.errors import FormatError, NonFiniteLossError, RecipeMismatchError
from dictionaries.files import write_atomic
from training.resume import describe_changes, recipe_differences, split_changes
from training.session import Session, barrier

CHECKPOINT_DIR = "checkpoint"


def save_checkpoint(s: Session) -> Path:
    """Write step-<S>/ under a temporary name, switch `latest` to it, drop older ones; returns its path."""
    root = s.out / CHECKPOINT_DIR
    check_finite(s, [job.trainer.module for job in s.jobs], latest_checkpoint(s.out))
    final = root / f"step-{s.step}"
    tmp = root / f"step-{s.step}.tmp"
    if s.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(s.world)
    torch.save({"stream": s.stream.state_dict(), "buffer": s.buffer.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / f"rank{s.rank}.pt")
    _fsync(tmp / f"rank{s.rank}.pt")
    if s.rank == 0:
        torch.save({"step": s.step, "world": s.world, "names": [j.name for j in s.jobs],
                    "recipes": [j.recipe.model_dump(mode="json") for j in s.jobs],
                    "trainers": [j.trainer.state_dict() for j in s.jobs],
                    "samplers": [j.sampler.get_state() for j in s.jobs], "notes": [j.notes for j in s.jobs]},
                   tmp / "trainers.pt")
        _fsync(tmp / "trainers.pt")
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


def _fsync(path: Path) -> None:
    """Force a written file to disk (torch.save does not), so `latest` never names a folder of lost writes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint folder `latest` names, or None when the run has none."""
    pointer = out / CHECKPOINT_DIR / "latest"
    if not pointer.exists():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    return folder if folder.is_dir() else None


def _load(path: Path, folder: Path, **kwargs) -> dict:
    """One checkpoint file; a truncated or damaged one (or one that is not a checkpoint's dict) is a FormatError
    naming the checkpoint folder and saying what to do."""
    try:
        state = torch.load(path, weights_only=True, **kwargs)
        why = None if isinstance(state, dict) else f"it holds a {type(state).__name__}"
    except Exception as e:  # noqa: BLE001 - zip, unpickling, EOF and OS errors all mean "cannot be read"
        why = (str(e).splitlines() or [repr(e)])[0]
    if why is not None:
        raise FormatError(str(folder), f"the checkpoint cannot be read ({path.name}: {why}). Delete this checkpoint "
                                       "folder and train again without --resume to start from scratch")
    return state


def check_checkpoint(folder: Path) -> None:
    """Open every file of a checkpoint without reading its tensors (memory-mapped), so that a damaged one is
    refused before a resumed run loads its model."""
    for path in [folder / "trainers.pt", *sorted(folder.glob("rank*.pt"))]:
        _load(path, folder, mmap=True)


def restore_checkpoint(s: Session, folder: Path) -> None:
    """Load a checkpoint into a fresh session; refuses one of other recipes, names or world size, except the
    changes training/resume.py allows, which each job's provenance notes record."""
    saved = _load(folder / "trainers.pt", folder)
    step = int(saved["step"])
    diffs = []
    if saved["names"] != [j.name for j in s.jobs]:
        diffs.append(("dictionaries", saved["names"], [j.name for j in s.jobs]))
    allowed: list[list] = []
    for name, old, job in zip(saved["names"], saved["recipes"], s.jobs):
        prefix = f"{name}: " if len(s.jobs) > 1 else ""
        mine, theirs = split_changes(recipe_differences(old, job.recipe.model_dump(mode="json")), step=step,
                                     decay_fraction=old["optimizer"]["decay_fraction"], batch_size=old["batch_size"])
        allowed.append(mine)
        diffs += [(prefix + f, a, b) for f, a, b in theirs]
    if saved["world"] != s.world:
        diffs.append(("world size (torchrun processes)", saved["world"], s.world))
    if diffs:
        raise RecipeMismatchError(str(folder), diffs)
    mine = _load(folder / f"rank{s.rank}.pt", folder)
    notes = saved.get("notes") or [[] for _ in s.jobs]  # checkpoints written before notes existed have none
    for job, state, gen, kept, changes in zip(s.jobs, saved["trainers"], saved["samplers"], notes, allowed):
        job.trainer.load_state_dict(state)
        job.sampler.set_state(gen)
        job.notes = [*kept, *([describe_changes(changes, step, s.total_steps, str(folder))] if changes else [])]
    s.stream.load_state_dict(mine["stream"])
    s.buffer.load_state_dict(mine["buffer"])
    torch.set_rng_state(mine["torch_rng"])
    s.step = step


def check_finite(s: Session, modules: list, checkpoint: Path | None) -> None:
    """NonFiniteLossError unless every floating tensor of every module is finite, so that neither a checkpoint
    nor an output folder is ever written with NaN or infinite weights."""
    for i, (job, module) in enumerate(zip(s.jobs, modules)):
        tensors = [t for t in module.state_dict().values() if t.is_floating_point()]
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            metrics = {**(s.last[i] if s.last else {}), "weight_norm": float("nan")}
            raise NonFiniteLossError(job.name, s.step, metrics, str(checkpoint) if checkpoint else None)
