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
    why = ("signed top-k features are not non-negative" if cfg.get("signed") else
           f"activation {cfg.get('activation')!r}: only topk is supported"
           if cfg.get("activation", "topk") != "topk" else None)
    if why:
        raise FormatError(str(cfg_path), f"cannot read this sparse coder: {why}")
    if "d_in" not in cfg or "k" not in cfg:
        raise FormatError(str(cfg_path), "sparsify's cfg.json must hold d_in and k")
    d_in = int(cfg["d_in"])
    sizes = {"d": d_in, "F": int(cfg.get("num_latents") or d_in * int(cfg.get("expansion_factor", 32)))}
    state = load_safetensors(weights)
    skip = bool(cfg.get("skip_connection"))
    layout = {**SPARSIFY_LAYOUT, "W_skip": (("d", "d"), True)} if skip else SPARSIFY_LAYOUT
    check_layout(state, layout, weights, sizes, sizes_from=f"{cfg_path.name} (d_in, num_latents)")
    # encode: TopK of ReLU(W (x - b_dec) + b), without the b_dec shift when `transcode`; decode: the top
    # activations times W_dec rows + b_dec, plus x @ W_skip^T with skip_connection (stored [d_out, d_in])
    native = {"W_enc": state["encoder.weight"].T, "b_enc": state["encoder.bias"],
              "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
    if skip:
        native["W_skip"] = state["W_skip"].T.contiguous()
    transcode = bool(cfg.get("transcode"))
    found = Foreign("topk", native, int(cfg["k"]), not transcode, weights, [cfg_path, weights], transcoder=transcode)
    if cfg.get("multi_topk"):
        found.notes.append("trained with the Multi-TopK loss; inference keeps k")
    run_config = folder.parent / "config.json"
    run = read_json(run_config) if run_config.is_file() else {}
    found.model = model_id(run.get("model"))
    found.hook = sparsify_hook(found.model, folder.name)
    found.notes.append(f"sparsify hookpoint {folder.name!r}" + ("" if found.hook else
                       " (not mapped to a module path: the model is unknown; set card.hook by hand)"))
    if transcode:  # sparsify's transcoders read the hookpoint module's input and predict its output
        if found.hook is None:
            raise FormatError(str(cfg_path), f"a transcoder at hookpoint {folder.name!r} of an unknown model "
                                             f"({run.get('model')!r}): its input and output hook points cannot be "
                                             "placed")
        found.hook, found.output_hook = {**found.hook, "io": "input"}, found.hook
    return found
