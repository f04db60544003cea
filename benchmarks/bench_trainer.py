"""The optimisation step alone (training/trainer.py) against this machine's matmul roofline, and TopK's step
with dense against sparse decoding (k 32 of 32768 features, batch 4096: `sparse_vs_dense`).

A Pythia-70m-MLP-shaped dictionary (d_in 512, 8192 features) steps on random activations for each named
recipe family, in fp32 and under bf16 autocast, the two trainers stepping alternately. The roofline is the
rate of the step's own matmul shape, (B, d_in) @ (d_in, F), measured in the same run at the same precision; a
dense step costs five such products (two forward; dW_dec, df and dW_enc backward: the input needs no
gradient), 10 * B * d_in * F FLOPs; TopK and BatchTopK, decoded sparsely, one (the forward that chooses the
kept features). Reported: tokens/s, ms per step, the fraction of the roofline the whole step reaches (the rest
is the nonlinearity, Adam, the decoder-norm rule and bookkeeping), the bf16 step's gain over fp32 beside the
matmul's. Timings are the fastest of REPEATS after warm-up (the step's own cost on a shared machine).
"""

from __future__ import annotations

import statistics
import time

import torch

D_IN, D_DICT, BATCH, REPEATS = 512, 8192, 1024, 5
RECIPES = {"marks2023": {}, "topk": {"k": 32}, "batchtopk": {"k": 32}, "jumprelu": {}}


def _recipe(name: str, extra: dict):
    from training.presets import preset, validate_recipe

    return validate_recipe(preset(name, model="bench/model", hook={"module": "gpt_neox.layers.3.mlp", "site": "mlp",
                                                                   "layer": 3},
                                  dataset="bench.txt", tokens=10**9, d_dict=D_DICT, batch_size=BATCH, **extra))


def matmul_rate(precision: str, device: str = "cpu", repeats: int = 2) -> float:
    """FLOP/s of (BATCH, D_IN) @ (D_IN, D_DICT) at the given precision (the fastest of `repeats`)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(BATCH, D_IN, dtype=dtype), torch.randn(D_IN, D_DICT, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * BATCH * D_IN * D_DICT / min(times)


def step_times(name: str, extra: dict, precisions: tuple[str, ...] = ("fp32", "bf16")
               ) -> tuple[dict[str, float], dict[str, float]]:
    """(precision -> seconds of one Trainer.step at BATCH, precision -> matmul FLOP/s): fp32 and bf16 trainers
    step alternately, each step followed by the matmul at its precision (a busy machine slows all alike), the
    fastest of REPEATS after two warm-up steps: the step's own cost in steady state, beside its roofline."""
    from training.trainer import Trainer

    recipe = _recipe(name, extra)
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(0))
    trainers = {}
    for precision in precisions:
        trainers[precision] = Trainer(recipe, D_IN, total_steps=1000,
                                      autocast=torch.bfloat16 if precision == "bf16" else None)
        if recipe.input_normalization != "none":
            trainers[precision].estimate_input_scale(x)
    times: dict[str, list[float]] = {p: [] for p in trainers}
    rates: dict[str, list[float]] = {p: [] for p in trainers}
    for i in range(REPEATS + 2):
        for precision, trainer in trainers.items():
            start = time.perf_counter()
            trainer.step(x)
            if i >= 2:
                times[precision].append(time.perf_counter() - start)
                rates[precision].append(matmul_rate(precision))
    return {p: min(v) for p, v in times.items()}, {p: max(v) for p, v in rates.items()}


SPARSE_SHAPE = {"k": 32, "d_dict": 32768, "batch": 4096}
"""Issue 12's sparse-decoding row: TopK at k 32 of 32768 features, d_in 512, batch 4096."""


def sparse_vs_dense(precision: str = "fp32") -> list[dict]:
    """Median seconds of one TopK Trainer.step with dense and with sparse decoding (training/sparse_topk.py),
    the two trainers stepping alternately so that a busy machine slows both alike; gain = dense / sparse."""
    from training.trainer import Trainer

    k, d_dict, batch = SPARSE_SHAPE["k"], SPARSE_SHAPE["d_dict"], SPARSE_SHAPE["batch"]
    recipe = _recipe("topk", {"k": k}).model_copy(update={"d_dict": d_dict, "batch_size": batch})
    x = torch.randn(batch, D_IN, generator=torch.Generator().manual_seed(0))
    trainers = {}
    for sparse in (False, True):
        t = Trainer(recipe, D_IN, total_steps=1000, autocast=torch.bfloat16 if precision == "bf16" else None)
        t.sparse_decoding = sparse
        t.estimate_input_scale(x)
        trainers["sparse" if sparse else "dense"] = t
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for i in range(REPEATS + 1):
        for name, t in trainers.items():
            start = time.perf_counter()
            t.step(x)
            if i:
                times[name].append(time.perf_counter() - start)
    seconds = {name: statistics.median(v) for name, v in times.items()}
    return [{"benchmark": "trainer.step decode", "recipe": f"topk k={k}", "precision": precision,
             "shape": f"{batch}x{D_IN}->{d_dict}", "decode": name, "ms/step": round(s * 1e3, 1),
             "tokens/s": round(batch / s), "gain": round(seconds["dense"] / s, 2)} for name, s in seconds.items()]


def run() -> list[dict]:
    """The sparse-decoding rows, then one row per recipe and precision with the bf16 / fp32 step ratio."""
    rows = sparse_vs_dense()
    # bf16 only where its matmuls beat fp32's: an AVX2-only CPU emulates them (~1/80 of fp32, minutes a step)
    precisions = ("fp32", "bf16") if matmul_rate("bf16", repeats=1) > matmul_rate("fp32") else ("fp32",)
    if len(precisions) == 1:
        rows.append({"benchmark": "trainer.step", "precision": "bf16", "note": "skipped: bf16 matmuls are slower "
                     "than fp32 here (no native bf16 such as AVX-512 BF16 or AMX)"})
    for name, extra in RECIPES.items():
        seconds, rates = step_times(name, extra, precisions)
        # products of the (B, d_in) x (d_in, F) size a step costs: five dense, one where TopK decodes sparsely
        products = 1 if name in ("topk", "batchtopk") else 5
        for precision, s in seconds.items():
            rows.append({"benchmark": "trainer.step", "recipe": name, "precision": precision,
                         "shape": f"{BATCH}x{D_IN}->{D_DICT}", "ms/step": round(s * 1e3, 1),
                         "tokens/s": round(BATCH / s), "matmul GFLOP/s": round(rates[precision] / 1e9, 1),
                         "roofline": round(2 * products * BATCH * D_IN * D_DICT / s / rates[precision], 2),
                         "bf16 gain": round(seconds["fp32"] / s, 2),
                         "matmul gain": round(rates[precision] / rates["fp32"], 2)})
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
