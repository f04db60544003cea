"""Big models: peak memory and tokens/s of a Pythia-70m-shaped and a Pythia-1B-shaped GPT-NeoX in fp32 and bf16.

Each configuration runs in its own child process (`--child`), so each peak resident set size (RSS, from
getrusage) is that configuration's alone: the interpreter with torch and transformers imported (`rss_base`),
then the model built from its config directly in the dtype with random weights (as `hooks.load_model` with
`dtype` materialises a checkpoint: no fp32 copy first), then the forwards. Per configuration:
- `params` and `param_GB`: the parameter count and bytes (numel x element size);
- `harvest tok/s`: `hooks.collect_activations` at the middle block's MLP output (what training harvests,
  the forward stopping after that hook, so about half the blocks and no unembedding run);
- `full tok/s`: an eval-style forward, `hooks.run_patched` to the logits and their log-softmax in fp32;
- `peak_GB`: the child's peak RSS after all of it (weights, activations, logits of batch x context x 50304).
Rates are the best of `repeats` timed calls after one warm-up call each (steady state: every call is a whole
forward of `batch` x `context` tokens; the best, because load from other processes only adds time).

The 1B shape is Pythia-1B's: hidden 2048, 16 layers, 8 heads, intermediate 8192, vocab 50304 (1.01B
parameters, embeddings untied). On a CPU with AVX512-BF16, bf16 matmuls run faster than fp32 ones; elsewhere
bf16 can be slower on CPU, and on a GPU it is the usual choice. Sized for about 4 minutes on two CPU cores.

`python -m benchmarks memory` or `python -m benchmarks.bench_memory [--repeats N] [--context C]`
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

SHAPES = {
    "pythia-70m": {"d_model": 512, "n_layers": 6, "n_heads": 8, "intermediate_size": 2048, "batch": 8},
    "pythia-1b": {"d_model": 2048, "n_layers": 16, "n_heads": 8, "intermediate_size": 8192, "batch": 2},
}
"""Model shapes (GPT-NeoX configs, vocab 50304) and the contexts per forward that keep each under seconds."""


def _rss_gb() -> float:
    """Peak RSS of this process so far, GB (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _best_rate(fn, tokens: int, repeats: int) -> float:
    """tokens / best seconds of fn() over `repeats` calls, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return tokens / best


def child(shape: str, dtype: str, context: int, repeats: int) -> dict:
    """One configuration measured in this process (run by `run` in a fresh child)."""
    import torch
    from transformers import GPTNeoXForCausalLM

    from dictionaries.hooks import collect_activations, run_patched
    from dictionaries.placement import model_dtype
    from training.toymodel import tiny_config

    base = _rss_gb()
    s = SHAPES[shape]
    config = tiny_config(vocab_size=50304, d_model=s["d_model"], n_layers=s["n_layers"], n_heads=s["n_heads"],
                         intermediate_size=s["intermediate_size"], max_position_embeddings=2048)
    torch.manual_seed(0)
    started = time.perf_counter()
    model = GPTNeoXForCausalLM._from_config(config, dtype=model_dtype(dtype)).eval()
    built = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    after_build = _rss_gb()
    ids = torch.randint(0, 50304, (s["batch"], context), generator=torch.Generator().manual_seed(0))
    hook = f"gpt_neox.layers.{s['n_layers'] // 2}.mlp"
    tokens = ids.numel()
    harvest = _best_rate(lambda: collect_activations(model, [hook], ids), tokens, repeats)

    def full() -> None:
        logits = run_patched(model, ids)                          # (batch, context, 50304)
        torch.log_softmax(logits.float(), -1)

    full_rate = _best_rate(full, tokens, repeats)
    return {"model": f"{shape} shape", "dtype": dtype, "params": f"{params / 1e6:.0f}M",
            "param_GB": param_bytes / 1e9, "rss_base_GB": base, "rss_built_GB": after_build, "peak_GB": _rss_gb(),
            "build_s": built, "tokens/forward": tokens, "harvest tok/s": harvest, "full tok/s": full_rate,
            "harvest_hook": hook}


def run(repeats: int = 2, context: int = 128, shapes: tuple[str, ...] = tuple(SHAPES),
        dtypes: tuple[str, ...] = ("fp32", "bf16"), timeout: float = 900) -> list[dict]:
    """Table rows: each (shape, dtype) measured in its own child process."""
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--child", shape, dtype,
                   "--context", str(context), "--repeats", str(repeats)]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            lines = r.stdout.strip().splitlines()
            if r.returncode != 0 or not lines:
                tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append({"model": f"{shape} shape", "dtype": dtype, "error": tail})
                continue
            rows.append(json.loads(lines[-1]))
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("SHAPE", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--context", type=int, default=128)
    args, _ = parser.parse_known_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, context=args.context, repeats=args.repeats)))
        return
    from rich.console import Console

    from benchmarks.__main__ import render

    started = time.perf_counter()
    rows = run(repeats=args.repeats, context=args.context)
    Console(width=200).print(render("memory", rows, time.perf_counter() - started))


if __name__ == "__main__":
    main(sys.argv[1:])
