"""Peers' transcoders read here against the peers' own forward: each peer, in its own virtual environment
(benchmarks/peers.py), builds its transcoder class with random weights, saves it with its own save method and
runs its own forward on fixed inputs; `read_folder` then reads that folder and predicts the same inputs.
One row per kind: the largest |difference| of the prediction and of the features (float32 on both sides).

SAELens: Transcoder, SkipTranscoder, JumpReLUTranscoder, JumpReLUSkipTranscoder (saes/transcoder.py);
sparsify: SparseCoder with `transcode` (with and without `skip_connection`) and an SAE with `skip_connection`.

`python -m benchmarks transcoders`
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


def run() -> list[dict]:
    from benchmarks.peers import peer_version, python_for

    rows = []
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
