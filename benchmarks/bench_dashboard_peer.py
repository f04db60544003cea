"""SAEDashboard's row of the dashboard benchmark: the same dictionary and token batches, in its own venv.

The dictionary's tensors (native layout = SAELens' layout) and the token ids go to a folder as safetensors;
benchmarks/peer_dashboard.py, run by the `saedashboard` venv's interpreter (benchmarks/peers.py builds it on
first use), times SaeVisRunner.run over them at `blocks.3.hook_mlp_out` of a random-weight Pythia-70m
HookedTransformer (TransformerLens' name for `gpt_neox.layers.3.mlp`'s output). Its cost is about linear in
features and slow on CPU (512 features x 4096 tokens took 72 s on two busy cores), so by default it runs the
first 256 features only (BENCH_DASHBOARD_PEER_FEATURES changes that) on all the tokens, and the row says so,
with the linear extrapolation to all features marked as one. Its feature minibatch is all of those features
(one forward pass over the tokens, its cheapest setting; its own default of 256 re-runs the model once per
256 features): BENCH_DASHBOARD_PEER_FEATURE_BATCH changes it. The child's time
limit is BENCH_DASHBOARD_PEER_TIMEOUT seconds (default 1200); BENCH_DASHBOARD_PEER=0 skips the row.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.peers import peer_version, python_for

WHAT = "SAEDashboard (sae-dashboard 0.8.0): SaeVisRunner.run, data only"
TL_HOOK = "blocks.3.hook_mlp_out"


def _job(folder: Path, d, batches, vocab: int, device: str) -> None:
    state = {n: p.detach().float().cpu().contiguous() for n, p in d.named_parameters()
             if n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    save_file(state, str(folder / "sae.safetensors"))
    save_file({"ids": torch.cat([ids for ids, _ in batches]).contiguous()}, str(folder / "tokens.safetensors"))
    features = min(d.W_enc.shape[1], int(os.environ.get("BENCH_DASHBOARD_PEER_FEATURES", 256)))
    job = {"hook_point": TL_HOOK, "k": int(d.k), "features": features, "vocab": vocab, "device": device,
           "minibatch_size_tokens": int(batches[0][0].shape[0]),
           "minibatch_size_features": int(os.environ.get("BENCH_DASHBOARD_PEER_FEATURE_BATCH", features))}
    (folder / "job.json").write_text(json.dumps(job))


def saedashboard_row(d, batches, vocab: int, device: str) -> dict:
    """{'what', 'seconds', 'note'} from the child, or {'what', 'note'} saying in one line why there is no time."""
    if os.environ.get("BENCH_DASHBOARD_PEER") == "0":
        return {"what": WHAT, "note": "not run: BENCH_DASHBOARD_PEER=0"}
    python, why = python_for("saedashboard")
    if python is None:
        return {"what": WHAT, "note": f"not run: {why}"}
    timeout = int(os.environ.get("BENCH_DASHBOARD_PEER_TIMEOUT", 1200))
    script = Path(__file__).resolve().parent / "peer_dashboard.py"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _job(folder, d, batches, vocab, device)
        job = json.loads((folder / "job.json").read_text())
        try:
            proc = subprocess.run([python, str(script), str(folder)], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"what": WHAT, "note": f"not finished: its data generation ran past {timeout} s and was stopped"}
        if (folder / "error.txt").exists() or proc.returncode:
            error = (folder / "error.txt").read_text().strip() if (folder / "error.txt").exists() else \
                (proc.stderr.strip().splitlines() or ["no output"])[-1][:240]
            return {"what": WHAT, "note": f"failed: {error}"}
        result = json.loads((folder / "result.json").read_text())
    every = d.W_enc.shape[1]
    return {"what": WHAT + f", features 0..{job['features'] - 1} only", "seconds": result["seconds"],
            "note": f"MEASURED for {job['features']} of the {every} features ({result['features_with_data']} with "
                    f"data), same tokens; x{every / job['features']:.0f} if linear in features = "
                    f"{result['seconds'] * every / job['features']:.0f} s for all (extrapolated, not measured); "
                    f"same dictionary (TopKSAE, k={int(d.k)}) and token ids; random-weight TL Pythia-70m (not our "
                    f"weights; same shapes, same cost); feature minibatch {job['minibatch_size_features']}; "
                    f"sae-dashboard {peer_version(python, 'saedashboard')}"}
