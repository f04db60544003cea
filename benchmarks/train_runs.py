"""The runs behind `benchmarks train`: one training run (ours or a peer's) per child process, timed by phase.

Each run is one child process so that its peak memory is its own; it prints one JSON line. Every run reports
the same phases, read from the run's own step boundaries:
- `startup_s`: from the call of the library's training entry point to its first step's batch request (model
  hooks, data, buffer, trainers);
- `steady_tokens_per_s`: tokens of the steps after `warmup` over the time between their boundaries, which
  holds harvest, buffer and optimisation alike (at least 64 steps by default);
- `end_s`: after the last step until the call returns (ours: the held-out evaluation and writing; peers:
  saving);
- `seconds`: the whole call.
Ours reads its boundaries from its own curve file (`log_file`: each line's `time`, `data_s`, `step_s`) and its
start-up and evaluation from the card's provenance notes; the peers' boundaries are stamped from outside
their loops (dictionary_learning: a generator around its ActivationBuffer; SAELens: its trainer's `step`;
sparsify: a forward pre-hook on the model), without changing what they compute.

Model: Pythia-70m's exact config with random weights (same cost as the real model); text: Python's own
docs, tokenised by the toy tokenizer, packed to CONTEXT-token contexts.
"""

from __future__ import annotations

import json
import re
import resource
import threading
import time
from pathlib import Path

D_MODEL, N_LAYERS, CONTEXT = 512, 6, 128


class PeakSampler:
    """ru_maxrss (MiB) sampled every 50 ms in a thread, so peaks can be read per phase afterwards."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append((time.time(), peak_mb()))

    def peak_before(self, t: float) -> float:
        """The peak reached by time t (the last sample before it)."""
        before = [mb for at, mb in self.samples if at <= t]
        return before[-1] if before else 0.0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """CPU time of this process (user + system): on a shared machine, wall time alone hides contention."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def steady(stamps: list[float], warmup: int, batch: int) -> tuple[float, int]:
    """(tokens/s, steps) between step boundary `warmup` and the last one."""
    steps = len(stamps) - 1 - warmup
    if steps < 1:
        return float("nan"), 0
    return steps * batch / (stamps[-1] - stamps[warmup]), steps


def phases(called: float, stamps: list[float], returned: float, warmup: int, batch: int, tokens: int) -> dict:
    """Start-up, steady rate and end phase from step-start stamps (stamps[i]: step i's batch requested)."""
    rate, steps = steady(stamps, warmup, batch)
    return {"tokens": tokens, "seconds": returned - called, "startup_s": stamps[0] - called,
            "train_s": stamps[-1] - stamps[0], "steady_tokens_per_s": rate, "steady_steps": steps,
            "end_s": returned - stamps[-1]}


def corpus_documents() -> list[str]:
    from training.toymodel import corpus_documents as documents

    return documents()


# ---- ours ----------------------------------------------------------------------------------------------
PRECISIONS = {"fp32": {}, "bf16": {"model_dtype": "bfloat16", "autocast": "bfloat16"}}
"""A run's precision: fp32, or bf16 = the model's harvest forward and the dictionary's forward in bf16 (the
dictionary's weights and Adam stay fp32)."""


def ours_recipes(kind: str, steps: int, batch: int, d_dict: int, warmup: int, folder: Path, eval_tokens: int,
                 precision: str = "fp32") -> list:
    """`l1` (marks2023 at mlp3), `topk` (k=32 at mlp3) or `twelve` (marks2023 at mlp and resid of every layer),
    at a precision of PRECISIONS."""
    from dictionaries.recipe import Recipe
    from training.presets import preset

    corpus = folder / "corpus.txt"
    corpus.write_text("\n\n".join(corpus_documents()))
    layers = range(N_LAYERS) if kind == "twelve" else [3]
    hooks = [{"module": f"gpt_neox.layers.{layer}{part}", "site": site, "layer": layer}
             for layer in layers for part, site in ((".mlp", "mlp"), ("", "resid"))
             if kind == "twelve" or site == "mlp"]
    name, extra = ("topk", {"k": 32}) if kind == "topk" else ("marks2023", {})
    lr = 2e-4 if kind == "topk" else 1e-3
    return [Recipe.model_validate(preset(
        name, model={"id": "pythia70m-random"}, hook=h, dataset={"path": str(corpus)}, context_length=CONTEXT,
        tokens=steps * batch, batch_size=batch, buffer_contexts=2 * batch // CONTEXT,
        harvest_batch_size=batch // CONTEXT, d_dict=d_dict, holdout_tokens=max(eval_tokens, CONTEXT),
        optimizer={"lr": lr, "warmup_steps": warmup}, **extra, **PRECISIONS[precision]))
        for h in hooks]


def _notes_seconds(folder: Path) -> tuple[float, float, float]:
    """(start-up, training loop, evaluation) seconds from a written card's provenance notes."""
    notes = " ".join(json.loads((folder / "card.json").read_text())["provenance"]["notes"])
    loop = re.search(r"tokens in ([\d.]+) s after a start-up of ([\d.]+) s", notes)
    evaluated = re.search(r"evaluation on [\d,]+ held-out tokens: ([\d.]+) s", notes)
    return float(loop.group(2)), float(loop.group(1)), float(evaluated.group(1)) if evaluated else 0.0


def ours_child(kind: str, steps: int, batch: int, d_dict: int, warmup: int, eval_tokens: int, device: str,
               folder: Path, precision: str = "fp32") -> dict:
    """training.run.train on the recipes of `kind` at `precision`; phases from its curve file and card notes."""
    import torch

    from training import run
    from training.toymodel import build_model, build_tokenizer, pythia70m_config

    recipes = ours_recipes(kind, steps, batch, d_dict, warmup, folder, eval_tokens, precision)
    # train() checks a model object against the recipe's model_dtype: build it in that dtype
    model = build_model(pythia70m_config()).to(device, getattr(torch, recipes[0].model_dtype))
    sampler, log = PeakSampler(), folder / "curve.jsonl"
    called, cpu = time.time(), cpu_seconds()
    paths = run.train(recipes, out=folder / "out", device=device, model=model, tokenizer=build_tokenizer(),
                      progress=False, checkpoint_every=10**9, log_file=log, eval_tokens=eval_tokens)
    returned, cpu = time.time(), cpu_seconds() - cpu
    sampler.stop()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    first = [line for line in lines if line["dictionary"] == lines[0]["dictionary"]]  # one line per step
    stamps = [line["time"] for line in first]                       # step ends
    rate, counted = steady(stamps, warmup, batch)
    startup, loop, evaluated = _notes_seconds(paths[0])
    # stamps[warmup] ends step warmup + 1: the steady interval holds steps warmup + 2 .. the last
    steady_lines = [line for line in lines if line["step"] > warmup + 1]
    step_s = sum(line["step_s"] for line in steady_lines) / max(counted, 1)          # all dictionaries, per step
    data_s = sum(line["data_s"] for line in first if line["step"] > warmup + 1) / max(counted, 1)
    return {"tokens": steps * batch, "seconds": returned - called, "startup_s": startup, "train_s": loop,
            "end_s": returned - called - startup - loop, "eval_s": evaluated, "steady_tokens_per_s": rate,
            "steady_steps": counted, "step_s": step_s, "data_s": data_s, "cpu_s": cpu, "peak_mb": peak_mb(),
            "peak_startup_mb": sampler.peak_before(called + startup),
            "peak_train_mb": sampler.peak_before(called + startup + loop), "threads": torch.get_num_threads(),
            "precision": precision}
