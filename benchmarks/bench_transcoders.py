"""Peers' transcoders read here against the peers' own forward: each peer, in its own virtual environment
(benchmarks/peers.py), builds its transcoder class with random weights, saves it with its own save method and
runs its own forward on fixed inputs; `read_folder` then reads that folder and predicts the same inputs.
One row per kind: the largest |difference| of the prediction and of the features (float32 on both sides).

SAELens: Transcoder, SkipTranscoder, JumpReLUTranscoder, JumpReLUSkipTranscoder (saes/transcoder.py);
sparsify: SparseCoder with `transcode` (with and without `skip_connection`) and an SAE with `skip_connection`.

Then, on the pretrained stand-in (training/toymodel.py), one pass trains an SAE at the MLP's output, a
transcoder and a skip-transcoder (MLP input -> output) of the same width and k, and each is evaluated on held-out
text: FVU against the MLP output, L0, and loss recovered with the MLP output replaced (zero-ablation baseline).
Paulo et al. 2025 report skip-transcoders at lower reconstruction error than transcoders at equal k.

`python -m benchmarks transcoders` (BENCH_TRANSCODER_TOKENS, default 393216 training tokens per dictionary)
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

D_IN, D_OUT, D_SAE, K, TOKENS = 64, 48, 256, 8, 512
TOLERANCE = 1e-4   # float32 matmuls of width 256 on both sides, summed in different orders

_SAELENS = """
import sys, torch
from safetensors.torch import save_file
from sae_lens.saes import transcoder as T
from sae_lens.saes.sae import SAEMetadata
out, kind = sys.argv[1], sys.argv[2]
names = {"transcoder": "Transcoder", "skip_transcoder": "SkipTranscoder", "jumprelu_transcoder": "JumpReLUTranscoder",
         "jumprelu_skip_transcoder": "JumpReLUSkipTranscoder"}
cls, cfg_cls = getattr(T, names[kind]), getattr(T, names[kind] + "Config")
cfg = cfg_cls(d_in=%(d_in)d, d_sae=%(d_sae)d, d_out=%(d_out)d, dtype="float32", device="cpu",
              apply_b_dec_to_input=False)
cfg.metadata = SAEMetadata(hook_name="blocks.1.ln2.hook_normalized", hook_name_out="blocks.1.hook_mlp_out",
                           model_name="gpt2")
sae = cls(cfg)
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, p in sae.named_parameters():
        draw = torch.rand if name == "threshold" else torch.randn   # thresholds positive
        p.copy_(draw(p.shape, generator=g) * 0.2)
sae.save_model(out + "/folder")
x = torch.randn(%(tokens)d, %(d_in)d, generator=g)
with torch.no_grad():
    save_file({"x": x, "y": sae(x), "f": sae.encode(x)}, out + "/io.safetensors")
"""

_SPARSIFY = """
import sys, json, torch
from pathlib import Path
from safetensors.torch import save_file
from sparsify import SparseCoder, SparseCoderConfig
out, kind = sys.argv[1], sys.argv[2]
cfg = SparseCoderConfig(num_latents=%(d_sae)d, k=%(k)d, transcode="transcode" in kind, skip_connection="skip" in kind)
sae = SparseCoder(%(d_in)d, cfg)
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for p in sae.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.2)
folder = Path(out) / "run" / "layers.1.mlp"
sae.save_to_disk(folder)
(folder.parent / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m"}))
x = torch.randn(%(tokens)d, %(d_in)d, generator=g)
with torch.no_grad():
    o = sae(x)
    f = torch.zeros(%(tokens)d, %(d_sae)d).scatter_(-1, o.latent_indices, o.latent_acts)
    save_file({"x": x, "y": o.sae_out, "f": f}, out + "/io.safetensors")
"""

CASES = [("saelens", k) for k in ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")] \
    + [("sparsify", k) for k in ("transcode", "transcode+skip", "skip")]


def _compare(peer: str, kind: str, python: str, version: str) -> dict:
    import torch
    from safetensors.torch import load_file

    from dictionaries.formats import read_folder

    row = {"peer": f"{peer} {version}", "kind": kind}
    script = (_SAELENS if peer == "saelens" else _SPARSIFY) % {"d_in": D_IN, "d_out": D_OUT if peer == "saelens"
                                                               else D_IN, "d_sae": D_SAE, "k": K, "tokens": TOKENS}
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([python, "-c", script, tmp, kind], capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            return {**row, "verdict": "peer failed: " + (run.stderr.strip().splitlines() or ["?"])[-1][:120]}
        io = load_file(str(Path(tmp) / "io.safetensors"))
        folder = Path(tmp) / ("folder" if peer == "saelens" else "run/layers.1.mlp")
        d = read_folder(folder)
        with torch.no_grad():
            y, f = d(io["x"])
    dy, df = float((y - io["y"]).abs().max()), float((f - io["f"]).abs().max())
    card = d.card
    where = f"{card.hook.module}:{card.hook.io} -> " + (f"{card.output_hook.module}:{card.output_hook.io}"
                                                        if card.output_hook else "(itself)")
    return {**row, "read as": f"{card.architecture}{' + W_skip' if card.skip else ''}", "hooks": where,
            "max |dy|": dy, "max |df|": df, "verdict": "equal" if max(dy, df) <= TOLERANCE else "differs"}


def compare_training(tokens: int, layer: int = 2, d_dict: int = 1024, k: int = 16) -> list[dict]:
    """SAE vs transcoder vs skip-transcoder at one MLP of the stand-in, trained from one pass, held-out stats."""
    import json
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dictionaries.recipe import Recipe
    from training import run as run_module
    from training.presets import preset
    from training.toymodel import standin_model_folder

    folder = standin_model_folder(progress=False)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    mlp = {"module": f"gpt_neox.layers.{layer}.mlp", "site": "mlp", "layer": layer}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.txt"
        data.write_text("\n\n".join(json.loads((folder / "documents.json").read_text())["train"]))
        common = dict(model={"id": str(folder)}, dataset={"path": str(data)}, context_length=64, tokens=tokens,
                      batch_size=1024, buffer_contexts=256, harvest_batch_size=32, d_dict=d_dict, k=k,
                      holdout_tokens=16384, optimizer={"lr": 1e-3, "warmup_steps": 20},
                      penalty={"aux_dead_tokens": tokens // 8})
        recipes = {"sae (topk, mlp_out)": preset("topk", hook={**mlp, "io": "output"}, **common),
                   "transcoder (topk)": preset("topk", hook={**mlp, "io": "input"}, output_hook=mlp,
                                               pre_encoder_bias=False, **common),
                   "skip-transcoder (paulo2025)": preset("paulo2025", hook={**mlp, "io": "input"}, output_hook=mlp,
                                                         **common)}
        start = time.perf_counter()
        folders = run_module.train([Recipe.model_validate(r) for r in recipes.values()], out=Path(tmp) / "out",
                                   model=model, tokenizer=tokenizer, names=[f"s/mlp{layer}/{i}" for i in range(3)],
                                   progress=False, checkpoint_every=10**9)
        seconds = time.perf_counter() - start
        rows = []
        for name, out in zip(recipes, folders):
            st = json.loads((out / "card.json").read_text())["stats"]
            rows.append({"peer": "dictionaries", "kind": name, "tokens": tokens, "fvu": st["fvu"], "l0": st["l0"],
                         "frac_alive": st["frac_alive"], "loss recovered": st["frac_loss_recovered"],
                         "ce clean/spliced/zero": f"{st['ce_clean']:.3f}/{st['ce_spliced']:.3f}/{st['ce_zero']:.3f}",
                         "seconds (all three)": round(seconds, 1)})
    return rows


def run() -> list[dict]:
    import os

    from benchmarks.peers import peer_version, python_for

    rows = compare_training(int(os.environ.get("BENCH_TRANSCODER_TOKENS", 393216)))
    for peer, kind in CASES:
        python, note = python_for(peer, build=False)
        if python is None:
            rows.append({"peer": peer, "kind": kind, "verdict": note})
            continue
        rows.append(_compare(peer, kind, python, peer_version(python, peer)))
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
