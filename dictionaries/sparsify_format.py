"""Reader of EleutherAI sparsify folders (cfg.json + sae.safetensors) into native tensors."""

from __future__ import annotations

from pathlib import Path

from dictionaries.errors import FormatError
from dictionaries.files import load_safetensors, read_json, require
from dictionaries.foreign_formats import Foreign, Layout, check_layout
from dictionaries.hookpoints import (
    model_id,
    sparsify_hook,
)

# ---- sparsify -----------------------------------------------------------------------------------------
SPARSIFY_LAYOUT: Layout = {"encoder.weight": (("F", "d"), True), "encoder.bias": (("F",), True),
                           "W_dec": (("F", "d"), True), "b_dec": (("d",), True)}


def read_sparsify(folder: Path, *, architecture: str | None = None) -> Foreign:
    """EleutherAI sparsify: `cfg.json` + `sae.safetensors`, one folder per hookpoint (named after it)."""
    cfg_path = require(folder / "cfg.json", "sparsify")
    weights = require(folder / "sae.safetensors", "sparsify")
    cfg = read_json(cfg_path)
    why = ("transcoder: it predicts a module's output from its input" if cfg.get("transcode") else
           "skip connection (W_skip) is not part of any native kind" if cfg.get("skip_connection") else
           "signed top-k features are not non-negative" if cfg.get("signed") else
           f"activation {cfg.get('activation')!r}: only topk is supported"
           if cfg.get("activation", "topk") != "topk" else None)
    if why:
        raise FormatError(str(cfg_path), f"cannot read this sparse coder: {why}")
    if "d_in" not in cfg or "k" not in cfg:
        raise FormatError(str(cfg_path), "sparsify's cfg.json must hold d_in and k")
    d_in = int(cfg["d_in"])
    sizes = {"d": d_in, "F": int(cfg.get("num_latents") or d_in * int(cfg.get("expansion_factor", 32)))}
    state = load_safetensors(weights)
    check_layout(state, SPARSIFY_LAYOUT, weights, sizes, sizes_from=f"{cfg_path.name} (d_in, num_latents)")
    # encode: TopK of ReLU(W (x - b_dec) + b); decode: sum of the top activations times W_dec rows + b_dec
    native = {"W_enc": state["encoder.weight"].T, "b_enc": state["encoder.bias"],
              "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
    found = Foreign("topk", native, int(cfg["k"]), True, weights, [cfg_path, weights])
    if cfg.get("multi_topk"):
        found.notes.append("trained with the Multi-TopK loss; inference keeps k")
    run_config = folder.parent / "config.json"
    run = read_json(run_config) if run_config.is_file() else {}
    found.model = model_id(run.get("model"))
    found.hook = sparsify_hook(found.model, folder.name)
    found.notes.append(f"sparsify hookpoint {folder.name!r}" + ("" if found.hook else
                       " (not mapped to a module path: the model is unknown; set card.hook by hand)"))
    return found
