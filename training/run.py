"""`train()`: the training loop of one or several dictionaries from one pass over a model.

One run = one model, one token stream, one harvest per batch of contexts and one shuffling buffer holding
every requested hook's activations; each dictionary has its own `Trainer` (training/trainer.py) and reads
the rows of its hook. Recipes trained together must agree on everything the harvest shares
(`SHARED_FIELDS`); a dictionary trained together with others sees exactly the batches it would see alone.

Checkpoints (`<out>/checkpoint/step-<S>/`, the current one named in `<out>/checkpoint/latest`, both
switched atomically with os.replace): `trainers.pt` (recipes, names, every trainer's state, the samplers'
generators, the step) written by rank 0, and `rank<r>.pt` (stream position, buffer state, torch RNG) by each
rank. A resumed run reads the same batches and ends with the same weights as an uninterrupted one
(bit-identical on the CPU). Under torchrun each rank reads its own slice of the stream into its own buffer
and steps on batch_size / world_size rows; the trainers all-reduce gradients so the modules stay equal;
rank 0 writes the outputs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dictionaries.card import Recipe
from dictionaries.errors import NonFiniteLossError, OutOfDataError, RecipeError, RecipeMismatchError, SharedHarvestError
from training.buffer import ActivationBuffer
from training.data import TokenStream
from training.harvest import Harvester, harvest_chunks
from training.trainer import Trainer

# fields every dictionary of one pass shares: they fix the tokens, the batches and the step count
SHARED_FIELDS = ("model", "dataset", "context_length", "prepend_bos", "exclude_bos", "buffer_contexts",
                 "harvest_batch_size", "batch_size", "tokens", "seed")
CHECKPOINT_DIR = "checkpoint"


@dataclass
class Job:
    """One dictionary being trained: its name, recipe, hook index in the harvest and trainer."""

    name: str
    recipe: Recipe
    hook: int
    trainer: Trainer
    sampler: torch.Generator  # draws resampling inputs from the buffer, independent of the batch order


@dataclass
class Session:
    """Everything one run holds: the jobs, the data path and where this process sits among the ranks."""

    jobs: list[Job]
    stream: TokenStream
    buffer: ActivationBuffer
    out: Path
    rank: int
    world: int
    local_batch: int
    total_steps: int
    step: int = 0
    last: list[dict[str, float]] | None = None  # the last step's metrics per dictionary


def check_shared(recipes: list[Recipe]) -> None:
    """Raise SharedHarvestError naming the first field the recipes of one pass disagree on."""
    for field in SHARED_FIELDS:
        values = [getattr(r, field) for r in recipes]
        if any(v != values[0] for v in values[1:]):
            raise SharedHarvestError(field, [v.model_dump(mode="json") if hasattr(v, "model_dump") else v
                                             for v in values])


def default_name(recipe: Recipe) -> str:
    """`<model>/<site><layer>/<d_dict>` from the recipe, e.g. `pythia-70m-deduped/mlp3/8192`."""
    model = Path(recipe.model.id.rstrip("/")).name.lower()
    layer = "" if recipe.hook.layer is None else str(recipe.hook.layer)
    return f"{model}/{recipe.hook.site}{layer}/{recipe.d_dict}"


def load_model(recipe: Recipe, device: torch.device) -> tuple[Any, Any]:
    """The recipe's model (Hub id or local folder, at its revision) in eval mode, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = recipe.model
    tokenizer = AutoTokenizer.from_pretrained(ref.id, revision=ref.revision)
    model = AutoModelForCausalLM.from_pretrained(ref.id, revision=ref.revision).eval().to(device)
    return model, tokenizer


def setup_distributed(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the torchrun group (NCCL on GPUs, gloo on CPUs) when launched so."""
    dist = torch.distributed
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank = dist.get_rank() if world > 1 else 0
    return rank, world, device


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _any_rank(flag: bool, world: int) -> bool:
    """True when `flag` is true on any rank (so that every rank stops at the same step)."""
    if world == 1:
        return flag
    t = torch.tensor([int(flag)])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


# ---- building a session ---------------------------------------------------------------------------------
def build_session(recipes: list[Recipe], names: list[str], model: Any, tokenizer: Any, *, out: Path,
                  rank: int, world: int, device: torch.device) -> Session:
    """Stream, harvester, buffer and one trainer per recipe; hook points are checked before any training."""
    r0 = recipes[0]
    hooks = list(dict.fromkeys(r.hook for r in recipes))  # distinct hook points, in first-seen order
    if r0.batch_size % world:
        raise RecipeError(["batch_size"], f"{r0.batch_size} does not divide over {world} ranks")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    harvester = Harvester(model, hooks, bos_id=bos, exclude_bos=r0.exclude_bos, device=device)
    stream = TokenStream(r0.dataset, tokenizer, context_length=r0.context_length, prepend_bos=r0.prepend_bos,
                         seed=r0.seed, rank=rank, world_size=world).open()
    buffer = ActivationBuffer(harvest_chunks(harvester, stream.next_contexts, r0.harvest_batch_size),
                              harvester.dims, r0.buffer_contexts * r0.context_length,
                              seed=r0.seed + 1_000_003 * rank, device=device)
    total_steps = r0.tokens // r0.batch_size
    jobs = []
    for name, recipe in zip(names, recipes):
        h = hooks.index(recipe.hook)
        trainer = Trainer(recipe, harvester.dims[h], total_steps=total_steps, device=device)
        sampler = torch.Generator().manual_seed(recipe.seed + 7919 * (rank + 1))
        jobs.append(Job(name, recipe, h, trainer, sampler))
    return Session(jobs, stream, buffer, out, rank, world, r0.batch_size // world, total_steps)


# ---- checkpoints ----------------------------------------------------------------------------------------
def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(s: Session) -> Path:
    """Write step-<S>/ under a temporary name, switch `latest` to it, drop older ones; returns its path."""
    root = s.out / CHECKPOINT_DIR
    final = root / f"step-{s.step}"
    tmp = root / f"step-{s.step}.tmp"
    if s.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(s.world)
    torch.save({"stream": s.stream.state_dict(), "buffer": s.buffer.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / f"rank{s.rank}.pt")
    if s.rank == 0:
        torch.save({"step": s.step, "world": s.world, "names": [j.name for j in s.jobs],
                    "recipes": [j.recipe.model_dump(mode="json") for j in s.jobs],
                    "trainers": [j.trainer.state_dict() for j in s.jobs],
                    "samplers": [j.sampler.get_state() for j in s.jobs]}, tmp / "trainers.pt")
    _barrier(s.world)
    if s.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write_text(root / "latest", final.name)
        for old in root.glob("step-*"):
            if old.name != final.name:
                shutil.rmtree(old, ignore_errors=True)
    _barrier(s.world)
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


def restore_checkpoint(s: Session, folder: Path) -> None:
    """Load a checkpoint into a fresh session; refuses one of other recipes, names or world size."""
    saved = torch.load(folder / "trainers.pt", weights_only=True)
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
    mine = torch.load(folder / f"rank{s.rank}.pt", weights_only=True)
    for job, state, gen in zip(s.jobs, saved["trainers"], saved["samplers"]):
        job.trainer.load_state_dict(state)
        job.sampler.set_state(gen)
    s.stream.load_state_dict(mine["stream"])
    s.buffer.load_state_dict(mine["buffer"])
    torch.set_rng_state(mine["torch_rng"])
    s.step = int(saved["step"])


# ---- the loop -------------------------------------------------------------------------------------------
def _step_all(s: Session, rows: list[torch.Tensor], checkpoint: Path | None) -> list[dict[str, float]]:
    """One optimisation step of every dictionary on its hook's rows; a non-finite loss stops the run."""
    results = []
    for job in s.jobs:
        def sample(n: int, job: Job = job) -> torch.Tensor:
            return s.buffer.sample(n, job.hook, job.sampler)

        if s.step == 0:  # the trainer's input scale comes from a sample before the first step
            job.trainer.estimate_input_scale(sample(min(s.buffer.unread, 8 * s.local_batch)))
        results.append(job.trainer.step(rows[job.hook], sample))
    bad = [i for i, m in enumerate(results) if not math.isfinite(m["loss"])]
    if _any_rank(bool(bad), s.world):  # every rank stops together (a NaN reaches all through the gradients)
        i = bad[0] if bad else 0
        raise NonFiniteLossError(s.jobs[i].name, s.step, results[i], str(checkpoint) if checkpoint else None)
    return results


def run_loop(s: Session, *, checkpoint_every: int, log_file: Path | None, progress: bool) -> None:
    """Step until the token budget is spent, checkpointing every `checkpoint_every` steps."""
    from tqdm import tqdm

    batch = s.local_batch * s.world
    bar = tqdm(total=s.total_steps * batch, initial=s.step * batch, unit="tok", unit_scale=True, smoothing=0.1,
               disable=not progress or s.rank != 0, desc=f"training {len(s.jobs)} dictionar"
                                                         f"{'y' if len(s.jobs) == 1 else 'ies'}")
    if log_file is not None and s.rank == 0 and log_file.exists():
        _trim_log(log_file, s.step)
    log = open(log_file, "a") if log_file is not None and s.rank == 0 else None
    checkpoint = latest_checkpoint(s.out)
    try:
        while s.step < s.total_steps:
            rows = s.buffer.next_batch(s.local_batch)
            if _any_rank(rows is None, s.world):
                checkpoint = save_checkpoint(s)
                raise OutOfDataError(s.stream.name, s.step * batch, s.total_steps * batch, str(checkpoint))
            metrics = s.last = _step_all(s, rows, checkpoint)
            s.step += 1
            bar.update(batch)
            if log is not None:
                _log(log, s, metrics, batch)
            if s.step % 10 == 0 or s.step == s.total_steps:
                m = metrics[0]
                bar.set_postfix(mse=f"{m['mse']:.3g}", l0=f"{m['l0']:.1f}", dead=f"{m['dead_frac']:.2f}",
                                refresh=False)
            if s.step % checkpoint_every == 0 and s.step < s.total_steps:
                checkpoint = save_checkpoint(s)
    finally:
        bar.close()
        if log is not None:
            log.close()


def _trim_log(path: Path, step: int) -> None:
    """Drop curve lines past `step` (written by a killed run after its last checkpoint) before resuming."""
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    _atomic_write_text(path, "".join(line + "\n" for line in lines))


def _log(log: Any, s: Session, metrics: list[dict[str, float]], batch: int) -> None:
    """One JSON line per dictionary and step: the curves."""
    now = time.time()
    for job, m in zip(s.jobs, metrics):
        log.write(json.dumps({"step": s.step, "tokens": s.step * batch, "dictionary": job.name, "time": now, **m})
                  + "\n")


# ---- outputs -------------------------------------------------------------------------------------------
def _code_version() -> str:
    """`dictionaries <version>`, plus the git commit of the checkout when there is one."""
    import subprocess

    from dictionaries import __version__

    text = f"dictionaries {__version__}"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, timeout=5,
                                capture_output=True, text=True, check=True).stdout.strip()
        return f"{text} (git {commit})"
    except (OSError, subprocess.SubprocessError):
        return text


def make_card(job: Job, module: Any, *, seconds: float, tokens: int, metrics: dict[str, float] | None) -> Any:
    """The card of a trained dictionary: the exact recipe, provenance and a summary of the run."""
    import datetime

    from dictionaries.card import Card, Files, Provenance

    r = job.recipe
    notes = [f"Trained by training/run.py on {tokens:,} tokens in {seconds:.0f} s "
             f"({tokens / max(seconds, 1e-9):,.0f} tokens/s, {job.trainer.total_steps} steps)."]
    if metrics:
        notes.append("Last training step: " + ", ".join(f"{k} {metrics[k]:.4g}" for k in ("loss", "mse", "l0", "dead_frac")
                                                        if k in metrics) + ".")
    if module.d_dict != r.d_dict:
        notes.append(f"{r.d_dict - module.d_dict} features with decoder norm below {r.prune_below} were pruned.")
    return Card(name=job.name, architecture=r.architecture, d_in=module.d_in, d_dict=module.d_dict,
                k=getattr(module, "k", None), pre_encoder_bias=r.pre_encoder_bias, dtype=r.dtype,
                model=r.model, hook=r.hook, files=Files(items=[]), recipe=r,
                provenance=Provenance(date=datetime.date.today().isoformat(), code=_code_version(), notes=notes))


def write_outputs(s: Session, *, seconds: float) -> list[Path]:
    """One native folder per dictionary under `<out>/<name>/` (written by rank 0); returns the folders."""
    from dictionaries.formats import write_native

    tokens = s.total_steps * s.local_batch * s.world
    paths = []
    for i, job in enumerate(s.jobs):
        module = job.trainer.finish()
        folder = s.out / job.name
        paths.append(folder)
        if s.rank == 0:
            card = make_card(job, module, seconds=seconds, tokens=tokens, metrics=s.last[i] if s.last else None)
            write_native(module, folder, card=card)
    return paths


def evaluate_outputs(s: Session, folders: list[Path], model: Any, tokenizer: Any, tokens: int,
                     progress: bool) -> None:
    """Measure the fresh dictionaries' stats with the eval of `dictctl eval` and write them into their cards.

    Runs on rank 0 with the in-process model, on the first contexts of the recipe's dataset (the same
    stream as training: say so when quoting these stats; `dictctl eval --dataset` measures on another set).
    """
    from training.evaluate import evaluate_and_write

    if s.rank != 0 or tokens <= 0:
        return
    recipe = s.jobs[0].recipe
    evaluate_and_write([str(f) for f in folders], model=model, tokenizer=tokenizer, dataset=recipe.dataset.path,
                       tokens=tokens, context_length=recipe.context_length, device=next(model.parameters()).device,
                       exclude_bos=recipe.exclude_bos, seed=recipe.seed, progress=progress)


def train(recipes: list[Recipe] | Recipe, *, out: str | Path, device: str | None = None, resume: bool = False,
          checkpoint_every: int = 1000, log_file: str | Path | None = None, progress: bool = True,
          names: list[str] | None = None, model: Any = None, tokenizer: Any = None,
          eval_tokens: int = 16384) -> list[Path]:
    """Train every recipe's dictionary from one pass over their shared model and data.

    Each output is then evaluated on `eval_tokens` tokens (0 skips it), so its card holds measured stats.
    Returns the native folders written (`<out>/<name>/`). `model`/`tokenizer` may be given as objects
    (in-process models); otherwise they load from the recipe's model id (a Hub id or a local folder).
    `resume=True` continues from `<out>/checkpoint` when there is one.
    """
    recipes = [recipes] if isinstance(recipes, Recipe) else list(recipes)
    names = list(names) if names is not None else [default_name(r) for r in recipes]
    if len(set(names)) != len(names):
        raise SharedHarvestError("names", names)
    check_shared(recipes)
    joined = torch.distributed.is_available() and not torch.distributed.is_initialized()
    rank, world, dev = setup_distributed(device)
    if model is None or tokenizer is None:
        loaded = load_model(recipes[0], dev)
        model = loaded[0] if model is None else model
        tokenizer = loaded[1] if tokenizer is None else tokenizer
    out = Path(out)
    session = build_session(recipes, names, model, tokenizer, out=out, rank=rank, world=world, device=dev)
    folder = latest_checkpoint(out) if resume else None
    if folder is not None:
        restore_checkpoint(session, folder)
    started = time.time()
    run_loop(session, checkpoint_every=checkpoint_every, log_file=Path(log_file) if log_file else None,
             progress=progress)
    paths = write_outputs(session, seconds=time.time() - started)
    evaluate_outputs(session, paths, model, tokenizer, eval_tokens, progress)
    _barrier(world)
    if rank == 0:  # the run is complete: its checkpoint is no longer needed
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    if world > 1 and joined:  # leave the process group as we found it
        torch.distributed.destroy_process_group()
    return paths


def train_entries(pattern: str | None, *, overrides: dict[str, Any] | None = None, recipe_file: str | Path | None = None,
                  out: str | Path = "trained", **kwargs: Any) -> list[Path]:
    """Train registry entries matching a name or glob from one pass, their card recipes overridden.

    `recipe_file` is a YAML mapping of recipe fields: overrides applied to each entry's recipe, or, without
    `pattern`, a complete recipe. `overrides` (dotted keys allowed: `model.id`, `penalty.coefficient`) apply
    last. Other keyword arguments go to `train`.
    """
    import yaml

    from dictionaries.registry import load_registry
    from training.recipe import recipe_for, validate_recipe

    fields = (yaml.safe_load(Path(recipe_file).read_text()) or {}) if recipe_file else {}
    if not isinstance(fields, dict):
        raise RecipeError(["<recipe file>"], f"{recipe_file} must hold a mapping of recipe fields")
    update = {**fields, **(overrides or {})}
    if pattern is None:  # a complete recipe: its preset's fields, then the file's, then the overrides
        from training.recipe import preset

        if "preset" not in update:
            raise RecipeError(["preset"], f"{recipe_file} names no entry, so it must be a whole recipe with `preset`")
        rest = {k: v for k, v in update.items() if k != "preset"}
        return train(validate_recipe(preset(update["preset"], **rest)), out=out, **kwargs)
    entries = load_registry().match(pattern)
    return train([recipe_for(e.card, update) for e in entries], names=[e.name for e in entries], out=out, **kwargs)
