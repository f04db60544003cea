"""Writers of other libraries' folders: a native dictionary as SAELens, sparsify or dictionary_learning files.

Each writer gives the files as bytes (so publishing can upload them without temporary copies) holding tensors
such that the library's own loader computes the native module's features and reconstruction:

- SAELens 6.x (`cfg.json` + `sae_weights.safetensors`, `SAE.load_from_disk` / `SAE.from_pretrained`): relu ->
  standard, topk -> topk, jumprelu -> jumprelu, gated -> gated (b_enc is SAELens' b_gate), each with
  `apply_b_dec_to_input` = the pre-encoder bias; batchtopk -> jumprelu with the global threshold on every feature
  (SAELens' own inference form of BatchTopK: relu(h) * (h > threshold)).
- sparsify 1.3 (`cfg.json` + `sae.safetensors`, `SparseCoder.load_from_disk`): topk only (its encoder always
  subtracts b_dec, so a dictionary without pre-encoder bias gets b_enc + b_dec @ W_enc instead).
- dictionary_learning 0.1.0 (`ae.pt` + `config.json`, `utils.load_dictionary`): relu -> AutoEncoderNew (no
  pre-encoder bias: b_dec @ W_enc folded into the encoder bias; AutoEncoder's loader would rescale the decoder),
  topk -> AutoEncoderTopK, batchtopk -> BatchTopKSAE, jumprelu -> JumpReluAutoEncoder, gated -> GatedAutoEncoder.

Folding the pre-encoder bias in or out is exact in real arithmetic (W_enc^T (x - b) + c = W_enc^T x + (c -
W_enc^T b)) and changes float results by rounding only. What a library cannot hold is a FormatError saying why.
"""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING

from dictionaries.errors import FormatError

if TYPE_CHECKING:
    from torch import Tensor

    from dictionaries.architectures import Dictionary
    from dictionaries.card import Card

WRITABLE = ("saelens", "sparsify", "dictionary_learning")
_SAELENS_ARCH = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated", "batchtopk": "jumprelu"}
_DL_CLASS = {"relu": "AutoEncoderNew", "topk": "AutoEncoderTopK", "batchtopk": "BatchTopKSAE",
             "jumprelu": "JumpReluAutoEncoder", "gated": "GatedAutoEncoder"}


def encoder_bias(state: dict[str, Tensor], has_pre_bias: bool, want_pre_bias: bool, key: str = "b_enc") -> Tensor:
    """The encoder bias giving the same pre-activations when the b_dec subtraction is switched to `want_pre_bias`:
    W^T (x - b_dec) + c = W^T x + (c - b_dec @ W). For gated's magnitude path (`key` b_mag) the encoder matrix is
    W * exp(r_mag)."""
    shift = state["b_dec"] @ state["W_enc"]                                       # [F]
    if key == "b_mag":
        shift = shift * state["r_mag"].exp()
    if has_pre_bias == want_pre_bias:
        return state[key]
    return state[key] + shift if want_pre_bias else state[key] - shift


def _safetensors(state: dict[str, Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, metadata={"format": "pt"})


def _json(data: dict) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


# ---- SAELens ----------------------------------------------------------------------------------------------
def saelens_files(d: Dictionary, card: Card) -> dict[str, bytes]:
    """`cfg.json` (SAELens 6.x, the model and hook in `metadata`) and `sae_weights.safetensors`."""
    from dictionaries.hookpoints import transformerlens_hook

    s = d.native_state()
    arch = _SAELENS_ARCH[d.architecture]
    pre = d.pre_encoder_bias
    if d.architecture == "gated":
        tensors = {"W_enc": s["W_enc"], "b_gate": s["b_enc"], "b_mag": s["b_mag"], "r_mag": s["r_mag"],
                   "W_dec": s["W_dec"], "b_dec": s["b_dec"]}
    else:
        tensors = {k: s[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if d.architecture == "jumprelu":
        tensors["threshold"] = s["threshold"]
    elif d.architecture == "batchtopk":
        tensors["threshold"] = s["threshold"].expand(d.d_dict)
    recipe = card.recipe
    metadata = {"model_name": card.model.id if card.model else None,
                "hook_name": transformerlens_hook(card.model.id if card.model else None, card.hook),
                "hook_head_index": None, "prepend_bos": True,
                "dataset_path": recipe.dataset.path if recipe else None,
                "context_size": recipe.context_length if recipe else None,
                "neuronpedia_id": card.links.neuronpedia, "model_from_pretrained_kwargs": {}}
    cfg = {"architecture": arch, "d_in": d.d_in, "d_sae": d.d_dict,
           "dtype": str(s["W_enc"].dtype).removeprefix("torch."), "device": "cpu", "apply_b_dec_to_input": pre,
           "normalize_activations": "none",
           "reshape_activations": "none", "metadata": metadata}
    if arch == "topk":
        cfg.update(k=d.k, rescale_acts_by_decoder_norm=False)
    return {"cfg.json": _json(cfg), "sae_weights.safetensors": _safetensors(tensors)}


# ---- sparsify ---------------------------------------------------------------------------------------------
def sparsify_files(d: Dictionary, card: Card) -> dict[str, bytes]:
    """`cfg.json` (SparseCoderConfig fields + d_in) and `sae.safetensors`; topk only."""
    if d.architecture != "topk":
        raise FormatError(card.name, f"sparsify holds TopK sparse coders only; a {d.architecture} dictionary "
                                     "selects its features another way")
    s = d.native_state()
    tensors = {"encoder.weight": s["W_enc"].T, "encoder.bias": encoder_bias(s, d.pre_encoder_bias, True),
               "W_dec": s["W_dec"], "b_dec": s["b_dec"]}
    # normalize_decoder only steers training (sparsify renormalises W_dec rows after each step); False here so
    # that a loader that re-applied it could not change this dictionary's decoder
    cfg = {"activation": "topk", "expansion_factor": max(1, d.d_dict // d.d_in), "normalize_decoder": False,
           "num_latents": d.d_dict, "k": d.k, "multi_topk": False, "skip_connection": False, "transcode": False,
           "d_in": d.d_in}
    return {"cfg.json": _json(cfg), "sae.safetensors": _safetensors(tensors)}


# ---- dictionary_learning ----------------------------------------------------------------------------------
def dictionary_learning_files(d: Dictionary, card: Card) -> dict[str, bytes]:
    """`ae.pt` (a torch.save'd state dict of tensors only) and `config.json` naming the class."""
    import torch

    s, cls = d.native_state(), _DL_CLASS[d.architecture]
    if cls == "AutoEncoderNew":
        state = {"encoder.weight": s["W_enc"].T, "encoder.bias": encoder_bias(s, d.pre_encoder_bias, False),
                 "decoder.weight": s["W_dec"].T, "decoder.bias": s["b_dec"]}
    elif cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        threshold = s["threshold"] if cls == "BatchTopKSAE" else torch.tensor(-1.0, dtype=s["W_enc"].dtype)
        state = {"encoder.weight": s["W_enc"].T, "encoder.bias": encoder_bias(s, d.pre_encoder_bias, True),
                 "decoder.weight": s["W_dec"].T, "b_dec": s["b_dec"], "k": torch.tensor(d.k, dtype=torch.int),
                 "threshold": threshold}
    elif cls == "JumpReluAutoEncoder":  # its loader leaves apply_b_dec_to_input False
        state = {"W_enc": s["W_enc"], "b_enc": encoder_bias(s, d.pre_encoder_bias, False), "W_dec": s["W_dec"],
                 "b_dec": s["b_dec"], "threshold": s["threshold"]}
    else:
        state = {"encoder.weight": s["W_enc"].T, "gate_bias": encoder_bias(s, d.pre_encoder_bias, True),
                 "mag_bias": encoder_bias(s, d.pre_encoder_bias, True, key="b_mag"), "r_mag": s["r_mag"],
                 "decoder.weight": s["W_dec"].T, "decoder_bias": s["b_dec"]}
    buffer = io.BytesIO()
    torch.save({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, buffer)
    trainer = {"dict_class": cls, "activation_dim": d.d_in, "dict_size": d.d_dict,
               "lm_name": card.model.id if card.model else None, **({"k": d.k} if "TopK" in cls else {})}
    io_ = "out"
    if card.hook is not None:
        trainer["layer"], io_ = card.hook.layer, "in" if card.hook.io == "input" else "out"
        trainer["submodule_name"] = _dl_submodule(card)
    config = {"trainer": trainer, "buffer": {"d_submodule": d.d_in, "io": io_}}
    return {"ae.pt": buffer.getvalue(), "config.json": _json(config)}


def _dl_submodule(card: Card) -> str:
    """dictionary_learning's submodule name for the card's hook (`resid_post_layer_3`, `mlp_out_layer3`, `embed`)."""
    h = card.hook
    if h.site == "embed" or h.layer is None:
        return "embed"
    if h.site == "resid":
        return f"resid_{'pre' if h.io == 'input' else 'post'}_layer_{h.layer}"
    return f"{h.site}_{'in' if h.io == 'input' else 'out'}_layer{h.layer}"


WRITERS = {"saelens": saelens_files, "sparsify": sparsify_files, "dictionary_learning": dictionary_learning_files}


def layout_files(d: Dictionary, to: str, card: Card) -> dict[str, bytes]:
    """The files of `d` (described by `card`) in library `to`'s layout, as bytes."""
    if to not in WRITERS:
        raise FormatError(to, f"no writer for format {to!r}; writable: native, {', '.join(WRITABLE)}")
    if card.output_hook is not None:  # the writers know SAE layouts only: a transcoder would lose W_skip / its out hook
        raise FormatError(card.name, f"{card.name} is a transcoder; writing transcoders in {to}'s layout is not "
                                     "supported yet (its readers are): keep it native (--to native)")
    return WRITERS[to](d, card)


def sparsify_note(card: Card) -> str:
    """What a sparsify folder cannot say itself: sparsify keeps the model in the run's config.json and the hookpoint
    as the folder's name (the module path under the base model, read at its output)."""
    hookpoint = card.hook.module.split(".", 1)[-1] if card.hook and card.hook.io == "output" else None
    return ("sparsify reads the hookpoint from the folder's name" + (f" (here {hookpoint!r})" if hookpoint else "")
            + " and the model from ../config.json")
