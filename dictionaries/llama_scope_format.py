"""Reader of Llama Scope folders (fnlp/Llama-Scope: `hyperparams.json` + `checkpoints/final.safetensors`).

Llama Scope (He et al. 2024, "Llama Scope: Extracting Millions of Features from Llama-3.1-8B with Sparse
Autoencoders", arXiv:2410.20526) was trained with OpenMOSS' Language-Model-SAEs (`lm_saes`). Repos
`fnlp/Llama3_1-8B-Base-LX{R,A,M}-{8,32}x` hold one folder per layer, `Llama3_1-8B-Base-L<L><R|A|M>-<n>x/`. The
weights are `torch.nn.Linear` state dicts: `encoder.weight [F, d]`, `encoder.bias [F]`, `decoder.weight [d, F]`,
`decoder.bias [d]` (when `use_decoder_bias`), and a per-feature `log_jumprelu_threshold [F]` in later versions.
The forward, from `lm_saes` `SparseAutoEncoder.compute_norm_factor`, `encode`, `decode` and `compute_loss`
(which divides the reconstruction by the output norm factor to return to activation units):

    s_in  = sqrt(d) / dataset_average_activation_norm[in]    (norm_activation "dataset-wise"; 1 for "inference")
    x'    = x * s_in  (- decoder.bias when apply_decoder_bias_to_pre_encoder)
    h     = x' @ encoder.weight.T + encoder.bias                                  (..., F)
    score = h * ||decoder.weight[:, i]||   when sparsity_include_decoder_norm, else h
    f     = h * (score > theta)     (jumprelu; theta = jump_relu_threshold, or exp(log_jumprelu_threshold))
    x_hat = (f @ decoder.weight.T + decoder.bias) / s_out                         (..., d)

Represented exactly as a native jumprelu (relu for act_fn relu) without pre-encoder bias: W_enc = s_in *
encoder.weight.T, b_enc = encoder.bias (- decoder.bias @ encoder.weight.T when the pre-encoder subtraction is
on), threshold_i = theta_i / ||decoder column i||, W_dec = decoder.weight.T / s_out, b_dec = decoder.bias / s_out:
the features are the original's f and the reconstruction its x_hat. Missing fields take lm_saes' defaults
(`SAEConfig`: sparsity_include_decoder_norm True, use_decoder_bias True, apply_decoder_bias_to_pre_encoder False,
norm_activation dataset-wise, act_fn relu, jump_relu_threshold 0). Refused with a FormatError saying why: token-
or batch-wise normalisation (a different rescaling per input), TopK / BatchTopK (the original keeps every
pre-activation at least the k-th largest clamped score, so it passes negative ones when fewer than k are
positive, and BatchTopK depends on the batch), GLU encoders and transcoders (hook_point_in != hook_point_out).

SAELens' `get_llama_scope_config_from_hf` reads the same files differently (its threshold is the scalar
multiplied by s_in, and it ignores sparsity_include_decoder_norm); this reader follows the code that wrote them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from dictionaries.errors import FormatError
from dictionaries.files import load_safetensors, read_json, require
from dictionaries.foreign_formats import Foreign, Layout, check_layout
from dictionaries.hookpoints import saelens_hook

LLAMA_SCOPE_WEIGHTS = "checkpoints/final.safetensors"
LLAMA_SCOPE_LAYOUT: Layout = {"encoder.weight": (("F", "d"), True), "encoder.bias": (("F",), True),
                              "decoder.weight": (("d", "F"), True), "decoder.bias": (("d",), False),
                              "log_jumprelu_threshold": (("F",), False)}
_MODELS = {"Llama3_1-8B-Base": "meta-llama/Llama-3.1-8B", "Llama3_1-8B-Instruct": "meta-llama/Llama-3.1-8B-Instruct"}


def read_llama_scope(folder: Path, *, architecture: str | None = None) -> Foreign:
    """`hyperparams.json` + `checkpoints/final.safetensors`, the weights folded into a native kind exactly."""
    cfg_path = require(folder / "hyperparams.json", "Llama Scope")
    weights = require(folder / LLAMA_SCOPE_WEIGHTS, "Llama Scope")
    cfg = read_json(cfg_path)
    _refuse_unrepresentable(cfg, cfg_path)
    raw = load_safetensors(weights)
    state = {k: v for k, v in raw.items() if not k.startswith("dataset_average_activation_norm.")}
    sizes = {k: int(cfg[n]) for k, n in (("d", "d_model"), ("F", "d_sae")) if cfg.get(n) is not None}
    dims = check_layout(state, LLAMA_SCOPE_LAYOUT, weights, sizes, sizes_from=f"{cfg_path.name} (d_model, d_sae)")
    # bf16 releases: fold in float32 so the rescaling adds no rounding of its own
    state = {k: v.float() if v.dtype in (torch.bfloat16, torch.float16) else v for k, v in state.items()}
    s_in, s_out, how = _norm_factors(cfg, raw, dims["d"], cfg_path)
    W, b = state["encoder.weight"], state["encoder.bias"]                      # [F, d], [F]
    D = state["decoder.weight"]                                                # [d, F]
    b_dec = state.get("decoder.bias", torch.zeros(dims["d"], dtype=W.dtype))
    b_enc = b - b_dec @ W.T if cfg.get("use_decoder_bias", True) and cfg.get("apply_decoder_bias_to_pre_encoder") \
        else b
    native = {"W_enc": W.T * s_in, "b_enc": b_enc, "W_dec": D.T / s_out, "b_dec": b_dec / s_out}
    act = str(cfg.get("act_fn", "relu")).lower()
    found = Foreign("jumprelu" if act == "jumprelu" else "relu", native, None, False, weights, [cfg_path, weights])
    if act == "jumprelu":
        theta = _threshold(cfg, state, dims["F"], cfg_path)
        if cfg.get("sparsity_include_decoder_norm", True):
            # score > theta with score = h * n_i (n_i > 0) is h > theta / n_i: a per-feature native threshold
            theta = theta / D.norm(dim=0).clamp(min=1e-12)
        native["threshold"] = theta.to(W.dtype)
    found.notes.append(f"Llama Scope ({act}); {how}")
    if act == "jumprelu" and s_in != 1.0:
        found.notes.append(f"read as lm_saes computes it; SAELens' loader would compare with the threshold times "
                           f"{s_in:.6g} instead")
    found.model, found.hook = _model_and_hook(cfg, folder)
    return found


def _refuse_unrepresentable(cfg: dict, path: Path) -> None:
    act = str(cfg.get("act_fn", "relu")).lower()
    norm = cfg.get("norm_activation", "dataset-wise")
    why = ("act_fn topk: the original keeps every pre-activation at least the k-th largest clamped score, passing "
           "negative ones when fewer than k are positive; no native kind does" if act == "topk" else
           "act_fn batchtopk: which features fire depends on the rest of the batch" if act == "batchtopk" else
           f"unknown act_fn {act!r} (known: relu, jumprelu)" if act not in ("relu", "jumprelu") else
           f"norm_activation {norm!r} rescales every input by its own norm at run time, which no affine dictionary "
           "represents" if norm in ("token-wise", "batch-wise") else
           f"unknown norm_activation {norm!r}" if norm not in ("dataset-wise", "inference") else
           "a GLU encoder (use_glu_encoder) is no native kind" if cfg.get("use_glu_encoder") else
           f"a transcoder: it reads {cfg.get('hook_point_in')} and reconstructs {cfg.get('hook_point_out')}"
           if cfg.get("hook_point_out") not in (None, cfg.get("hook_point_in")) else None)
    if why:
        raise FormatError(str(path), f"cannot read this Llama Scope SAE: {why}")


def _norm_factors(cfg: dict, raw: dict, d: int, path: Path) -> tuple[float, float, str]:
    """(s_in, s_out): lm_saes' dataset-wise factors sqrt(d) / average norm, 1 in "inference" mode."""
    if cfg.get("norm_activation", "dataset-wise") == "inference":
        return 1.0, 1.0, "no input normalisation (norm_activation inference)"
    averages: dict[str, Any] = dict(cfg.get("dataset_average_activation_norm") or {})
    averages.update({k.split(".", 1)[1]: float(v) for k, v in raw.items()
                     if k.startswith("dataset_average_activation_norm.")})

    def average(side: str) -> float:
        value = averages.get(cfg.get(f"hook_point_{side}")) or averages.get(side)
        if not value or not math.isfinite(float(value)) or float(value) <= 0:
            raise FormatError(str(path), f"norm_activation dataset-wise needs dataset_average_activation_norm "
                                         f"of the {side}put ({side!r} or its hook point), a positive number; "
                                         f"found {averages or 'none'}")
        return float(value)

    s_in, s_out = math.sqrt(d) / average("in"), math.sqrt(d) / average("out")
    return s_in, s_out, f"dataset-wise norm factors folded into the weights (in {s_in:.6g}, out {s_out:.6g})"


def _threshold(cfg: dict, state: dict, n: int, path: Path) -> torch.Tensor:
    if "log_jumprelu_threshold" in state:
        return state["log_jumprelu_threshold"].exp()
    theta = cfg.get("jump_relu_threshold", 0.0)
    if theta is None or not math.isfinite(float(theta)) or float(theta) < 0:
        raise FormatError(str(path), f"a jumprelu SAE needs jump_relu_threshold >= 0 (or log_jumprelu_threshold "
                                     f"in the weights); found {theta!r}")
    return torch.full((n,), float(theta), dtype=state["encoder.weight"].dtype)


def _model_and_hook(cfg: dict, folder: Path) -> tuple[str | None, dict | None]:
    """The model (hyperparams' model_name, else the release's folder name) and the hook point of hook_point_in
    (a TransformerLens name such as blocks.15.hook_resid_post)."""
    model = cfg.get("model_name")
    name = folder.resolve().name
    if not model:
        model = next((hf for prefix, hf in _MODELS.items() if name.startswith(prefix)), None)
    hook_name = cfg.get("hook_point_in")
    if hook_name is None:
        m = re.search(r"-L(\d+)([RAM])-", name)
        hook_name = m and f"blocks.{m.group(1)}." + {"R": "hook_resid_post", "A": "hook_attn_out",
                                                      "M": "hook_mlp_out"}[m.group(2)]
    return model, saelens_hook(model, hook_name)
