"""Reader of dictionary_learning (saprmarks) folders: ae.pt or ae.safetensors with config.json, into native tensors."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dictionaries.errors import FormatError
from dictionaries.files import load_pickle, read_json, require
from dictionaries.foreign_formats import Foreign, Layout, check_layout
from dictionaries.hookpoints import (
    dictionary_learning_hook,
    dictionary_learning_model,
    model_id,
)

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


def dictionary_learning_hook_in(folder: Path, fam: Any) -> dict | None:
    """HookPoint fields of a dictionary_learning folder's hook (config.json's submodule_name, layer and io, or
    the folder name) in a model of family `fam` (model_families.Family, from a loaded model's config when the
    config's `lm_name` is a model the package does not know); None when it names no site of that family."""
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    fields, _ = dictionary_learning_hook(None, _lookup(config, "submodule_name"), _lookup(config, "layer"),
                                         _lookup(config, "io"), folder, fam)
    return fields


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
