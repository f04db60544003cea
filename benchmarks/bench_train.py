"""End-to-end training throughput (tokens/s including harvest), peak memory and roofline fraction.

Model: Pythia-70m's exact config with random weights (training.toymodel.pythia70m_config()), which costs
what the real model costs; text: Python's own docs, tokenised by the toy tokenizer. Rows:
- ours, one 8192-feature dictionary at mlp3 (marks2023 recipe, fp32);
- ours, twelve 8192-feature dictionaries (mlp + resid at 6 layers) from one pass, with the check that the run
  takes at most the sum of the optimisation times plus one harvest, +10% (`vs_sum_of_parts`);
- dictionary_learning's ActivationBuffer + trainSAE and SAELens' trainer on the same model, data and recipe,
  each in its own virtual environment (`DL_PYTHON`, `SAELENS_PYTHON` name their interpreters), or a row that
  says why it could not run.
Each configuration runs in a child process so that its peak memory (ru_maxrss, or CUDA max allocated) is
its own. The matmul rate of this machine at the precision used is measured in the same run; the roofline
fraction counts the model's FLOPs up to the deepest hook plus each dictionary's forward and backward.
`python -m benchmarks.bench_train [--device cuda] [--tokens N] [--batch B]`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

D_MODEL, N_LAYERS, CONTEXT, D_DICT = 512, 6, 128, 8192
PEERS = {"dictionary_learning": "DL_PYTHON", "saelens": "SAELENS_PYTHON"}


def matmul_rate(device: str = "cpu", dtype: str = "float32", n: int = 2048, repeat: int = 5) -> float:
    """FLOP/s of an n x n x n matmul at `dtype` on `device` (best of `repeat`)."""
    import torch

    a = torch.randn(n, n, dtype=getattr(torch, dtype), device=device)
    b = torch.randn(n, n, dtype=getattr(torch, dtype), device=device)
    best = float("inf")
    for _ in range(repeat + 1):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def model_flops_per_token(deepest_layer: int, d: int = D_MODEL, context: int = CONTEXT) -> float:
    """Matmul FLOPs per token of a GPT-NeoX forward through block `deepest_layer` (inclusive).

    Per block: QKV 3d^2, attention output d^2, MLP 8d^2 multiply-adds (24 d^2 FLOPs), plus QK^T and AV over the
    full context (HF computes the whole causal square): 4 * context * d.
    """
    return (deepest_layer + 1) * (24 * d * d + 4 * context * d)


def dictionary_flops_per_token(d_in: int = D_MODEL, d_dict: int = D_DICT) -> float:
    """Encoder + decoder forward (4 d F) and backward (8 d F) per token."""
    return 12 * d_in * d_dict


def hooks_for(config: str) -> list[dict]:
    """Hook points of a configuration: `one` (mlp3) or `twelve` (mlp and resid at every layer)."""
    if config == "one":
        return [{"module": "gpt_neox.layers.3.mlp", "site": "mlp", "layer": 3}]
    return [h for layer in range(N_LAYERS) for h in (
        {"module": f"gpt_neox.layers.{layer}.mlp", "site": "mlp", "layer": layer},
        {"module": f"gpt_neox.layers.{layer}", "site": "resid", "layer": layer})]


def corpus_file(folder: Path) -> Path:
    from training.toymodel import corpus_documents

    path = folder / "corpus.txt"
    path.write_text("\n\n".join(corpus_documents()))
    return path


# ---- our run, in a child process ------------------------------------------------------------------------
def ours_child(config: str, tokens: int, batch: int, device: str, folder: Path) -> dict:
    """Train the configuration with training.run.train; time harvest and optimisation separately."""
    import torch

    from dictionaries.recipe import Recipe
    from training import harvest, run
    from training.presets import preset
    from training.toymodel import build_model, build_tokenizer, pythia70m_config

    model = build_model(pythia70m_config()).to(device)
    hooks = hooks_for(config)
    recipes = [Recipe.model_validate(preset(
        "marks2023", model={"id": "pythia70m-random"}, hook=h, dataset={"path": str(corpus_file(folder))},
        context_length=CONTEXT, tokens=tokens, batch_size=batch, buffer_contexts=2 * batch // CONTEXT,
        harvest_batch_size=32, d_dict=D_DICT,
        optimizer={"lr": 1e-3, "warmup_steps": min(10, tokens // batch // 2)})) for h in hooks]
    clock = {"harvest": 0.0, "optimise": 0.0, "harvested": 0}
    _time(harvest.Harvester, "__call__", clock, "harvest", device, count_rows=True)
    _time(run.Trainer, "step", clock, "optimise", device)
    started, cpu = time.perf_counter(), _cpu_seconds()
    run.train(recipes, out=folder / "out", device=device, model=model, tokenizer=build_tokenizer(),
              progress=False, checkpoint_every=10**9)
    total, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    flops = (model_flops_per_token(max(h["layer"] for h in hooks)) * clock["harvested"]
             + dictionary_flops_per_token() * tokens * len(hooks))
    return {"tokens": tokens, "seconds": total, "harvest_s": clock["harvest"], "optimise_s": clock["optimise"],
            "flops": flops, "peak_mb": _peak_mb(device), "cpu_s": cpu, "threads": torch.get_num_threads()}


def _time(cls, name: str, clock: dict, key: str, device: str, count_rows: bool = False) -> None:
    """Wrap cls.name to add its wall time to clock[key] (and the rows it returns to clock['harvested'])."""
    real = getattr(cls, name)

    def timed(*args, **kwargs):
        _sync(device)
        t = time.perf_counter()
        out = real(*args, **kwargs)
        _sync(device)
        clock[key] += time.perf_counter() - t
        if count_rows:
            clock["harvested"] += out[0].shape[0]
        return out

    setattr(cls, name, timed)


def _cpu_seconds() -> float:
    """CPU time of this process (user + system): on a shared machine, wall time alone hides contention."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- peers, each in a child process of its own virtual environment ------------------------------------
def _documents_forever():
    from training.toymodel import corpus_documents

    while True:
        yield from corpus_documents()


def dictionary_learning_child(tokens: int, batch: int, device: str, folder: Path) -> dict:
    """dictionary_learning's ActivationBuffer + trainSAE (StandardTrainer, the marks2023 recipe) at mlp3."""
    from dictionary_learning import ActivationBuffer
    from dictionary_learning.dictionary import AutoEncoder
    from dictionary_learning.trainers.standard import StandardTrainer
    from dictionary_learning.training import trainSAE
    from nnsight import LanguageModel

    from training.toymodel import build_model, build_tokenizer, pythia70m_config

    model = LanguageModel(build_model(pythia70m_config()).to(device), tokenizer=build_tokenizer())
    steps = tokens // batch
    started, cpu = time.perf_counter(), _cpu_seconds()
    buffer = ActivationBuffer(_documents_forever(), model, model.gpt_neox.layers[3].mlp, d_submodule=D_MODEL,
                              n_ctxs=2 * batch // CONTEXT, ctx_len=CONTEXT, refresh_batch_size=32,
                              out_batch_size=batch, device=device)
    config = {"trainer": StandardTrainer, "dict_class": AutoEncoder, "activation_dim": D_MODEL, "dict_size": D_DICT,
              "lr": 1e-3, "l1_penalty": 1e-3, "warmup_steps": min(10, steps // 2), "sparsity_warmup_steps": None,
              "layer": 3,
              "lm_name": "pythia70m-random", "steps": steps, "device": device}
    trainSAE(buffer, [config], steps=steps, device=device, save_dir=str(folder / "out"))
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    return {"tokens": steps * batch, "seconds": seconds, "cpu_s": cpu, "peak_mb": _peak_mb(device)}


def saelens_child(tokens: int, batch: int, device: str, folder: Path) -> dict:
    """SAELens' LanguageModelSAETrainingRunner (standard L1 SAE) on a random transformer_lens Pythia-70m."""
    from datasets import Dataset
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        StandardTrainingSAEConfig,
    )
    from sae_lens.config import LoggingConfig
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from training.toymodel import build_tokenizer, corpus_documents

    cfg = HookedTransformerConfig(d_model=D_MODEL, n_layers=N_LAYERS, n_heads=8, d_head=64, d_mlp=4 * D_MODEL,
                                  d_vocab=50304, n_ctx=2048, act_fn="gelu", normalization_type="LN",
                                  positional_embedding_type="rotary", rotary_dim=16, parallel_attn_mlp=True,
                                  original_architecture="GPTNeoXForCausalLM", device=device, seed=0)
    from transformers import AutoTokenizer

    build_tokenizer().save_pretrained(folder / "tokenizer")  # transformer_lens reloads it by name_or_path
    model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"))
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(d_in=D_MODEL, d_sae=D_DICT, l1_coefficient=1e-3),
        model_name="pythia70m-random", hook_name="blocks.3.hook_mlp_out", dataset_path="", streaming=False,
        is_dataset_tokenized=False, context_size=CONTEXT, training_tokens=tokens, train_batch_size_tokens=batch,
        n_batches_in_buffer=2 * batch // CONTEXT, store_batch_size_prompts=32, device=device, lr=1e-3,
        lr_warm_up_steps=min(10, tokens // batch // 2), logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=str(folder / "ckpt"), n_checkpoints=0, output_path=str(folder / "out"))
    started, cpu = time.perf_counter(), _cpu_seconds()
    LanguageModelSAETrainingRunner(runner_cfg, override_dataset=Dataset.from_dict({"text": corpus_documents()}),
                                   override_model=model).run()
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    return {"tokens": tokens, "seconds": seconds, "cpu_s": cpu, "peak_mb": _peak_mb(device)}


# ---- rows ---------------------------------------------------------------------------------------------
def _child(python: str, module_args: list[str], timeout: int = 1800) -> dict:
    """Run a child and parse the JSON on its last stdout line ({'error': ...} when it failed)."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([python, *module_args], capture_output=True, text=True, timeout=timeout, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)})
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1])


def _row(name: str, n_dicts: int, result: dict, rate: float) -> dict:
    if "error" in result:
        return {"benchmark": "train", "run": name, "dictionaries": n_dicts, "note": result["error"]}
    row = {"benchmark": "train", "run": name, "dictionaries": n_dicts, "tokens": result["tokens"],
           "tokens_per_s": result["tokens"] / result["seconds"], "seconds": result["seconds"],
           "tokens_per_cpu_s": result["tokens"] / result["cpu_s"] if result.get("cpu_s") else None,
           "peak_mb": result.get("peak_mb"), "cpu_s": result.get("cpu_s")}
    if "flops" in result:
        row["roofline_frac"] = result["flops"] / result["seconds"] / rate
    if "harvest_s" in result:
        row["harvest_s"], row["optimise_s"] = result["harvest_s"], result["optimise_s"]
        row["vs_sum_of_parts"] = result["seconds"] / (result["harvest_s"] + result["optimise_s"])
    return row


def run(device: str | None = None, tokens: int = 16384, batch: int = 4096) -> list[dict]:
    """Rows for ours (one and twelve dictionaries) and the peers, plus this machine's matmul rate."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rate = matmul_rate(device)
    rows = [{"benchmark": "train", "run": f"matmul fp32 {device}", "tokens_per_s": None,
             "note": f"{rate / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)"}]
    common = ["--tokens", str(tokens), "--batch", str(batch), "--device", device]
    for config, n in (("one", 1), ("twelve", 12)):
        result = _child(sys.executable, ["-m", "benchmarks.bench_train", "--child", config, *common])
        rows.append(_row(f"dictionaries (ours) {config}", n, result, rate))
    for peer, env_var in PEERS.items():
        python = os.environ.get(env_var)
        if not python:
            rows.append({"benchmark": "train", "run": peer, "dictionaries": 1,
                         "note": f"not run: set {env_var} to a Python with {peer} installed "
                                 "(a venv made with --system-site-packages, torch pinned)"})
            continue
        result = _child(python, ["-m", "benchmarks.bench_train", "--peer", peer, *common])
        rows.append(_row(peer, 1, result, rate))
    base = next((r for r in rows if r["run"] == "dictionaries (ours) one" and r.get("tokens_per_s")), None)
    for r in rows:  # ratios of our one-dictionary run to each peer, by wall time and by CPU time
        if base and r.get("tokens_per_s") and r["run"] != "dictionaries (ours) twelve":
            r["ours_vs_this"] = base["tokens_per_s"] / r["tokens_per_s"]
            if r.get("tokens_per_cpu_s") and base.get("tokens_per_cpu_s"):
                r["ours_vs_this_cpu"] = base["tokens_per_cpu_s"] / r["tokens_per_cpu_s"]
    return rows


def main(argv: list[str]) -> None:
    args = dict(zip(argv[::2], argv[1::2]))
    tokens, batch = int(args.get("--tokens", 16384)), int(args.get("--batch", 4096))
    if "--peer" in args:
        with tempfile.TemporaryDirectory() as tmp:
            peer = {"dictionary_learning": dictionary_learning_child, "saelens": saelens_child}[args["--peer"]]
            print(json.dumps(peer(tokens, batch, args.get("--device", "cpu"), Path(tmp))))
        return
    if "--child" in args:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(ours_child(args["--child"], tokens, batch, args.get("--device", "cpu"), Path(tmp))))
        return
    for row in run(args.get("--device"), tokens, batch):
        print(json.dumps(row))


if __name__ == "__main__":
    main(sys.argv[1:])
