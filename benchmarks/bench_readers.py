"""Readers against SAELens' own converters: tiny copies of Gemma Scope, Goodfire and Llama Scope releases, laid out
as the releases are under their real repo ids on a local hub, read by this package (`load_dictionary("hf://...")`)
and by the real SAELens (`SAE.from_pretrained(repo, folder, converter=<its gemma_2 / goodfire / llama_scope
loader>)`, benchmarks/peer_loads.py), features and reconstructions of the same inputs compared.

Each reader is checked against the original's forward in the tests (tests/original_impls.py); this table says
where SAELens reads the same files the same way. Llama Scope is shown twice: with the release's settings
(dataset-wise input norm, JumpReLU on decoder-norm-weighted scores), where SAELens' loader compares with the
threshold times sqrt(d) / average norm and without the decoder norms (llama_scope_format.py), and with a unit
norm factor and unit decoder columns, where both readings coincide.

`python -m benchmarks readers`.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path

import torch

from benchmarks.bench_writers import D_IN, inputs, row, run_peer

F = 64


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(F, D_IN, generator=g) * 0.3
    return {"W_enc": W.T.clone(), "b_enc": torch.randn(F, generator=g) * 0.1, "W_dec": W.clone(),
            "b_dec": torch.randn(D_IN, generator=g) * 0.1, "threshold": torch.rand(F, generator=g) * 0.6}


def gemma_scope() -> dict:
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **{k: v.numpy() for k, v in _tensors(0).items()})
    return {"arch": "Gemma Scope (params.npz)", "repo": "google/gemma-scope-2b-pt-res",
            "sae_id": "layer_5/width_16k/average_l0_82", "converter": "gemma_2",
            "files": {"layer_5/width_16k/average_l0_82/params.npz": buffer.getvalue()}}


def goodfire() -> dict:
    t = _tensors(1)
    buffer = io.BytesIO()
    torch.save({"encoder_linear.weight": t["W_enc"].T.contiguous(), "encoder_linear.bias": t["b_enc"],
                "decoder_linear.weight": t["W_dec"].T.contiguous(), "decoder_linear.bias": t["b_dec"]}, buffer)
    name = "Llama-3.1-8B-Instruct-SAE-l19.pth"
    return {"arch": "Goodfire (.pth)", "repo": "Goodfire/Llama-3.1-8B-Instruct-SAE-l19", "sae_id": name,
            "subfolder": "", "converter": "goodfire", "files": {name: buffer.getvalue()}}


def llama_scope(average_norm: float, unit_decoder: bool, label: str, layer: int) -> dict:
    from safetensors.torch import save

    t = _tensors(2)
    dec = t["W_dec"].T.contiguous()                                               # [d, F]
    dec = dec / dec.norm(dim=0) if unit_decoder else dec * 1.7
    state = {"encoder.weight": t["W_enc"].T.contiguous(), "encoder.bias": t["b_enc"], "decoder.weight": dec,
             "decoder.bias": t["b_dec"]}
    hook = f"blocks.{layer}.hook_resid_post"
    cfg = {"d_model": D_IN, "d_sae": F, "act_fn": "jumprelu", "jump_relu_threshold": 0.25, "top_k": 50,
           "norm_activation": "dataset-wise", "dataset_average_activation_norm": {"in": average_norm,
                                                                                 "out": average_norm},
           "use_decoder_bias": True, "apply_decoder_bias_to_pre_encoder": False, "sparsity_include_decoder_norm": True,
           "hook_point_in": hook, "hook_point_out": hook}
    folder = f"Llama3_1-8B-Base-L{layer}R-8x"  # one folder per case: SAELens reads the repo's main
    return {"arch": f"Llama Scope ({label})", "repo": "fnlp/Llama3_1-8B-Base-LXR-8x", "sae_id": folder,
            "converter": "llama_scope", "norm_scaling_factor": math.sqrt(D_IN) / average_norm,
            "files": {f"{folder}/hyperparams.json": json.dumps(cfg, indent=2).encode(),
                      f"{folder}/checkpoints/final.safetensors": save(state)}}


def cases() -> list[dict]:
    return [gemma_scope(), goodfire(),
            llama_scope(9.5, False, "release settings: norm factor 0.6, decoder norms 1.7", layer=7),
            llama_scope(math.sqrt(D_IN), True, "norm factor 1, unit decoder columns", layer=8)]


def run(workdir: str | None = None) -> list[dict]:
    """The rows; `workdir` keeps the hub, caches and the peer's outputs there (default: a temporary folder)."""
    from dictionaries.loader import load_dictionary
    from dictionaries.localhub import LocalHub

    with tempfile.TemporaryDirectory(prefix="bench-readers-") as scratch:
        tmp = Path(workdir or scratch)
        hub = LocalHub(tmp / "hub").start()
        saved = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_HOME", "HF_HUB_OFFLINE")}
        try:
            os.environ.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp / "hf"))
            os.environ.pop("HF_HUB_OFFLINE", None)
            ours, items = {}, []
            for i, case in enumerate(cases()):
                sha = hub.commit(case["repo"], case.pop("files"), "release copy")
                sub = case.get("subfolder", case["sae_id"])
                d = load_dictionary(f"hf://{case['repo']}" + (f"/{sub}" if sub else "") + f"@{sha}")
                with torch.no_grad():
                    ours[case["arch"]] = d(inputs())
                items.append({**case, "name": f"case{i}",
                              "how": f"ours: {d.card.files.format} reader; SAELens: {case['converter']} converter"})
            results = run_peer("saelens", items, tmp, dict(os.environ), loader="saelens_converter")
        finally:
            hub.stop()
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return [row("saelens", item, ours[item["arch"]], results[item["name"]]) for item in items]


if __name__ == "__main__":
    for r in run():
        print(r)
