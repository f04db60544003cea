"""Readers of foreign dictionary folders: dictionary_learning, SAELens and EleutherAI's sparsify.

Each reader returns the tensors under native names and layout (`W_enc [d, F]`, `b_enc [F]`, `W_dec [F, d]`,
`b_dec [d]`, extras) such that the native module's outputs equal the original implementation's, plus what
the folder's config says about the model and hook point. Anything the native kinds cannot represent is a
FormatError that says why. Pickles are loaded with `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dictionaries.errors import FormatError, ShapeMismatchError
from dictionaries.files import load_pickle, load_safetensors, read_json, require
from dictionaries.hookpoints import (
    dictionary_learning_hook,
    dictionary_learning_model,
    model_id,
    saelens_hook,
    sparsify_hook,
)


@dataclass
class Foreign:
    """What a foreign reader found."""

    architecture: str
    state: dict[str, Tensor]  # native names and layout
    k: int | None
    pre_encoder_bias: bool
    weights: Path
    files: list[Path]
    model: str | None = None
    hook: dict[str, Any] | None = None  # HookPoint fields
    notes: list[str] = field(default_factory=list)


# ---- tensor layouts ---------------------------------------------------------------------------------
# A layout: tensor name -> (shape in named dimensions, required). d = d_in, F = d_dict; () is a scalar.
Layout = dict[str, tuple[tuple[str, ...], bool]]


def check_layout(state: dict[str, Tensor], layout: Layout, path: Path, dims: dict[str, int] | None = None,
                 sizes_from: str = "") -> dict[str, int]:
    """Check names and shapes of `state` against `layout`; the sizes of the named dimensions.

    `dims` may hold sizes the config states (`sizes_from` names it); otherwise the first tensor of the
    layout fixes them. Errors name the file, the tensor and both shapes.
    """
    dims = dict(dims or {})
    missing = [k for k, (_, required) in layout.items() if required and k not in state]
    unexpected = sorted(k for k in state if k not in layout)
    if missing or unexpected:
        raise FormatError(str(path), f"expected tensors {sorted(layout)}; missing {missing}, unexpected "
                                     f"{unexpected} (the file holds {sorted(state)})")
    for key, (spec, _) in layout.items():
        if key not in state:
            continue
        shape = tuple(state[key].shape)
        if len(shape) == len(spec):
            for name, n in zip(spec, shape):
                dims.setdefault(name, n)
        expected = tuple(dims.get(name, name) for name in spec)
        if shape != expected:
            hint = f"Sizes taken from {sizes_from}." if sizes_from else ""
            raise ShapeMismatchError(f"{path}: tensor {key!r}", expected, shape, hint=hint)
    return dims


# ---- dictionary_learning --------------------------------------------------------------------------
# dictionary_learning's classes (saprmarks/dictionary_learning 0.1.0, dictionary.py and trainers/*.py) and
# their state dicts, in torch.nn.Linear layout where they use Linear (`weight` is [out, in]).
_TOPK_LIKE: Layout = {"encoder.weight": (("F", "d"), True), "encoder.bias": (("F",), True),
                      "decoder.weight": (("d", "F"), True), "b_dec": (("d",), True),
                      "k": ((), False), "threshold": ((), False)}
DL_LAYOUTS: dict[str, Layout] = {
    "AutoEncoder": {"encoder.weight": (("F", "d"), True), "encoder.bias": (("F",), True),
                    "decoder.weight": (("d", "F"), True), "bias": (("d",), True)},
    "AutoEncoderNew": {"encoder.weight": (("F", "d"), True), "encoder.bias": (("F",), True),
                       "decoder.weight": (("d", "F"), True), "decoder.bias": (("d",), True)},
    "GatedAutoEncoder": {"encoder.weight": (("F", "d"), True), "gate_bias": (("F",), True),
                         "mag_bias": (("F",), True), "r_mag": (("F",), True),
                         "decoder.weight": (("d", "F"), True), "decoder_bias": (("d",), True)},
    "JumpReluAutoEncoder": {"W_enc": (("d", "F"), True), "b_enc": (("F",), True), "W_dec": (("F", "d"), True),
                            "b_dec": (("d",), True), "threshold": (("F",), True)},
    "AutoEncoderTopK": _TOPK_LIKE,
    "BatchTopKSAE": {**_TOPK_LIKE, "k": ((), True), "threshold": ((), True)},
    "MatryoshkaBatchTopKSAE": {"W_enc": (("d", "F"), True), "b_enc": (("F",), True), "W_dec": (("F", "d"), True),
                               "b_dec": (("d",), True), "k": ((), True), "threshold": ((), True),
                               "group_sizes": (("G",), True)},
}
DL_UNREPRESENTABLE = {
    "IdentityDict": "it is the identity map, not a dictionary",
    "CrossCoder": "a crosscoder reads several layers at once; native dictionaries read one hook point",
    "BatchTopKCrossCoder": "a crosscoder reads several layers at once; native dictionaries read one hook point",
}
_DL_ARCHITECTURE = {"AutoEncoder": "relu", "AutoEncoderNew": "relu", "GatedAutoEncoder": "gated",
                    "JumpReluAutoEncoder": "jumprelu", "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk",
                    "MatryoshkaBatchTopKSAE": "batchtopk"}


def _lookup(config: dict, key: str) -> Any:
    """A value from a dictionary_learning config: `trainer` first, then the top level, then any section
    (the legacy pythia configs used other sections than today's {"trainer", "buffer"})."""
    sections = [config.get("trainer"), config, *(v for k, v in config.items() if k != "trainer")]
    for section in sections:
        if isinstance(section, dict) and section.get(key) is not None:
            return section[key]
    return None


def infer_dictionary_learning_class(state: dict[str, Tensor], path: Path, architecture: str | None) -> str:
    """The dictionary_learning class whose state-dict keys these are (for configs that do not name it)."""
    keys = set(state)
    fits = [cls for cls, layout in DL_LAYOUTS.items()
            if {k for k, (_, req) in layout.items() if req} <= keys <= set(layout)]
    if architecture is not None and len(fits) > 1:
        fits = [cls for cls in fits if _DL_ARCHITECTURE[cls] == architecture] or fits
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise FormatError(str(path), f"the tensors {sorted(keys)} fit no dictionary_learning class; known "
                                     + "; ".join(f"{c}: {sorted(lay)}" for c, lay in DL_LAYOUTS.items()))
    raise FormatError(str(path), f"the tensors fit several dictionary_learning classes ({', '.join(fits)}) "
                                 "and config.json does not name one: add trainer.dict_class to config.json")


def read_dictionary_learning(folder: Path, *, architecture: str | None = None) -> Foreign:
    """`ae.pt` (+ `config.json`, absent or in a legacy layout for the early pythia sets)."""
    ae = require(folder / "ae.pt", "dictionary_learning")
    config_path = folder / "config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    state = load_pickle(ae)
    cls = _lookup(config, "dict_class") or infer_dictionary_learning_class(state, ae, architecture)
    if cls in DL_UNREPRESENTABLE:
        raise FormatError(str(config_path), f"dict_class {cls!r} cannot be read: {DL_UNREPRESENTABLE[cls]}")
    if cls not in DL_LAYOUTS:
        close = difflib.get_close_matches(str(cls), DL_LAYOUTS, n=2, cutoff=0.5)
        raise FormatError(str(config_path), f"unknown dictionary_learning class {cls!r}"
                                            + (f" (did you mean {', '.join(close)}?)" if close else "")
                                            + f"; known: {', '.join(DL_LAYOUTS)}")
    if _lookup(config, "io") == "in_to_out":
        raise FormatError(str(config_path), "buffer io 'in_to_out': the dictionary maps a module's input to its "
                                            "output; native dictionaries reconstruct what they read")
    sizes = {"d": _lookup(config, "activation_dim"), "F": _lookup(config, "dict_size")}
    check_layout(state, DL_LAYOUTS[cls], ae, {k: int(v) for k, v in sizes.items() if v is not None},
                 sizes_from=f"{config_path.name} (activation_dim, dict_size)")
    found = Foreign(_DL_ARCHITECTURE[cls], {}, None, True, ae, [ae, *([config_path] if config else [])])
    _DL_CONVERTERS[cls](state, found, _lookup(config, "k"))
    found.notes.insert(0, f"dictionary_learning class {cls}" + ("" if _lookup(config, "dict_class") else
                                                              " (inferred from the state dict's keys)"))
    if _lookup(config, "norm_factor") is not None:
        found.notes.append(f"config norm_factor {_lookup(config, 'norm_factor')} was already folded into the "
                           "biases by dictionary_learning before saving (scale_biases): nothing to fold")
    found.model = model_id(_lookup(config, "lm_name")) or dictionary_learning_model(folder)
    if found.model and not _lookup(config, "lm_name"):
        found.notes.append(f"model {found.model} taken from the folder path")
    found.hook, how = dictionary_learning_hook(found.model, _lookup(config, "submodule_name"),
                                               _lookup(config, "layer"), _lookup(config, "io"), folder)
    if how:
        found.notes.append(how)
    return found


def _dl_linear(state: dict[str, Tensor], bias_key: str, dec_bias_key: str) -> dict[str, Tensor]:
    # nn.Linear stores [out, in]: encoder.weight [F, d] and decoder.weight [d, F] transpose into native. The
    # transposed views are kept (matmuls take them as they are; native_state makes them contiguous to save).
    return {"W_enc": state["encoder.weight"].T, "b_enc": state[bias_key],
            "W_dec": state["decoder.weight"].T, "b_dec": state[dec_bias_key]}


def _dl_autoencoder(state: dict[str, Tensor], found: Foreign, k: Any) -> None:
    native = _dl_linear(state, "encoder.bias", "bias")
    # dictionary_learning's loader (utils.load_dictionary -> AutoEncoder.from_pretrained) normalises decoder
    # columns to unit norm unless they already are, scaling encoder rows and biases by the norms. Exact:
    # ReLU(n * z) = n * ReLU(z) for n > 0, so features scale by n and reconstructions are unchanged.
    norms = native["W_dec"].norm(dim=1)
    if not torch.allclose(norms, torch.ones_like(norms)):
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        native["W_dec"] = native["W_dec"] / norms[:, None]
        native["W_enc"] = native["W_enc"] * norms[None, :]
        native["b_enc"] = native["b_enc"] * norms
        found.notes.append("decoder columns normalised to unit norm as dictionary_learning's loader does "
                           "(norms folded into the encoder; reconstructions unchanged)")
    found.state = native


def _dl_autoencoder_new(state: dict[str, Tensor], found: Foreign, k: Any) -> None:
    found.state = _dl_linear(state, "encoder.bias", "decoder.bias")  # encode: ReLU(W x + b), no pre-bias
    found.pre_encoder_bias = False


def _dl_gated(state: dict[str, Tensor], found: Foreign, k: Any) -> None:
    found.state = {**_dl_linear(state, "gate_bias", "decoder_bias"), "r_mag": state["r_mag"],
                   "b_mag": state["mag_bias"]}


def _dl_jumprelu(state: dict[str, Tensor], found: Foreign, k: Any) -> None:
    # apply_b_dec_to_input is a plain attribute, False after loading from ae.pt: no pre-encoder bias
    found.state = {name: state[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    found.pre_encoder_bias = False


def _dl_k(state: dict[str, Tensor], found: Foreign, k: Any) -> int:
    stored = int(state["k"].item()) if "k" in state else None
    if stored is not None and k is not None and int(k) != stored:
        raise FormatError(str(found.weights), f"config.json says k={k} but the state dict holds k={stored}")
    if stored is None and k is None:
        raise FormatError(str(found.weights), "no k: neither the state dict nor config.json holds it")
    return stored if stored is not None else int(k)


def _dl_topk(state: dict[str, Tensor], found: Foreign, k: Any) -> None:
    # AutoEncoderTopK.encode keeps the k largest of ReLU(pre) per token (use_threshold=False by default)
    found.state, found.k = _dl_linear(state, "encoder.bias", "b_dec"), _dl_k(state, found, k)


def _dl_batchtopk(state: dict[str, Tensor], found: Foreign, k: Any) -> None:
    # encode's default is the inference rule: ReLU(pre) * (ReLU(pre) > threshold), threshold a scalar
    if "encoder.weight" in state:
        native = _dl_linear(state, "encoder.bias", "b_dec")
    else:  # MatryoshkaBatchTopKSAE holds native-layout parameters
        native = {name: state[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
        found.notes.append(f"Matryoshka group sizes {state['group_sizes'].tolist()} (all groups active)")
    native["threshold"] = state["threshold"].to(native["W_enc"].dtype)
    if float(native["threshold"]) < 0:
        found.notes.append("inference threshold was never set in training (-1): every positive feature fires")
    found.state, found.k = native, _dl_k(state, found, k)


_DL_CONVERTERS = {"AutoEncoder": _dl_autoencoder, "AutoEncoderNew": _dl_autoencoder_new,
                  "GatedAutoEncoder": _dl_gated, "JumpReluAutoEncoder": _dl_jumprelu,
                  "AutoEncoderTopK": _dl_topk, "BatchTopKSAE": _dl_batchtopk, "MatryoshkaBatchTopKSAE": _dl_batchtopk}


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
SAELENS_UNREPRESENTABLE = {
    "abstopk": "it keeps the k largest |pre-activations| with their sign; native features are non-negative",
    "transcoder": "a transcoder reconstructs another site than it reads",
    "skip_transcoder": "a transcoder reconstructs another site than it reads",
    "jumprelu_transcoder": "a transcoder reconstructs another site than it reads",
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


READERS = {"dictionary_learning": read_dictionary_learning, "saelens": read_saelens, "sparsify": read_sparsify}
