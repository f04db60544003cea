"""Which recipe changes a resumed run may make, and how they are recorded.

A checkpoint at step S holds the state its recipe produced over steps 1..S. A change is allowed on resume
when it alters only the steps still ahead and nothing saved depends on it; it is then written into the
output card's provenance notes, so the card says which steps ran under which value:

- `optimizer.lr`: Adam's moments do not depend on the learning rate (the update is lr * m / (sqrt(v) + eps),
  Kingma & Ba 2015, algorithm 1), and `trainer.lr_at` recomputes the rate from the recipe at every step.
- `optimizer.grad_clip`: clipping acts on each step's own gradient only.
- `optimizer.decay_fraction`: the schedule's tail, again a pure function of (recipe, step, total steps).
- `tokens`, upwards only, while no step up to S was in the old schedule's decay: the steps trained so far
  are then exactly those the longer recipe trains (same warm-up, same constant rate), so the resumed run
  ends where an uninterrupted run of the longer recipe ends. Past the decay's start the rate would jump
  back up, which neither recipe describes: refused, like a shorter run.

These are the remedies NonFiniteLossError suggests (a lower rate, clipping) plus continuing a run that ended
too early. Everything else (penalty, architecture, width, data, seed, Adam's betas and eps, warm-up) shaped
the saved state or the data order, and a checkpoint of another value is refused as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SAFE_ON_RESUME = ("optimizer.lr", "optimizer.grad_clip", "optimizer.decay_fraction")
LENGTH_FIELDS = ("tokens", "total_steps")  # the run's length: in a recipe, and in a trainer's state

Difference = tuple[str, Any, Any]  # (dotted field, value in the checkpoint, value now)


def recipe_differences(saved: dict, now: dict, prefix: str = "") -> list[Difference]:
    """(dotted field, saved value, current value) for every leaf where two recipe dumps differ. A top-level field
    the saved dump lacks (written before the field existed, e.g. `autocast`) counts as its default then."""
    if not prefix:
        saved = {**_defaults(set(now) - set(saved)), **saved}
    diffs = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += recipe_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append((prefix + key, a, b))
    return diffs


def decay_start(total_steps: int, decay_fraction: float) -> int:
    """The first step of the linear decay to 0 (`total_steps` when there is none), as `trainer.lr_at` has it."""
    return total_steps - round(decay_fraction * total_steps)


def split_changes(diffs: Sequence[Difference], *, step: int, decay_fraction: float,
                  batch_size: int = 1) -> tuple[list[Difference], list[Difference]]:
    """(allowed, refused) differences for a resume at `step` from a checkpoint whose schedule decays over the
    last `decay_fraction`; a length in tokens is turned into steps with `batch_size`."""
    allowed, refused = [], []
    for field, old, new in diffs:
        name = field.rsplit(": ", 1)[-1]  # "dictionary: field" when several are trained together
        if name in SAFE_ON_RESUME:
            allowed.append((field, old, new))
        elif (name in LENGTH_FIELDS and isinstance(old, int) and isinstance(new, int) and new > old
              and step <= decay_start(old // batch_size, decay_fraction)):
            allowed.append((field, old, new))
        else:
            refused.append((field, old, new))
    return allowed, refused


def describe_changes(changes: Sequence[Difference], step: int, total_steps: int, checkpoint: str) -> str:
    """The provenance note of one resume: what changed, from which step, and from which checkpoint."""
    listing = ", ".join(f"{field.rsplit(': ', 1)[-1]} {old!r} -> {new!r}" for field, old, new in changes)
    return (f"Resumed at step {step} of {total_steps} from {checkpoint} with {listing}; steps 1-{step} ran "
            "with the former values (training/resume.py lists the changes a resume may make).")


def _defaults(fields: set[str]) -> dict[str, Any]:
    """The current Recipe's defaults (as a JSON dump has them) of the named top-level fields that have one."""
    from dictionaries.recipe import Recipe

    out = {}
    for name in fields & set(Recipe.model_fields):
        field = Recipe.model_fields[name]
        if not field.is_required():
            value = field.get_default(call_default_factory=True)
            out[name] = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
    return out
