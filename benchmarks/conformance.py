"""The plumbing of the conformance benchmark (bench_conformance.py): data, starting weights, our side, the
peer's side as a child process, the comparison and its verdict.

Both sides start from the same weights and see the same batches; the peer runs benchmarks/peer_steps.py in its
own virtual environment (benchmarks/peers.py), exchanging safetensors files in a temporary folder. Our side is
training.trainer.Trainer in this process, with the starting weights set from outside on `trainer.module`
(the Trainer has no hook for given weights; before the first step Adam holds no state, so none needs resetting).
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from benchmarks.peer_steps import TopDraws, write_batches

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-9           # float64 on both sides: max |difference| relative to max(1, max |value|)
FLOAT32_TOLERANCE = 1e-6   # a tensor the peer keeps in float32 whatever the model's dtype (named in the spec),
                           # and the losses: our Trainer reports its metrics as float32 (trainer.py _metrics)


@dataclass
class Side:
    """One side's outcome: final weights in native layout, per-step losses, and notes."""

    weights: dict[str, torch.Tensor]
    losses: list[float]
    notes: dict = field(default_factory=dict)


# ---- data and starting weights ---------------------------------------------------------------------------
def make_batches(steps: int, batch: int, d_in: int, seed: int = 0) -> torch.Tensor:
    """(steps, batch, d_in) float64 activations: sparse non-negative mixtures of 2*d_in unit directions, an
    offset and noise, so that features have something to find.

    Each batch is then rescaled about its mean to the same total variance, batch * d_in: sparsify's loss is
    the fraction of variance unexplained (sum ||e||^2 / sum ||x - mean||^2, sparse_coder.py), which is then
    exactly the element-mean MSE; every other peer is indifferent to it.
    """
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(2 * d_in, d_in, generator=g, dtype=torch.float64)
    directions /= directions.norm(dim=-1, keepdim=True)
    offset = torch.randn(d_in, generator=g, dtype=torch.float64)
    active = torch.rand(steps, batch, 2 * d_in, generator=g, dtype=torch.float64) < 0.05
    sizes = torch.rand(steps, batch, 2 * d_in, generator=g, dtype=torch.float64) * 3
    x = (active * sizes) @ directions + offset + 0.05 * torch.randn(steps, batch, d_in, generator=g,
                                                                     dtype=torch.float64)
    mean = x.mean(1, keepdim=True)
    variance = (x - mean).pow(2).sum((1, 2), keepdim=True)
    return mean + (x - mean) * (batch * d_in / variance).sqrt()


def make_init(architecture: str, d_in: int, d_dict: int, *, dead: int = 0, dead_by: str = "bias",
              seed: int = 1) -> dict[str, torch.Tensor]:
    """Native starting weights: unit decoder rows, the encoder tied to them, zero biases.

    The first `dead` features are made dead so that dead-feature machinery (resampling, AuxK) has work:
    `bias` puts their encoder bias at -10 (they never fire), `small` scales their encoder columns by 0.02
    (their pre-activations stay non-zero but never make a top k).
    """
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_dict, d_in, generator=g, dtype=torch.float64)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    init = {"W_enc": W_dec.T.clone(), "b_enc": torch.zeros(d_dict, dtype=torch.float64), "W_dec": W_dec,
            "b_dec": torch.zeros(d_in, dtype=torch.float64)}
    if dead and dead_by == "bias":
        init["b_enc"][:dead] = -10.0
    elif dead:
        init["W_enc"][:, :dead] *= 0.02
    if architecture == "jumprelu":
        init["threshold"] = torch.full((d_dict,), 1e-3, dtype=torch.float64)
    if architecture == "gated":
        init["r_mag"] = torch.zeros(d_dict, dtype=torch.float64)
        init["b_mag"] = torch.zeros(d_dict, dtype=torch.float64)
    if architecture == "batchtopk":
        init["threshold"] = torch.zeros((), dtype=torch.float64)
    return init


# ---- our side ----------------------------------------------------------------------------------------------
def our_recipe(preset_name: str, overrides: dict, *, steps: int, batch: int, d_dict: int):
    """The recipe of our side: the preset, the run's shape, float64, then the comparison's overrides."""
    from training.presets import preset, validate_recipe

    fields = preset(preset_name, model="conformance", dataset="synthetic", tokens=steps * batch, batch_size=batch,
                    d_dict=d_dict, dtype="float64",
                    hook={"module": "layers.0", "site": "resid", "layer": 0}, **overrides)
    return validate_recipe(fields)


def run_ours(recipe, init: dict[str, torch.Tensor], batches: torch.Tensor, top_draws: bool = False) -> Side:
    """Train with training.trainer.Trainer from `init` on `batches`; b_dec after its first-batch init is kept
    (notes['b_dec0']) so that a peer can start from it, and so are the features each resampling replaced
    (notes['resampled']). `top_draws`: resampling draws the heaviest inputs (peer_steps.TopDraws)."""
    from training.trainer import Trainer

    steps, _, d_in = batches.shape
    trainer = Trainer(recipe, d_in, total_steps=steps)
    trainer.module.load_native_state({k: v.clone() for k, v in init.items()}, "conformance init")
    trainer.estimate_input_scale(batches[0])      # a no-op unless the recipe normalises inputs
    notes: dict = {"input_scale": trainer.input_scale}
    init_bias = getattr(trainer, "_initialise_decoder_bias", None)
    if init_bias is not None:                     # record, not change: the median the trainer sets at step 0
        def recording(x, *args, **kwargs):
            init_bias(x, *args, **kwargs)
            notes["b_dec0"] = trainer.module.b_dec.detach().clone()
        trainer._initialise_decoder_bias = recording
    _record_resampling(trainer, notes)
    with TopDraws() if top_draws else contextlib.nullcontext() as draws:
        losses = [trainer.step(batches[i])["loss"] for i in range(steps)]
    if top_draws and draws.weights:
        notes["draw_weights"] = draws.weights[0]
    weights = {k: v.detach().clone() for k, v in trainer.module.native_state().items()}
    if recipe.architecture == "batchtopk":        # the module's threshold is only set by finish()
        average = trainer.threshold_average
        weights["threshold"] = torch.tensor(float("nan") if average is None else float(average), dtype=torch.float64)
    notes.setdefault("b_dec0", init["b_dec"].clone())
    return Side(weights, losses, notes)


def _record_resampling(trainer, notes: dict) -> None:
    """Wrap the instance's `resample` to note which features it replaced (behaviour unchanged)."""
    resample = getattr(trainer, "resample", None)
    if resample is None:
        return

    def recording(dead, *args, **kwargs):
        notes.setdefault("resampled", []).append((trainer.step_count, dead.detach().cpu().clone()))
        return resample(dead, *args, **kwargs)
    trainer.resample = recording


# ---- the peer's side ------------------------------------------------------------------------------------
def run_peer(python: str, jobs: list[tuple[dict, dict, torch.Tensor]], timeout: int = 1800) -> list[Side | str]:
    """Run benchmarks/peer_steps.py once under the peer's interpreter for all `jobs` (job, init, batches),
    each in its own temporary folder; a Side per job, or the one-line reason it failed."""
    with tempfile.TemporaryDirectory(prefix="conformance-") as tmp:
        folders = [Path(tmp) / f"job{i}" for i in range(len(jobs))]
        for folder, (job, init, batches) in zip(folders, jobs):
            folder.mkdir()
            (folder / "job.json").write_text(json.dumps(job))
            save_file({k: v.contiguous() for k, v in init.items()}, str(folder / "init.safetensors"))
            write_batches(folder, batches)
        done = subprocess.run([python, str(ROOT / "benchmarks" / "peer_steps.py"), *map(str, folders)],
                              capture_output=True, text=True, timeout=timeout, cwd=tmp)
        crashed = [line for line in done.stderr.strip().splitlines() if line.strip()] or ["no output"]
        return [_read_result(folder, crashed[-1].strip()[:200] if done.returncode else "no result")
                for folder in folders]


def _read_result(folder: Path, fallback: str) -> Side | str:
    if (folder / "error.txt").exists():
        return (folder / "error.txt").read_text().strip()
    if not (folder / "result.safetensors").exists():
        return fallback
    tensors = load_file(str(folder / "result.safetensors"))
    notes = json.loads((folder / "result.json").read_text())["notes"]
    losses = tensors.pop("losses").tolist()
    for name in ("own_b_dec", "draw_weights"):
        if name in tensors:
            notes[name] = tensors.pop(name)
    return Side(tensors, losses, notes)


# ---- comparison and verdict -------------------------------------------------------------------------------
def differences(ours: Side, peer: Side) -> dict[str, float]:
    """max |ours - peer| per tensor both sides have, and `loss` over the steps both ran."""
    out = {}
    for name in ours.weights:
        if name in peer.weights:
            a, b = ours.weights[name].double(), peer.weights[name].double()
            out[name] = float("inf") if a.shape != b.shape else float((a - b).abs().max())
    n = min(len(ours.losses), len(peer.losses))
    pairs = zip(ours.losses[:n], peer.losses[:n])
    out["loss"] = max((abs(a - b) for a, b in pairs), default=float("nan")) if n else float("nan")
    return out


def scales(ours: Side) -> dict[str, float]:
    """max(1, max |value|) per tensor, and for `loss`: what each difference is measured against."""
    out = {name: max(1.0, float(t.double().abs().max())) for name, t in ours.weights.items() if t.numel()}
    out["loss"] = max([1.0] + [abs(v) for v in ours.losses if math.isfinite(v)])
    return out


def over_tolerance(diffs: dict[str, float], scale: dict[str, float], float32: tuple[str, ...] = ()) -> list[str]:
    """Names whose difference exceeds the tolerance (NaN counts as over)."""
    over = []
    for name, value in diffs.items():
        tolerance = FLOAT32_TOLERANCE if name in float32 or name == "loss" else TOLERANCE
        if not value <= tolerance * scale.get(name, 1.0):
            over.append(name)
    return over


def verdict(over: list[str], aligned: list[str], known: list[str]) -> str:
    """`equal`, `equal after: <alignments>`, `differs (<names>): <known reasons>`, or `differs, unexplained`.

    `aligned`: the transforms applied to make the sides comparable (a recipe option switched to the peer's
    behaviour, the peer's init replaced by ours, ...). `known`: differences kept on purpose in this row.
    """
    if not over:
        text = "equal after: " + "; ".join(aligned) if aligned else "equal"
        return text + (f" (expected to differ by {'; '.join(known)}, but did not here)" if known else "")
    where = ", ".join(over)
    if known:
        return f"differs ({where}): " + "; ".join(known)
    return f"differs, unexplained ({where})" + (" after: " + "; ".join(aligned) if aligned else "")


# ---- the rows ------------------------------------------------------------------------------------------
def rows_for(chosen: list, *, steps: int, batch: int, d_in: int, d_dict: int, common: dict) -> list[dict]:
    """Run our side of every comparison here, each peer's jobs in one child process, and make the rows.
    `common`: overrides of every preset for the run's shape (lr, warm-up), under each comparison's own."""
    from benchmarks import peers

    batches = make_batches(steps, batch, d_in)
    ours, pending = {}, {}
    for i, c in enumerate(chosen):
        recipe = our_recipe(c.preset, {**common, **c.ours}, steps=steps, batch=batch, d_dict=d_dict)
        init = make_init(recipe.architecture, d_in, d_dict, dead=c.dead, dead_by=c.dead_by)
        ours[i] = run_ours(recipe, init, batches, top_draws="resample" in c.job)
        pending.setdefault(c.peer, []).append((i, *_peer_job(c, init, batches, ours[i])))
    results, versions = {}, {}
    for peer, items in pending.items():
        python, why = peers.python_for(peer)
        if python is None:
            results.update({i: why for i, *_ in items})
            continue
        versions[peer] = peers.peer_version(python, peer)
        sides = run_peer(python, [(job, init, x) for _, job, init, x in items])
        results.update({i: side for (i, *_), side in zip(items, sides)})
    return [_row(c, ours[i], results[i], versions.get(c.peer, ""), steps) for i, c in enumerate(chosen)]


def _peer_job(c, init: dict, batches: torch.Tensor, ours: Side) -> tuple[dict, dict, torch.Tensor]:
    """The peer's job, starting weights (b_dec ours after its first-batch init when `given`) and batches."""
    job = dict(c.job)
    peer_init = {**init, "b_dec": ours.notes["b_dec0"]} if job.get("b_dec") == "given" else dict(init)
    if c.scaled_inputs:
        batches = batches * ours.notes["input_scale"]
    if job.get("sae", {}).get("normalize_activations") == "expected_average_only_in":
        job["scaling_factor"] = ours.notes["input_scale"]
    if "resample" in job:                      # the peer replaces the features ours replaced, after the same step
        step, dead = ours.notes["resampled"][0]
        job["resample"] = {**job["resample"], "after_step": step - 1, "dead": dead.tolist()}
    return job, peer_init, batches


def _row(c, ours: Side, peer: Side | str, version: str, steps: int) -> dict:
    row = {"preset": c.preset + (f" ({c.variant})" if c.variant else ""),
           "peer": f"{c.peer} {version}".strip(), "trainer": c.trainer, "steps": steps}
    if isinstance(peer, str):
        return {**row, "verdict": f"not run: {peer}"}
    diffs = differences(ours, peer)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        row[name] = diffs.pop(name, None)
    loss = diffs.pop("loss")
    row["other"] = ", ".join(f"{name} {value:.1e}" for name, value in diffs.items()) or None
    row["loss"] = loss
    all_diffs = {**{n: row[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec") if row[n] is not None},
                 **diffs, "loss": loss}
    row["verdict"] = verdict(over_tolerance(all_diffs, scales(ours), c.float32), list(c.aligned), list(c.known))
    row["notes"] = "; ".join(filter(None, (_notes(ours, peer), c.precision)))
    return row


def _notes(ours: Side, peer: Side) -> str:
    """What the peer would have done itself where we gave it ours (b_dec init, input scale, resampling draws)."""
    notes = []
    if "own_b_dec" in peer.notes:
        gap = float((peer.notes["own_b_dec"].double() - ours.notes["b_dec0"].double()).abs().max())
        notes.append(f"peer's own b_dec init is {gap:.1e} from ours")
    if "own_scaling_factor" in peer.notes:
        ratio = peer.notes["own_scaling_factor"] / ours.notes["input_scale"] - 1
        notes.append(f"peer's own input scale is ours x (1 {ratio:+.1e})")
    if "draw_weights" in peer.notes and "draw_weights" in ours.notes:
        mine, theirs = ours.notes["draw_weights"], peer.notes["draw_weights"].double() ** 2
        gap = float((mine / mine.sum() - theirs / theirs.sum()).abs().max() / (mine / mine.sum()).max())
        notes.append(f"resampling draw weights: ours = peer's squared to {gap:.0e}")
    return "; ".join(notes)
