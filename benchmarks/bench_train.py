"""Training throughput by phase, ours against dictionary_learning, SAELens and sparsify in one run.

Each row is one training run in a child process of its own (benchmarks/train_runs.py, train_peers.py): the
whole wall time, split into start-up, the steady training rate (harvest + buffer + optimisation over at
least 64 steps after `warmup`) and the end of the run (ours: the held-out evaluation; peers: saving), and the
peak memory (ru_maxrss; ours also at the end of start-up and of training). Ours runs in two precisions:
fp32, and bf16 (the recipe's `model_dtype` and `autocast` bfloat16: the model's harvest forward and the
dictionary's forward in bf16, weights and Adam in fp32). Runs alternate (PLANS), ours of each precision before
and after each peer's, so that load from others on a shared machine weighs on both sides alike; each peer's
steady ratio is to the mean of the ours runs of that precision beside it. The first ours run of each
precision ends with the held-out evaluation (`eval_s`), the others skip it; the whole-run and peak-memory
ratios are to that run. Comparisons:
- L1 (marks2023, 8192 features at mlp3): ours against dictionary_learning (fp32) and SAELens (fp32, and bf16
  with its own autocast);
- TopK (k=32, 32768 features at mlp3): ours against sparsify (fp32: its bf16 is CUDA-only);
- twelve 8192-feature dictionaries (mlp and resid of every layer) from one pass, against the sum of their
  optimisation times (twelve times the one-dictionary fp32 step) plus one harvest (the twelve run's own);
- the optimisation step as a fraction of this machine's matmul rate at the step's precision, measured in the
  same run (fp32 and bf16, 2048^3, best of 5): 10 d F FLOPs a token for L1, 2 d F for TopK (`_summary`).
Peers live in their own virtual environments (benchmarks/peers.py); one that cannot run has a row saying why.

Batch: 1024 tokens a step for both comparisons. The recipes' own batches are 4096-8192, which would take the
peers past the 15 minutes a table may take on two cores; at 256 (the first version of this table) the
per-step costs every library pays alike whatever the batch (Adam over all 2 d F weights, the decoder-norm
passes) outweighed the per-token work and squeezed every ratio toward 1.

`python -m benchmarks train [--quick] [--steps N --batch B --topk-batch B --twelve-steps N --eval-tokens N]`
(defaults: 73 steps of 1024 tokens, 8 of them warm-up; twelve 24 steps; the held-out evaluation on 2,048
tokens; about 15 minutes on two quiet cores). `--quick` is for development: small dictionaries, 24 steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {"full": {"steps": 73, "batch": 1024, "topk_batch": 1024, "twelve_steps": 24, "d_dict": 8192,
                  "topk_d_dict": 32768, "warmup": 8, "eval_tokens": 2048},
         "quick": {"steps": 24, "batch": 256, "topk_batch": 256, "twelve_steps": 12, "d_dict": 2048,
                   "topk_d_dict": 4096, "warmup": 4, "eval_tokens": 512}}


def matmul_rate(dtype: str = "float32", device: str = "cpu", n: int = 2048, repeat: int = 5) -> float:
    """FLOP/s of an n x n x n matmul at `dtype` on `device` (best of `repeat`)."""
    import torch

    a = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    b = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    best = float("inf")
    for _ in range(repeat + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _child(python: str, args: list[str], timeout: int = 3600) -> dict:
    """Run one child and parse the JSON on its last stdout line ({'error': ...} when it failed)."""
    root = Path(__file__).resolve().parent.parent
    try:
        proc = subprocess.run([python, "-m", "benchmarks.bench_train", *args], capture_output=True, text=True,
                              timeout=timeout, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1])


def _ours(kind: str, size: dict, steps: int, batch: int, d_dict: int, device: str, evaluate: bool = True,
          precision: str = "fp32") -> dict:
    return _child(sys.executable, ["--child", kind, "--steps", str(steps), "--batch", str(batch), "--d-dict",
                                   str(d_dict), "--warmup", str(size["warmup"]), "--eval-tokens",
                                   str(size["eval_tokens"] if evaluate else 0), "--device", device,
                                   "--precision", precision])


def _peer(peer: str, size: dict, steps: int, batch: int, d_dict: int, device: str, precision: str = "fp32") -> dict:
    from benchmarks.peers import peer_version, python_for

    python, note = python_for(peer)
    if python is None:
        return {"error": note}
    result = _child(python, ["--peer", peer, "--steps", str(steps), "--batch", str(batch), "--d-dict", str(d_dict),
                             "--warmup", str(size["warmup"]), "--device", device, "--precision", precision])
    return {**result, "version": peer_version(python, peer)}


ROW_KEYS = ("tokens", "batch", "steady_tokens_per_s", "steady_steps", "seconds", "startup_s", "train_s", "end_s",
            "eval_s", "peak_mb", "peak_startup_mb", "peak_train_mb", "cpu_s", "step_s", "data_s")


def _row(name: str, result: dict, batch: int, precision: str, dictionaries: int = 1) -> dict:
    row = {"benchmark": "train", "run": name, "precision": precision, "dictionaries": dictionaries}
    if "error" in result:
        return {**row, "note": result["error"]}
    row.update({k: result[k] for k in ROW_KEYS if k in result} | {"batch": batch})
    row["whole_tokens_per_s"] = result["tokens"] / result["seconds"]
    if "version" in result:
        row["run"] = name.replace(" ", f" {result['version']} ", 1)
    return row


PLANS = {  # the order runs go in: ("ours" or a peer, precision); each ours precision's first run is evaluated
    "l1": [("ours", "fp32"), ("ours", "bf16"), ("dictionary_learning", "fp32"), ("ours", "fp32"), ("ours", "bf16"),
           ("saelens", "fp32"), ("ours", "fp32"), ("ours", "bf16"), ("saelens", "bf16"), ("ours", "bf16")],
    "topk": [("ours", "fp32"), ("ours", "bf16"), ("sparsify", "fp32"), ("ours", "fp32"), ("ours", "bf16")],
}
"""dictionary_learning 0.1.0 has no mixed precision, and sparsify 1.3.3's bf16 autocast is CUDA-only
(`torch.cuda.is_bf16_supported()` gates it): on the CPU each runs in fp32 only, so ours in both precisions
stands beside them. SAELens runs both: bf16 is its `autocast` (the SAE's forward) with `autocast_lm` (the
model's forward in the activation store), the same two places ours' bf16 covers."""


def _compare(kind: str, size: dict, steps: int, batch: int, d_dict: int, device: str,
             precisions: tuple[str, ...] = ("fp32", "bf16")) -> list:
    """The runs of PLANS[kind] at `precisions`, in order; then each peer's ratios (`_ratios`)."""
    label = {"l1": "L1 marks2023", "topk": "TopK k=32"}[kind]
    rows, evaluated = [], set()
    for who, precision in [(who, p) for who, p in PLANS[kind] if p in precisions]:
        if who == "ours":
            first = precision not in evaluated
            evaluated.add(precision)
            result = _ours(kind, size, steps, batch, d_dict, device, evaluate=first, precision=precision)
            name = f"ours {label} F={d_dict}{' (evaluated)' if first else ''}"
        else:
            result = _peer(who, size, steps, batch, d_dict, device, precision)
            name = f"{who} {label} F={d_dict}"
        rows.append(_row(name, result, batch, precision))
    _ratios(rows)
    return rows


def _ratios(rows: list[dict]) -> None:
    """ours / peer for each of ours' precisions: the steady rate against the mean of the nearest ours runs of that
    precision before and after the peer's (so load from others weighs on both alike); the whole run and the peak
    memory against that precision's evaluated run, as a user's run ends with the evaluation."""
    for i, peer in enumerate(rows):
        if peer["run"].startswith("ours") or "steady_tokens_per_s" not in peer:
            continue
        for precision in ("fp32", "bf16"):
            ours = [(at, r) for at, r in enumerate(rows) if r["run"].startswith("ours")
                    and r["precision"] == precision and "steady_tokens_per_s" in r]   # by position, not equality
            beside = [r for at, r in ours if at < i][-1:] + [r for at, r in ours if at > i][:1]
            whole = next((r for _, r in ours if "(evaluated)" in r["run"]), None)
            if not beside or whole is None:
                continue
            mean = sum(r["steady_tokens_per_s"] for r in beside) / len(beside)
            peer[f"ours_{precision}_vs_this"] = mean / peer["steady_tokens_per_s"]
            peer[f"ours_{precision}_vs_this_whole"] = whole["whole_tokens_per_s"] / peer["whole_tokens_per_s"]
            peer[f"ours_{precision}_vs_this_peak"] = whole["peak_mb"] / peer["peak_mb"]


def _summary(rows: list[dict], rates: dict, d_in: int) -> None:
    """Roofline fraction of our optimisation step at its precision, and twelve from one pass against the sum of
    parts. FLOPs a token: 10 d F for L1, the five (B, d) x (d, F) products the step runs (encoder and decoder
    forward, W_dec's and f's gradients, W_enc's; b_dec's gradient through the encoder is a vector product,
    losses._project, and x needs none; counting a sixth, as this table did before, overstated the fraction by
    a fifth); 2 d F for TopK,
    whose sparse step keeps one dense product (the forward that chooses the kept features: decode, its backward
    and the encoder's backward go through the k kept features only)."""
    for r in rows:
        if r["run"].startswith("ours") and "step_s" in r and r.get("dictionaries") == 1:
            per_token = (2 if "TopK" in r["run"] else 10) * d_in * int(r["run"].split("F=")[1].split()[0])
            rate = rates["bfloat16" if r["precision"] == "bf16" else "float32"]
            r["step_gflops"] = per_token * r["batch"] / r["step_s"] / 1e9
            r["step_roofline"] = per_token * r["batch"] / r["step_s"] / rate
    one = [r for r in rows if r["run"].startswith("ours L1") and r["precision"] == "fp32" and "step_s" in r]
    twelve = next((r for r in rows if r.get("dictionaries") == 12 and "step_s" in r), None)
    if one and twelve:
        per_step = twelve["batch"] / twelve["steady_tokens_per_s"]                   # seconds a step, steady
        parts = 12 * sum(r["step_s"] for r in one) / len(one) + twelve["data_s"]
        twelve["vs_sum_of_parts"] = per_step / parts
        twelve["vs_own_parts"] = per_step / (twelve["step_s"] + twelve["data_s"])


def run(device: str | None = None, quick: bool | None = None, **overrides: int) -> list[dict]:
    """The whole table: matmul rates, the L1 and TopK comparisons, twelve from one pass."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    quick = "--quick" in sys.argv if quick is None else quick
    size = {**SIZES["quick" if quick else "full"], **_argv_sizes(), **overrides}
    rates = {"float32": matmul_rate("float32", device)}
    # a 512^3 probe first: where bf16 GEMMs are emulated (AVX2-only CPUs, ~1/50 of fp32) 2048^3 takes minutes
    probe = matmul_rate("bfloat16", device, n=512, repeat=2)
    rates["bfloat16"] = matmul_rate("bfloat16", device) if probe > rates["float32"] / 4 else probe
    rows = [{"benchmark": "train", "run": f"matmul {dtype} {device}",
             "note": f"{rate / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)"} for dtype, rate in rates.items()]
    precisions = ("fp32", "bf16") if rates["bfloat16"] > rates["float32"] else ("fp32",)
    if len(precisions) == 1:  # e.g. an AVX2-only CPU: bf16 GEMMs are emulated, tens of times slower than fp32
        rows.append({"benchmark": "train", "run": "bf16 runs", "note": "skipped: bf16 matmuls are slower than fp32 "
                     "here (no native bf16 such as AVX-512 BF16 or AMX); bf16 pays on GPUs and on such CPUs"})
    rows += _compare("l1", size, size["steps"], size["batch"], size["d_dict"], device, precisions)
    rows += _compare("topk", size, size["steps"], size["topk_batch"], size["topk_d_dict"], device, precisions)
    twelve = _ours("twelve", size, size["twelve_steps"], size["batch"], size["d_dict"], device, evaluate=False)
    rows.append(_row(f"ours twelve L1 F={size['d_dict']}", twelve, size["batch"], "fp32", dictionaries=12))
    _summary(rows, rates, 512)
    return rows


def _argv_sizes() -> dict:
    """--steps, --batch, --topk-batch, --twelve-steps, --eval-tokens, --warmup from sys.argv (python -m benchmarks)."""
    argv, out = sys.argv, {}
    for i, arg in enumerate(argv[:-1]):
        key = arg.removeprefix("--").replace("-", "_")
        if arg.startswith("--") and key in SIZES["full"]:
            out[key] = int(argv[i + 1])
    return out


def _child_main(args: dict) -> dict:
    from benchmarks.train_runs import ours_child

    common = {k: int(args[f"--{k.replace('_', '-')}"]) for k in ("steps", "batch", "d_dict", "warmup")}
    device = args.get("--device", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        if "--peer" in args:
            from benchmarks.train_peers import PEER_CHILDREN

            return PEER_CHILDREN[args["--peer"]](**common, device=device, folder=Path(tmp),
                                                 precision=args.get("--precision", "fp32"))
        return ours_child(args["--child"], **common, eval_tokens=int(args["--eval-tokens"]), device=device,
                          folder=Path(tmp), precision=args.get("--precision", "fp32"))  # fp32 or bf16


def main(argv: list[str]) -> None:
    if "--child" in argv or "--peer" in argv:
        print(json.dumps(_child_main(dict(zip(argv[::2], argv[1::2])))))
        return
    for row in run(quick="--quick" in argv):
        print(json.dumps(row))


if __name__ == "__main__":
    main(sys.argv[1:])
