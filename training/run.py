"""`train()`: the training loop of one or several dictionaries from one pass over a model.

One run = one session (training/session.py): one model, one token stream, one harvest per batch of contexts
and one shuffling buffer holding every requested hook's activations; each dictionary has its own `Trainer`
(training/trainer.py) and reads the rows of its hook, so a dictionary trained together with others sees
exactly the batches it would see alone. Checkpoints and resume are in training/checkpoint.py. Under
torchrun each rank reads its own slice of the stream into its own buffer and steps on batch_size /
world_size rows; the trainers all-reduce gradients so the modules stay equal; rank 0 writes the outputs.

At the end the trained modules are handed to evaluation in memory (training/evaluate.py) and each output
folder is written once, its card holding the recipe, the provenance and the measured stats.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from dictionaries.errors import (
    InvalidArgumentError,
    NonFiniteLossError,
    OutOfDataError,
    RecipeError,
    SharedHarvestError,
)
from dictionaries.files import write_atomic
from dictionaries.recipe import Recipe
from training.checkpoint import (
    CHECKPOINT_DIR,
    check_checkpoint,
    check_finite,
    latest_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from training.data import check_dataset
from training.session import (
    Job,
    Session,
    any_rank,
    barrier,
    build_session,
    check_shared,
    setup_distributed,
)


def default_name(recipe: Recipe) -> str:
    """`<model>/<site><layer>/<d_dict>` from the recipe, e.g. `pythia-70m-deduped/mlp3/8192`; a transcoder's ends
    in `-transcoder`, so that it and an SAE at the same site get different names."""
    model = Path(recipe.model.id.rstrip("/")).name.lower()
    layer = "" if recipe.hook.layer is None else str(recipe.hook.layer)
    variant = "-transcoder" if recipe.output_hook is not None else ""
    return f"{model}/{recipe.hook.site}{layer}/{recipe.d_dict}{variant}"


# ---- the loop -------------------------------------------------------------------------------------------
def _step_all(s: Session, rows: list[torch.Tensor], checkpoint: Path | None) -> list[dict[str, float]]:
    """One optimisation step of every dictionary on its hook's rows; a non-finite loss (taken before the
    update) or non-finite weights (after it: `weight_norm`) stop the run before anything is written."""
    results = []
    for job in s.jobs:
        def sample(n: int, job: Job = job) -> torch.Tensor:
            return s.buffer.sample(n, job.hook_index, job.sampler)

        if s.step == 0:  # the trainer's input scale comes from a sample before the first step
            job.trainer.estimate_input_scale(sample(min(s.buffer.unread, 8 * s.local_batch)))
        target = rows[job.target_index] if job.target_index is not None else None   # a transcoder's (B, d_out)
        started = time.perf_counter()
        metrics = job.trainer.step(rows[job.hook_index], sample, target=target)
        results.append({**metrics, "step_s": time.perf_counter() - started})  # host time (asynchronous on GPUs)
    bad = [i for i, m in enumerate(results) if not (math.isfinite(m["loss"]) and math.isfinite(m["weight_norm"]))]
    if any_rank(bool(bad), s.world):  # every rank stops together (a NaN reaches all through the gradients)
        i = bad[0] if bad else 0
        # the step as the curve file and the progress count it (1 = the first)
        raise NonFiniteLossError(s.jobs[i].name, s.step + 1, results[i], str(checkpoint) if checkpoint else None)
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
            started = time.perf_counter()
            rows = s.buffer.next_batch(s.local_batch)      # harvest (when half the buffer is read) + shuffle
            data_s = time.perf_counter() - started
            if any_rank(rows is None, s.world):
                _sync_log(log)
                checkpoint = save_checkpoint(s)
                raise OutOfDataError(s.stream.name, s.step * batch, s.total_steps * batch, str(checkpoint))
            metrics = s.last = _step_all(s, rows, checkpoint)
            s.step += 1
            bar.update(batch)
            if log is not None:
                _log(log, s, metrics, batch, data_s)
            if s.step % 10 == 0 or s.step == s.total_steps:
                m = metrics[0]
                bar.set_postfix(mse=f"{m['mse']:.3g}", l0=f"{m['l0']:.1f}", dead=f"{m['dead_frac']:.2f}",
                                refresh=False)
            if s.step % checkpoint_every == 0 and s.step < s.total_steps:
                _sync_log(log)  # the curve up to the checkpoint survives a kill -9 (resume appends after it)
                checkpoint = save_checkpoint(s)
    finally:
        bar.close()
        if log is not None:
            log.close()


def _sync_log(log: Any) -> None:
    """Flush and fsync the curve file: every line up to a checkpoint is on disk before the checkpoint is."""
    if log is not None:
        log.flush()
        os.fsync(log.fileno())


def _trim_log(path: Path, step: int) -> None:
    """Drop curve lines past `step` (written by a killed run after its last checkpoint) before resuming, and
    a line a kill cut short (Python's buffer reaches the file in blocks, not in lines)."""
    def kept(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False

    write_atomic(path, "".join(line + "\n" for line in path.read_text().splitlines() if line and kept(line)))


def _log(log: Any, s: Session, metrics: list[dict[str, float]], batch: int, data_s: float) -> None:
    """One JSON line per dictionary and step: the curves, with where the step's time went: `data_s` the wait
    for the batch (harvest and buffer, shared by the step's dictionaries), `step_s` this dictionary's
    optimisation step."""
    now = time.time()
    for job, m in zip(s.jobs, metrics):
        log.write(json.dumps({"step": s.step, "tokens": s.step * batch, "dictionary": job.name, "time": now,
                              "data_s": data_s, **m}) + "\n")


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


def make_card(job: Job, module: Any, *, seconds: float, tokens: int, metrics: dict[str, float] | None,
              startup: float | None = None) -> Any:
    """The card of a trained dictionary: the exact recipe, provenance and a summary of the run (the training
    loop's wall time `seconds`, and the start-up before it: model, data, buffer and trainers set up)."""
    import datetime

    from dictionaries.card import Card, Files, Provenance

    r = job.trainer.recipe  # resolved: d_in-dependent values (aux_k half_d_in) as trained
    before = "" if startup is None else f" after a start-up of {startup:.1f} s"
    notes = [f"Trained by training/run.py on {tokens:,} tokens in {seconds:.1f} s{before} "
             f"({tokens / max(seconds, 1e-9):,.0f} tokens/s, {job.trainer.total_steps} steps).", *job.notes]
    if metrics:
        shown = [f"{k} {metrics[k]:.4g}" for k in ("loss", "mse", "l0", "dead_frac") if k in metrics]
        notes.append("Last training step: " + ", ".join(shown) + ".")
    if module.d_dict != r.d_dict:
        notes.append(f"{r.d_dict - module.d_dict} features with decoder norm below {r.prune_below} were pruned.")
    return Card(name=job.name, architecture=r.architecture, d_in=module.d_in, d_dict=module.d_dict,
                k=getattr(module, "k", None), pre_encoder_bias=r.pre_encoder_bias, dtype=r.dtype,
                model=r.model, hook=r.hook, files=Files(items=[]), recipe=r,
                skip=r.skip, output_hook=r.output_hook,
                d_out=module.d_out if module.d_out != module.d_in else None,
                provenance=Provenance(date=datetime.date.today().isoformat(), code=_code_version(), notes=notes))


def write_outputs(s: Session, model: Any, tokenizer: Any, *, seconds: float, eval_tokens: int,
                  progress: bool, startup: float | None = None) -> list[Path]:
    """One native folder per dictionary under `<out>/<name>/`, written once by rank 0; returns the folders.

    The trained modules (their cards attached) go to `evaluate` in memory first, so each folder is written
    with its measured stats, density and plots; `eval_tokens` 0 writes the cards without stats.
    """
    from dictionaries.formats import write_native
    from training.evaluate import evaluate, write_evaluated

    tokens = s.total_steps * s.local_batch * s.world
    folders = [s.out / job.name for job in s.jobs]
    modules = []
    s.release_optimizers()
    for i, job in enumerate(s.jobs):
        module = job.trainer.finish()
        module.card = make_card(job, module, seconds=seconds, tokens=tokens, metrics=s.last[i] if s.last else None,
                                startup=startup)
        modules.append(module)
    check_finite(s, modules, latest_checkpoint(s.out))  # finish() rescales: check what would be written
    s.release_trainers()
    if s.rank != 0:
        return folders
    if eval_tokens <= 0:
        for module, folder in zip(modules, folders):
            write_native(module, folder, card=module.card)
        return folders
    r = s.jobs[0].recipe
    held_out = (f"the first {s.held_out_documents} documents of the seeded order (holdout_tokens "
                f"{r.holdout_tokens}), which training skipped")
    started = time.perf_counter()
    results = evaluate(model, modules, r.dataset, tokenizer=tokenizer, tokens=eval_tokens,
                       context_length=r.context_length, device=next(model.parameters()).device,
                       exclude_bos=r.exclude_bos, seed=r.seed, prepend_bos=r.prepend_bos, held_out=held_out,
                       progress=progress)
    evaluated = f"End-of-run evaluation on {eval_tokens:,} held-out tokens: {time.perf_counter() - started:.1f} s."
    for module, folder, result in zip(modules, folders, results):
        write_evaluated(folder, _noted(module, evaluated), result)
    return folders


def _noted(module: Any, note: str) -> Any:
    """The module with `note` appended to its card's provenance notes (cards are frozen: a copy)."""
    provenance = module.card.provenance
    module.card = module.card.model_copy(update={"provenance": provenance.model_copy(
        update={"notes": [*provenance.notes, note]})})
    return module


def train(recipes: list[Recipe] | Recipe, *, out: str | Path, device: str | None = None, resume: bool = False,
          checkpoint_every: int = 1000, log_file: str | Path | None = None, progress: bool = True,
          names: list[str] | None = None, model: Any = None, tokenizer: Any = None,
          eval_tokens: int | None = None, device_map: Any = None) -> list[Path]:
    """Train every recipe's dictionary from one pass over their shared model and data.

    Each output is then evaluated on `eval_tokens` tokens (default: all of the recipe's `holdout_tokens`, the
    head of the stream training skipped; 0 skips evaluation), so its card holds measured, held-out stats.
    Returns the native folders written (`<out>/<name>/`). `model`/`tokenizer` may be given as objects
    (in-process models); otherwise they load from the recipe's model id (a Hub id or a local folder).
    `resume=True` continues from `<out>/checkpoint` when there is one. The model is loaded in the recipe's
    `model_dtype` (a model object must already be in it) and placed by `device_map` when one is given
    (placement.parse_device_map; the dictionaries train on `device`).
    """
    called = time.time()
    recipes = [recipes] if isinstance(recipes, Recipe) else list(recipes)
    names = list(names) if names is not None else [default_name(r) for r in recipes]
    if len(set(names)) != len(names):
        raise SharedHarvestError("names", names)
    check_shared(recipes)
    eval_tokens = recipes[0].holdout_tokens if eval_tokens is None else eval_tokens
    if eval_tokens > recipes[0].holdout_tokens:
        raise RecipeError(["holdout_tokens"], f"the run holds out {recipes[0].holdout_tokens} tokens, fewer than "
                          f"the {eval_tokens} it would evaluate on: raise holdout_tokens or lower eval_tokens")
    if checkpoint_every < 1:
        raise InvalidArgumentError("checkpoint_every", checkpoint_every, "write a checkpoint every N >= 1 steps")
    check_dataset(recipes[0].dataset)  # bad input is said before the model loads
    out = Path(out)
    folder = latest_checkpoint(out) if resume else None
    if folder is not None:
        check_checkpoint(folder)
    joined = torch.distributed.is_available() and not torch.distributed.is_initialized()
    rank, world, dev = setup_distributed(device)
    if model is None or tokenizer is None:
        from dictionaries.hooks import load_model

        loaded = load_model(recipes[0].model.id, revision=recipes[0].model.revision, device=dev, tokenizer=tokenizer,
                            dtype=recipes[0].model_dtype, device_map=device_map)
        model = loaded[0] if model is None else model
        tokenizer = loaded[1]
    check_model_dtype(model, recipes[0])
    session = build_session(recipes, names, model, tokenizer, out=out, rank=rank, world=world, device=dev)
    if folder is not None:
        restore_checkpoint(session, folder)
    started = time.time()
    run_loop(session, checkpoint_every=checkpoint_every, log_file=Path(log_file) if log_file else None,
             progress=progress)
    paths = write_outputs(session, model, tokenizer, seconds=time.time() - started, eval_tokens=eval_tokens,
                          progress=progress, startup=started - called)
    barrier(world)
    if rank == 0:  # the run is complete: its checkpoint is no longer needed
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    if world > 1 and joined:  # leave the process group as we found it
        torch.distributed.destroy_process_group()
    return paths


def check_model_dtype(model: Any, recipe: Recipe) -> None:
    """RecipeError when a model object given to `train` runs in another dtype than the recipe's `model_dtype`
    (the card would record a precision its activations did not have)."""
    from dictionaries.hooks import torch_model

    found = next(torch_model(model).parameters()).dtype
    if found != getattr(torch, recipe.model_dtype):
        raise RecipeError(["model_dtype"], f"the model given runs in {str(found).removeprefix('torch.')}, the recipe "
                                           f"says {recipe.model_dtype}: set model_dtype or cast the model")
