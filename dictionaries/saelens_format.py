"""Reader of SAELens folders (cfg.json + sae_weights.safetensors) into native tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dictionaries.errors import FormatError
from dictionaries.files import load_safetensors, read_json, require
from dictionaries.foreign_formats import Foreign, Layout, check_layout
from dictionaries.hookpoints import (
    model_id,
    saelens_hook,
)

# ---- SAELens ----------------------------------------------------------------------------------------
_SL_BASE: Layout = {"W_enc": (("d", "F"), True), "b_enc": (("F",), True), "W_dec": (("F", "d"), True),
                    "b_dec": (("d",), True), "scaling_factor": (("F",), False)}
SAELENS_LAYOUTS: dict[str, Layout] = {
    "standard": _SL_BASE,
    "topk": _SL_BASE,
    "jumprelu": {**_SL_BASE, "threshold": (("F",), True)},
    "gated": {"W_enc": (("d", "F"), True), "b_gate": (("F",), True), "b_mag": (("F",), True),
              "r_mag": (("F",), True), "W_dec": (("F", "d"), True), "b_dec": (("d",), True),
              "scaling_factor": (("F",), False)},
    # training checkpoints; SAELens saves their inference form as jumprelu with the threshold spread out
    "batchtopk": {**_SL_BASE, "topk_threshold": ((), True)},
    "matryoshka_batchtopk": {**_SL_BASE, "topk_threshold": ((), True)},
}
_SL_ARCHITECTURE = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated",
                    "batchtopk": "batchtopk", "matryoshka_batchtopk": "batchtopk"}
# Transcoders (SAELens' saes/transcoder.py): W_dec [d_sae, d_out], b_dec [d_out], no b_dec on the input
# (apply_b_dec_to_input must be false), skip kinds add x @ W_skip.T with W_skip [d_out, d_in] stored.
_SL_TRANSCODER: Layout = {"W_enc": (("d", "F"), True), "b_enc": (("F",), True), "W_dec": (("F", "o"), True),
                          "b_dec": (("o",), True)}
SAELENS_TRANSCODERS: dict[str, tuple[str, Layout]] = {
    "transcoder": ("relu", _SL_TRANSCODER),
    "skip_transcoder": ("relu", {**_SL_TRANSCODER, "W_skip": (("o", "d"), True)}),
    "jumprelu_transcoder": ("jumprelu", {**_SL_TRANSCODER, "threshold": (("F",), True)}),
    "jumprelu_skip_transcoder": ("jumprelu", {**_SL_TRANSCODER, "threshold": (("F",), True),
                                              "W_skip": (("o", "d"), True)}),
}
SAELENS_UNREPRESENTABLE = {
    "abstopk": "it keeps the k largest |pre-activations| with their sign; native features are non-negative",
    "temporal": "it attends over previous tokens",
    "matching_pursuit": "its encoder is iterative matching pursuit, not one affine map",
}


def _saelens_config(cfg: dict) -> dict:
    """cfg.json flattened the way SAELens reads it: `metadata` (6.x) merged in, pre-6.0 names mapped."""
    flat = {**cfg, **(cfg.get("metadata") or {})}
    flat.setdefault("hook_name", flat.get("hook_point"))
    activation = flat.get("activation_fn") or flat.get("activation_fn_str") or "relu"
    architecture = flat.get("architecture") or "standard"
    if architecture == "standard" and activation == "topk":  # pre-6.0 topk SAEs
        architecture, flat["k"] = "topk", (flat.get("activation_fn_kwargs") or {}).get("k", flat.get("k"))
    if architecture == "standard" and activation != "relu":
        raise FormatError("cfg.json", f"activation function {activation!r}: only ReLU standard SAEs are supported")
    norm = flat.get("normalize_activations")
    flat["normalize_activations"] = {True: "expected_average_only_in", False: "none", None: "none"}.get(norm, norm)
    flat["architecture"] = architecture
    return flat


def read_saelens(folder: Path, *, architecture: str | None = None) -> Foreign:
    """`cfg.json` + `sae_weights.safetensors` (SAELens 6.x, and the flat pre-6.0 configs)."""
    cfg_path = require(folder / "cfg.json", "SAELens")
    weights = require(folder / "sae_weights.safetensors", "SAELens")
    try:
        cfg = _saelens_config(read_json(cfg_path))
    except FormatError as e:
        raise FormatError(str(cfg_path), e.problem) from None
    arch = cfg["architecture"]
    if arch in SAELENS_TRANSCODERS:
        return _read_transcoder(cfg, cfg_path, weights)
    if arch in SAELENS_UNREPRESENTABLE:
        raise FormatError(str(cfg_path),
                          f"SAELens architecture {arch!r} cannot be read: {SAELENS_UNREPRESENTABLE[arch]}")
    if arch not in SAELENS_LAYOUTS:
        raise FormatError(str(cfg_path), f"unknown SAELens architecture {arch!r}; known: {', '.join(SAELENS_LAYOUTS)}")
    if cfg.get("hook_head_index") is not None:
        raise FormatError(str(cfg_path), "hook_head_index: the SAE reads one attention head, which has no hook point")
    if cfg["normalize_activations"] in ("constant_norm_rescale", "layer_norm", "covariance_whitening"):
        raise FormatError(str(cfg_path), f"normalize_activations={cfg['normalize_activations']!r} rescales every "
                                         "token at run time, which no affine dictionary can represent")
    state = load_safetensors(weights)
    sizes = {k: int(cfg[n]) for k, n in (("d", "d_in"), ("F", "d_sae")) if cfg.get(n) is not None}
    check_layout(state, SAELENS_LAYOUTS[arch], weights, sizes, sizes_from=f"{cfg_path.name} (d_in, d_sae)")
    dtype = getattr(torch, str(cfg.get("dtype") or "float32").removeprefix("torch."), None)
    state = {k: v.to(dtype) if isinstance(dtype, torch.dtype) else v for k, v in state.items()}
    found = Foreign(_SL_ARCHITECTURE[arch], {}, None, bool(cfg.get("apply_b_dec_to_input", True)), weights,
                    [cfg_path, weights])
    found.notes.append(f"SAELens architecture {arch}")
    _saelens_fold(state, cfg, folder, found)
    found.state = {"W_enc": state["W_enc"], "b_enc": state["b_gate" if arch == "gated" else "b_enc"],
                   "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
    if arch == "gated":
        found.state.update(r_mag=state["r_mag"], b_mag=state["b_mag"])
    elif arch == "jumprelu":
        found.state["threshold"] = state["threshold"]
    elif arch in ("batchtopk", "matryoshka_batchtopk"):
        found.state["threshold"] = state["topk_threshold"].to(state["W_enc"].dtype)
    if found.architecture in ("topk", "batchtopk"):
        found.k = _integer_k(cfg.get("k"), cfg_path, found)
    found.model = model_id(cfg.get("model_name"))
    found.hook = saelens_hook(found.model, cfg.get("hook_name"))
    if cfg.get("hook_name") and found.hook is None:
        found.notes.append(f"hook {cfg['hook_name']!r} of model {cfg.get('model_name')!r} has no known module "
                           "path: set card.hook by hand")
    if cfg.get("model_from_pretrained_kwargs"):
        found.notes.append(f"trained on TransformerLens activations with {cfg['model_from_pretrained_kwargs']}")
    return found


def _integer_k(k: Any, path: Path, found: Foreign) -> int:
    if k is None:
        raise FormatError(str(path), "a topk/batchtopk SAE needs k in cfg.json")
    if float(k) != int(k):
        found.notes.append(f"k={k} (mean active features per token) rounded up to {int(k) + 1}")
        return int(k) + 1
    return int(k)


def _saelens_fold(state: dict[str, Tensor], cfg: dict, folder: Path, found: Foreign) -> None:
    """Fold SAELens' run-time rescalings into the weights, each exactly (in place on `state`)."""
    scale = cfg.get("norm_scaling_factor")
    scaler = folder / "activation_scaler.json"
    if scale is None and scaler.is_file():
        scale = read_json(scaler).get("scaling_factor")
    if cfg["normalize_activations"] == "expected_average_only_in":
        if scale is None:
            found.notes.append("normalize_activations=expected_average_only_in but no scaling factor in the "
                               "folder: weights used as stored, as SAELens' load_from_disk does")
        else:
            # SAELens' fold_activation_norm_scaling_factor: the SAE saw x * s. (x - b_dec / s) @ (s W_enc)
            # = (x s - b_dec) @ W_enc, and unscaling the output divides W_dec and b_dec by s: exact.
            state["W_enc"], state["W_dec"], state["b_dec"] = state["W_enc"] * scale, state["W_dec"] / scale, \
                state["b_dec"] / scale
            if cfg.get("rescale_acts_by_decoder_norm") and "topk_threshold" in state:
                state["topk_threshold"] = state["topk_threshold"] / scale
            found.notes.append(f"activation norm scaling factor {scale} folded into the weights")
    if cfg.get("rescale_acts_by_decoder_norm"):
        # topk selects on pre * ||W_dec_i|| and decodes f / ||W_dec_i||: scaling encoder column i and b_enc_i
        # by n_i and decoder row i by 1 / n_i gives the same selection and output (SAELens' fold_W_dec_norm)
        n = state["W_dec"].norm(dim=-1).clamp(min=1e-8)
        state["W_enc"], state["b_enc"], state["W_dec"] = state["W_enc"] * n, state["b_enc"] * n, \
            state["W_dec"] / n[:, None]
        found.notes.append("decoder norms folded into the encoder (rescale_acts_by_decoder_norm)")
    if "scaling_factor" in state:
        # pre-6.0 finetuning scaling factor: decode((f * s) @ W_dec) = f @ (s[:, None] * W_dec), exact
        s = state.pop("scaling_factor")
        state["W_dec"] = state["W_dec"] * s[:, None]
        if not torch.equal(s, torch.ones_like(s)):
            found.notes.append("finetuning scaling factor folded into the decoder")


def _read_transcoder(cfg: dict, cfg_path: Path, weights: Path) -> Foreign:
    """A SAELens (skip-, jumprelu-) transcoder: native transcoder tensors, input and output hooks placed.

    SAELens encodes relu(x W_enc + b_enc) (jumprelu: times pre > threshold) with no b_dec on the input and
    predicts f W_dec + b_dec (+ x W_skip^T, from the raw input), so the tensors carry over, W_skip transposed.
    """
    arch = cfg["architecture"]
    kind, layout = SAELENS_TRANSCODERS[arch]
    if cfg.get("apply_b_dec_to_input"):
        raise FormatError(str(cfg_path), "apply_b_dec_to_input is true, which SAELens itself refuses for transcoders")
    if cfg["normalize_activations"] != "none" or cfg.get("rescale_acts_by_decoder_norm") or cfg.get("hook_head_index"):
        raise FormatError(str(cfg_path), "a transcoder with normalize_activations, rescale_acts_by_decoder_norm or "
                                         "hook_head_index is not supported")
    state = load_safetensors(weights)
    sizes = {k: int(cfg[n]) for k, n in (("d", "d_in"), ("F", "d_sae"), ("o", "d_out")) if cfg.get(n) is not None}
    check_layout(state, layout, weights, sizes, sizes_from=f"{cfg_path.name} (d_in, d_sae, d_out)")
    dtype = getattr(torch, str(cfg.get("dtype") or "float32").removeprefix("torch."), None)
    state = {k: v.to(dtype) if isinstance(dtype, torch.dtype) else v for k, v in state.items()}
    if "W_skip" in state:
        state["W_skip"] = state["W_skip"].T.contiguous()            # [d_out, d_in] -> native [d_in, d_out]
    found = Foreign(kind, state, None, False, weights, [cfg_path, weights], transcoder=True)
    found.notes.append(f"SAELens architecture {arch}")
    found.model = model_id(cfg.get("model_name"))
    names = {"hook_name": cfg.get("hook_name"), "hook_name_out": cfg.get("hook_name_out") or cfg.get("hook_name")}
    if not cfg.get("hook_name_out"):  # SAELens then writes at the input hook (HookedSAETransformer, SAE bridge)
        found.notes.append("no hook_name_out: the prediction is written at the hook it reads, as SAELens does")
    found.hook, found.output_hook = (saelens_hook(found.model, n) for n in names.values())
    for key, name in names.items():
        if not name or (found.hook if key == "hook_name" else found.output_hook) is None:
            raise FormatError(str(cfg_path), f"the transcoder's {key} {name!r} (model {cfg.get('model_name')!r}) "
                                             "has no known module path, and a transcoder needs both hook points")
    return found
