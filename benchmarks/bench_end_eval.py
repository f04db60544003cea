"""The end-of-run evaluation's cost beside the training run it ends (issue 12, item 2).

Pythia-70m's exact config with random weights (same cost as the real model), one 8192-feature marks2023
dictionary at `gpt_neox.layers.3.mlp`, training batch 4096. Measured in one run:
- a steady-state training step: the harvest forward of 4096 tokens (32 contexts of 128, stopped after block 3)
  plus one `Trainer.step`, median of repeats after warm-up. The real loop adds tokenisation and the buffer's
  shuffle, so this step is a lower bound and the fractions below upper bounds;
- the end-of-run `evaluate` on the default 16,384 held-out tokens: its stats part (one forward of the tripled
  batch), and its sensitivity test (`sensitivity_on_eval_set`: Apollo's protocol, 32 samples, 21 steps,
  3 direction kinds, the 4096-window pool) by whole-context forwards (the path before issue 12) and by the
  last token over the cached prefix (now).
The eval's cost is reported as a fraction of a 10M-token run's training time extrapolated from the step.
`python -m benchmarks end_eval` (minutes, most of them the old path).
"""

from __future__ import annotations

import functools
import statistics
import time

import torch

from benchmarks.bench_eval import HOOK, setup

BATCH, CONTEXT, EVAL_TOKENS, RUN_TOKENS, REPEATS = 4096, 128, 16384, 10_000_000, 3


def step_seconds(model, contexts: torch.Tensor) -> float:
    """Median seconds of harvest (B tokens to block 3) + one marks2023 Trainer.step on them."""
    from dictionaries.hooks import collect_activations
    from training.presets import preset, validate_recipe
    from training.trainer import Trainer

    recipe = validate_recipe(preset("marks2023", model="bench/model", hook=HOOK.model_dump(), dataset="bench.txt",
                                    tokens=10**9, d_dict=8192, batch_size=BATCH))
    trainer = Trainer(recipe, HOOK_WIDTH, total_steps=10**6)
    times = []
    for i in range(REPEATS + 1):
        start = time.perf_counter()
        x = collect_activations(model, [HOOK], contexts)[0].reshape(-1, HOOK_WIDTH)
        trainer.step(x)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


HOOK_WIDTH = 512


def eval_seconds(model, d, batches) -> float:
    """Seconds of one `evaluate` on the eval tokens without the sensitivity test (the stats part)."""
    from training.evaluate import evaluate

    start = time.perf_counter()
    evaluate(model, [d], batches, tokens=EVAL_TOKENS, context_length=CONTEXT, sensitivity=False, progress=False)
    return time.perf_counter() - start


def sensitivity_seconds(model, d, batches, *, reuse_prefix: bool) -> float:
    """Seconds of the sensitivity test as `evaluate` runs it (`sensitivity_on_eval_set`, 32 samples), by the
    cached prefix or by whole-context forwards (the path before issue 12, kept as the reference)."""
    import training.sensitivity as S

    cheap = S.measure_sensitivity
    S.measure_sensitivity = functools.partial(cheap, reuse_prefix=reuse_prefix)
    try:
        start = time.perf_counter()
        S.sensitivity_on_eval_set(model, [d], [HOOK], batches, bos_id=0, exclude_bos=True, progress=False)
        return time.perf_counter() - start
    finally:
        S.measure_sensitivity = cheap


def run() -> list[dict]:
    from training.evaluate import pack_batches
    from training.toymodel import build_tokenizer, corpus_documents

    model, d, _ = setup()
    batches = pack_batches(corpus_documents(), tokenizer=build_tokenizer(), tokens=EVAL_TOKENS,
                           context_length=CONTEXT, batch_size=8)
    contexts = torch.cat([b[0] for b in batches])[:BATCH // CONTEXT]
    step = step_seconds(model, contexts)
    train = RUN_TOKENS / BATCH * step
    print(f"step {step:.2f} s; 10M-token run {train:.0f} s", flush=True)
    stats = eval_seconds(model, d, batches)
    print(f"eval stats {stats:.1f} s", flush=True)
    now = sensitivity_seconds(model, d, batches, reuse_prefix=True)
    print(f"sensitivity cached prefix {now:.1f} s", flush=True)
    before = sensitivity_seconds(model, d, batches, reuse_prefix=False)
    print(f"sensitivity whole contexts {before:.1f} s", flush=True)
    rows = [{"what": "training step (harvest 4096 tokens + Trainer.step)", "seconds": step,
             "note": f"10M tokens = {RUN_TOKENS // BATCH} steps = {train / 3600:.2f} h"},
            {"what": "eval stats (16,384 tokens)", "seconds": stats, "of a 10M-token run": stats / train}]
    for name, sens in (("before: whole-context sensitivity", before), ("now: cached-prefix sensitivity", now)):
        rows.append({"what": f"end-of-run eval, {name}", "seconds": stats + sens,
                     "of a 10M-token run": (stats + sens) / train, "sensitivity s": sens})
    rows.append({"what": "sensitivity speed-up", "note": f"{before / now:.1f}x"})
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
