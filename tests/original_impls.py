"""The original implementations' forward passes, for checking the foreign-format readers against.

Written from the published source of each library, on the raw tensors as that library saves them, and
independently of `dictionaries/` (no import from it): dictionary_learning 0.1.0 (`dictionary.py`,
`trainers/top_k.py`, `trainers/batch_top_k.py`, `trainers/matryoshka_batch_top_k.py`, `utils.load_dictionary`),
SAELens 6.x (`saes/*_sae.py`, `saes/transcoder.py`, `training/activation_scaler.py`) and EleutherAI sparsify 1.3
(`sparse_coder.py`, `fused_encoder.py`), Gemma Scope (the tutorial), Llama Scope (`lm_saes` `sae.py`) and
Goodfire (the model card). The packages themselves are not test dependencies: each imports in
several seconds and dictionary_learning would replace torch and nnsight.
Each function returns (x_hat, f) with f dense (..., F).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.functional import relu


def _scatter_topk(values: Tensor, indices: Tensor, like: Tensor) -> Tensor:
    return torch.zeros_like(like).scatter_(-1, indices, values)


# ---- dictionary_learning: the module that `utils.load_dictionary` returns -----------------------------
def dl_autoencoder(s: dict, x: Tensor) -> tuple[Tensor, Tensor]:
    enc_w, enc_b, dec_w = s["encoder.weight"], s["encoder.bias"], s["decoder.weight"]
    norms = torch.norm(dec_w, dim=0)  # from_pretrained(normalize_decoder=True)
    if not torch.allclose(norms, torch.ones_like(norms)):
        dec_w, enc_w, enc_b = dec_w / norms, enc_w * norms[:, None], enc_b * norms
    f = relu((x - s["bias"]) @ enc_w.T + enc_b)
    return f @ dec_w.T + s["bias"], f


def dl_autoencoder_new(s: dict, x: Tensor) -> tuple[Tensor, Tensor]:
    f = relu(x @ s["encoder.weight"].T + s["encoder.bias"])
    return f @ s["decoder.weight"].T + s["decoder.bias"], f


def dl_gated(s: dict, x: Tensor) -> tuple[Tensor, Tensor]:
    x_enc = (x - s["decoder_bias"]) @ s["encoder.weight"].T
    f_gate = (x_enc + s["gate_bias"] > 0).to(x.dtype)
    f = f_gate * relu(s["r_mag"].exp() * x_enc + s["mag_bias"])
    return f @ s["decoder.weight"].T + s["decoder_bias"], f


def dl_jumprelu(s: dict, x: Tensor) -> tuple[Tensor, Tensor]:
    pre = x @ s["W_enc"] + s["b_enc"]  # apply_b_dec_to_input is False after from_pretrained
    f = relu(pre * (pre > s["threshold"]))
    return f @ s["W_dec"] + s["b_dec"], f


def dl_topk(s: dict, x: Tensor) -> tuple[Tensor, Tensor]:
    post = relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
    top = post.topk(int(s["k"]), sorted=False, dim=-1)
    f = _scatter_topk(top.values, top.indices, post)
    return f @ s["decoder.weight"].T + s["b_dec"], f


def dl_batchtopk(s: dict, x: Tensor) -> tuple[Tensor, Tensor]:
    post = relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
    f = post * (post > s["threshold"])  # use_threshold=True, the default of encode
    return f @ s["decoder.weight"].T + s["b_dec"], f


def dl_matryoshka(s: dict, x: Tensor) -> tuple[Tensor, Tensor]:
    post = relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])
    f = post * (post > s["threshold"])
    f[..., int(s["group_sizes"].sum()):] = 0  # every group active: zeroes nothing
    return f @ s["W_dec"] + s["b_dec"], f


DICTIONARY_LEARNING = {"AutoEncoder": dl_autoencoder, "AutoEncoderNew": dl_autoencoder_new,
                       "GatedAutoEncoder": dl_gated, "JumpReluAutoEncoder": dl_jumprelu,
                       "AutoEncoderTopK": dl_topk, "BatchTopKSAE": dl_batchtopk,
                       "MatryoshkaBatchTopKSAE": dl_matryoshka}


# ---- SAELens: SAE.load_from_disk, with the activation scaler of a training run applied around it ------
def saelens(cfg: dict, s: dict, x: Tensor, scaling_factor: float | None = None) -> tuple[Tensor, Tensor]:
    arch = cfg.get("architecture", "standard")
    if arch == "standard" and cfg.get("activation_fn_str") == "topk":
        arch, cfg = "topk", {**cfg, "k": cfg["activation_fn_kwargs"]["k"]}
    if scaling_factor is not None:  # ActivationScaler.scale
        x = x * scaling_factor
    sae_in = x - s["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    norm = s["W_dec"].norm(dim=-1) if cfg.get("rescale_acts_by_decoder_norm") else None
    if arch == "gated":
        gate = (sae_in @ s["W_enc"] + s["b_gate"] > 0).to(x.dtype)
        f = gate * relu(sae_in @ (s["W_enc"] * s["r_mag"].exp()) + s["b_mag"])
    else:
        hidden = sae_in @ s["W_enc"] + s["b_enc"]
        if norm is not None:
            hidden = hidden * norm
        if arch == "standard":
            f = relu(hidden)
        elif arch == "topk":
            top = torch.topk(hidden, k=cfg["k"], dim=-1, sorted=False)
            f = _scatter_topk(top.values.relu(), top.indices, hidden)
        elif arch == "jumprelu":
            f = relu(hidden) * (hidden > s["threshold"]).to(x.dtype)
        else:  # batchtopk checkpoints: inference is JumpReLU at the learnt global threshold
            f = relu(hidden) * (hidden > s["topk_threshold"]).to(x.dtype)
    acts = f if norm is None else f * (1 / norm)
    if "scaling_factor" in s:  # pre-6.0 apply_finetuning_scaling_factor
        acts = acts * s["scaling_factor"]
    x_hat = acts @ s["W_dec"] + s["b_dec"]
    if scaling_factor is not None:  # ActivationScaler.unscale
        x_hat = x_hat / scaling_factor
    return x_hat, f


# ---- sparsify: SparseCoder.encode / decode -------------------------------------------------------------
def sparsify(cfg: dict, s: dict, x: Tensor) -> tuple[Tensor, Tensor]:
    sae_in = x if cfg.get("transcode") else x - s["b_dec"]          # encode: no b_dec shift for transcoders
    pre = relu(sae_in @ s["encoder.weight"].T + s["encoder.bias"])
    top_acts, top_indices = torch.topk(pre, cfg["k"], dim=-1, sorted=False)
    flat_idx, flat_acts = top_indices.reshape(-1, cfg["k"]), top_acts.reshape(-1, cfg["k"])
    y = torch.nn.functional.embedding_bag(flat_idx, s["W_dec"], per_sample_weights=flat_acts, mode="sum")
    y = y.reshape(*x.shape[:-1], -1) + s["b_dec"]
    if cfg.get("skip_connection"):                                   # forward: sae_out += x @ W_skip.mT
        y = y + x @ s["W_skip"].mT
    return y, _scatter_topk(top_acts, top_indices, pre)


# ---- Gemma Scope: the tutorial's JumpReLUSAE (Lieberum et al. 2024, Colab "Gemma Scope tutorial") -------------
def gemma_scope(p: dict, x: Tensor) -> tuple[Tensor, Tensor]:
    pre = x @ p["W_enc"] + p["b_enc"]  # no b_dec subtracted from the input
    f = (pre > p["threshold"]) * relu(pre)
    return f @ p["W_dec"] + p["b_dec"], f


# ---- Llama Scope: lm_saes SparseAutoEncoder.encode / decode, output unscaled as compute_loss does -----------
def llama_scope(cfg: dict, s: dict, x: Tensor) -> tuple[Tensor, Tensor]:
    d = cfg["d_model"]
    avg = cfg.get("dataset_average_activation_norm") or {}
    dataset_wise = cfg.get("norm_activation", "dataset-wise") == "dataset-wise"
    s_in = d ** 0.5 / avg["in"] if dataset_wise else 1.0
    s_out = d ** 0.5 / avg["out"] if dataset_wise else 1.0
    b_dec = s.get("decoder.bias", torch.zeros(d))
    x = x * s_in
    if cfg.get("apply_decoder_bias_to_pre_encoder"):
        x = x - b_dec
    hidden_pre = x @ s["encoder.weight"].T + s["encoder.bias"]
    # defaults of lm_saes' SAEConfig where the hyperparams leave a field out
    include_norm = cfg.get("sparsity_include_decoder_norm", True)
    scores = hidden_pre * s["decoder.weight"].norm(dim=0) if include_norm else hidden_pre
    if cfg.get("act_fn", "relu") == "jumprelu":
        theta = s["log_jumprelu_threshold"].exp() if "log_jumprelu_threshold" in s else \
            cfg.get("jump_relu_threshold", 0)
        mask = scores > theta
    else:  # relu: the activation function returns the mask scores > 0
        mask = scores > 0
    f = hidden_pre * mask
    return (f @ s["decoder.weight"].T + b_dec) / s_out, f


# ---- Goodfire: the model card's SparseAutoEncoder (two nn.Linear, ReLU) -------------------------------------
def goodfire(s: dict, x: Tensor) -> tuple[Tensor, Tensor]:
    f = relu(x @ s["encoder_linear.weight"].T + s["encoder_linear.bias"])
    return f @ s["decoder_linear.weight"].T + s["decoder_linear.bias"], f


# ---- SAELens transcoders: saes/transcoder.py ------------------------------------------------------------
def saelens_transcoder(cfg: dict, s: dict, x: Tensor) -> tuple[Tensor, Tensor]:
    """Transcoder.encode (no b_dec on the input) / decode to d_out; the jumprelu kinds mask relu(pre) by
    pre > threshold; the skip kinds add x @ W_skip.T (W_skip [d_out, d_in]) from the raw input."""
    hidden = x @ s["W_enc"] + s["b_enc"]
    f = relu(hidden)
    if cfg["architecture"].startswith("jumprelu"):
        f = f * (hidden > s["threshold"]).to(x.dtype)
    out = f @ s["W_dec"] + s["b_dec"]
    if "skip" in cfg["architecture"]:
        out = out + x @ s["W_skip"].T
    return out, f
