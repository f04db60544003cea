"""One training run's state: the dictionaries being trained (jobs) and the data path that feeds them.

A session is one model, one token stream, one harvester and one shuffling buffer holding every requested
hook's activations, plus one `Job` (recipe, trainer, sampler) per dictionary. Recipes trained together must
agree on everything the harvest shares (`SHARED_FIELDS`). Under torchrun each rank holds its own session
over its own slice of the stream; `setup_distributed` joins the group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import torch

from dictionaries.errors import RecipeError, SharedHarvestError
from dictionaries.hooks import resolve_device
from dictionaries.recipe import Recipe
from training.buffer import ActivationBuffer
from training.data import TokenStream, holdout_documents
from training.harvest import Harvester, harvest_chunks
from training.trainer import Trainer

# fields every dictionary of one pass shares: they fix the tokens, the batches and the step count
SHARED_FIELDS = ("model", "model_dtype", "dataset", "context_length", "prepend_bos", "exclude_bos", "buffer_contexts",
                 "harvest_batch_size", "batch_size", "tokens", "seed", "holdout_tokens")


@dataclass
class Job:
    """One dictionary being trained: its name, recipe, hook index in the harvest and trainer."""

    name: str
    recipe: Recipe
    hook_index: int
    trainer: Trainer  # dropped (None) by Session.release_trainers once the run's modules are finished
    sampler: torch.Generator  # draws resampling inputs from the buffer, independent of the batch order
    notes: list[str] = dataclass_field(default_factory=list)  # recipe changes made on resume (training/resume.py)
    target_index: int | None = None  # a transcoder's output hook in the harvest (its targets); None: an SAE


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
    held_out_documents: int = 0  # documents at the head of the shuffled order that training skips

    def release_optimizers(self) -> None:
        """Drop every trainer's gradients and Adam moments once the last step is taken (3 copies of each
        weight), so that `Trainer.finish`'s copies and the evaluation reuse that memory."""
        for job in self.jobs:
            job.trainer.optimizer.zero_grad(set_to_none=True)
            job.trainer.optimizer.state.clear()

    def release_trainers(self) -> None:
        """Drop every trainer (its module, gradients, Adam's two moments per weight, density history) once the
        finished modules are taken (`Trainer.finish` copies them), so the end-of-run evaluation and writing
        reuse that memory instead of adding to it (about 8 (F, d) float32 matrices a dictionary). No step
        or checkpoint can follow."""
        for job in self.jobs:
            job.trainer = None


def check_shared(recipes: list[Recipe]) -> None:
    """Raise SharedHarvestError naming the first field the recipes of one pass disagree on."""
    for field in SHARED_FIELDS:
        values = [getattr(r, field) for r in recipes]
        if any(v != values[0] for v in values[1:]):
            raise SharedHarvestError(field, [v.model_dump(mode="json") if hasattr(v, "model_dump") else v
                                             for v in values])


def setup_distributed(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the torchrun group (NCCL on GPUs, gloo on CPUs) when launched so."""
    dist = torch.distributed
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = resolve_device(device)  # one this machine has, or an error saying what it has
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank = dist.get_rank() if world > 1 else 0
    return rank, world, device


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def any_rank(flag: bool, world: int) -> bool:
    """True when `flag` is true on any rank (so that every rank stops at the same step)."""
    if world == 1:
        return flag
    t = torch.tensor([int(flag)])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def build_session(recipes: list[Recipe], names: list[str], model: Any, tokenizer: Any, *, out: Path,
                  rank: int, world: int, device: torch.device) -> Session:
    """Stream, harvester, buffer and one trainer per recipe; hook points are checked before any training."""
    r0 = recipes[0]
    # distinct hook points, in first-seen order; a transcoder's input and output rows come from the same
    # forward and share the buffer's row order, so row i of both is one token's (input, target) pair
    hooks = list(dict.fromkeys(h for r in recipes for h in (r.hook, r.output_hook) if h is not None))
    if r0.batch_size % world:
        raise RecipeError(["batch_size"], f"{r0.batch_size} does not divide over {world} ranks")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    harvester = Harvester(model, hooks, bos_id=bos, exclude_bos=r0.exclude_bos, device=device)
    held_out = holdout_documents(r0.dataset, tokenizer, context_length=r0.context_length,
                                 prepend_bos=r0.prepend_bos, seed=r0.seed, tokens=r0.holdout_tokens)
    stream = TokenStream(r0.dataset, tokenizer, context_length=r0.context_length, prepend_bos=r0.prepend_bos,
                         seed=r0.seed, rank=rank, world_size=world, skip_documents=held_out).open()
    buffer = ActivationBuffer(harvest_chunks(harvester, stream.next_contexts, r0.harvest_batch_size),
                              harvester.dims, r0.buffer_contexts * r0.context_length,
                              seed=r0.seed + 1_000_003 * rank, device=device)
    total_steps = r0.tokens // r0.batch_size
    jobs = []
    for name, recipe in zip(names, recipes):
        h = hooks.index(recipe.hook)
        t = hooks.index(recipe.output_hook) if recipe.output_hook is not None else None
        trainer = Trainer(recipe, harvester.dims[h], total_steps=total_steps, device=device,
                          d_out=harvester.dims[t] if t is not None else None)
        sampler = torch.Generator().manual_seed(recipe.seed + 7919 * (rank + 1))
        jobs.append(Job(name, recipe, h, trainer, sampler, target_index=t))
    return Session(jobs, stream, buffer, out, rank, world, r0.batch_size // world, total_steps,
                   held_out_documents=held_out)
