"""The peer side of the dashboard benchmark: SAEDashboard's feature-data generation, timed, on given weights and tokens.

Run in the `saedashboard` venv (benchmarks/peers.py) as `python benchmarks/peer_dashboard.py FOLDER`. The folder
holds `job.json` (hook point, k, feature count, device, minibatch sizes), `sae.safetensors` (the dictionary in
native layout, which is SAELens' own: W_enc [d, F], b_enc [F], W_dec [F, d], b_dec [d]) and `tokens.safetensors`
(`ids`, (rows, context)). The model is TransformerLens' HookedTransformer built from Pythia-70m's config with
random weights (the same shapes, so the same cost as the real model; its weights are not ours). Only
`SaeVisRunner.run` is timed (data generation; no HTML). Writes `result.json`, or `error.txt` with one line.
Module level imports the standard library only, so the file imports anywhere.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path


def pythia70m_tl_config(vocab: int, device: str):
    """Pythia-70m(-deduped) as TransformerLens converts it (GPTNeoX: parallel attention + MLP, rotary 16 of 64)."""
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        n_layers=6, d_model=512, n_heads=8, d_head=64, d_mlp=2048, d_vocab=vocab, n_ctx=2048, act_fn="gelu",
        normalization_type="LN", positional_embedding_type="rotary", rotary_dim=16, rotary_adjacent_pairs=False,
        parallel_attn_mlp=True, original_architecture="GPTNeoXForCausalLM", device=device, seed=0)


def build_sae(state: dict, job: dict):
    """SAELens' TopKSAE holding the given tensors, reading `job['hook_point']`."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    d_in, d_sae = state["W_enc"].shape
    # the decoder rows are unit-norm, so rescaling by their norm changes nothing; SaeVisRunner's fold_W_dec_norm
    # refuses a TopKSAE without it
    cfg = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=job["k"], device=job["device"], apply_b_dec_to_input=True,
                        rescale_acts_by_decoder_norm=True,
                        metadata=SAEMetadata(hook_name=job["hook_point"], model_name="pythia-70m-deduped"))
    sae = TopKSAE(cfg)
    sae.load_state_dict({k: v for k, v in state.items()}, strict=False)
    return sae.to(job["device"])


def run(folder: Path) -> dict:
    import torch
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner
    from sae_lens import HookedSAETransformer
    from safetensors.torch import load_file

    job = json.loads((folder / "job.json").read_text())
    torch.manual_seed(0)
    tokens = load_file(str(folder / "tokens.safetensors"))["ids"].to(job["device"])
    model = HookedSAETransformer(pythia70m_tl_config(job["vocab"], job["device"])).eval()
    sae = build_sae(load_file(str(folder / "sae.safetensors")), job)
    cfg = SaeVisConfig(hook_point=job["hook_point"], features=list(range(job["features"])),
                       minibatch_size_tokens=job["minibatch_size_tokens"],
                       minibatch_size_features=job["minibatch_size_features"], device=job["device"], verbose=False)
    start = time.perf_counter()
    data = SaeVisRunner(cfg).run(encoder=sae, model=model, tokens=tokens)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    import importlib.metadata as m
    return {"seconds": seconds, "features_with_data": len(data.feature_data_dict),
            "versions": {n: m.version(n) for n in ("sae-dashboard", "sae-lens", "transformer-lens", "torch")}}


def main(argv: list[str]) -> int:
    folder = Path(argv[0])
    try:
        (folder / "result.json").write_text(json.dumps(run(folder)))
    except Exception as e:  # noqa: BLE001 - the parent shows the one line
        traceback.print_exc()
        (folder / "error.txt").write_text(f"{type(e).__name__}: {e}".splitlines()[0][:300] + "\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
