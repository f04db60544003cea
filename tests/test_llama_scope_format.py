"""Llama Scope reader: hyperparams.json + checkpoints/final.safetensors folders read into modules whose outputs
equal lm_saes' forward (tests/original_impls.py), the dataset-wise input norm and the decoder-norm-weighted
JumpReLU folded in exactly; what cannot be folded is refused with the reason."""

from __future__ import annotations

import json

import original_impls as original
import pytest
import torch
from safetensors.torch import save_file

from dictionaries.errors import FormatError
from dictionaries.formats import detect_format, read_folder

D, F = 16, 48
X = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(5)) * 3


def hyperparams(**changes) -> dict:
    cfg = {"d_model": D, "d_sae": F, "act_fn": "jumprelu", "jump_relu_threshold": 0.4, "top_k": 50,
           "norm_activation": "dataset-wise", "dataset_average_activation_norm": {"in": 9.5, "out": 9.5},
           "use_decoder_bias": True, "apply_decoder_bias_to_pre_encoder": False,
           "sparsity_include_decoder_norm": True, "use_glu_encoder": False,
           "hook_point_in": "blocks.7.hook_resid_post", "hook_point_out": "blocks.7.hook_resid_post"}
    return {**cfg, **changes}


def weights(seed: int = 0, threshold: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = {"encoder.weight": torch.randn(F, D, generator=g) * 0.4, "encoder.bias": torch.randn(F, generator=g) * 0.2,
         "decoder.weight": torch.randn(D, F, generator=g) * 0.3, "decoder.bias": torch.randn(D, generator=g) * 0.2}
    if threshold:
        s["log_jumprelu_threshold"] = torch.randn(F, generator=g) * 0.3 - 1
    return s


def write(folder, cfg, s):
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "hyperparams.json").write_text(json.dumps(cfg))
    save_file(s, folder / "checkpoints" / "final.safetensors")
    return folder


@pytest.mark.parametrize("changes,threshold", [
    ({}, False),                                                       # the release's settings
    ({"dataset_average_activation_norm": {"in": 4.0, "out": 12.0}, "apply_decoder_bias_to_pre_encoder": True}, True),
    ({"sparsity_include_decoder_norm": False}, False),
    ({"norm_activation": "inference"}, False),
    ({"act_fn": "relu"}, False),
    ({"drop": ["sparsity_include_decoder_norm", "apply_decoder_bias_to_pre_encoder", "use_decoder_bias"]}, False)])
def test_llama_scope_matches_lm_saes_forward(tmp_path, changes, threshold):
    cfg, s = hyperparams(**{k: v for k, v in changes.items() if k != "drop"}), weights(threshold=threshold)
    for field in changes.get("drop", []):  # absent: lm_saes' defaults apply
        del cfg[field]
    folder = write(tmp_path / "Llama3_1-8B-Base-L7R-8x", cfg, s)
    assert detect_format(folder) == "llama_scope"
    d = read_folder(folder)
    out, ref = d(X), original.llama_scope(cfg, s, X)
    torch.testing.assert_close(out.features, ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.reconstruction, ref[0], rtol=1e-5, atol=1e-5)
    assert (ref[1] > 0).any() and (ref[1] == 0).any()
    card = d.card
    assert (card.architecture, card.pre_encoder_bias, card.files.format) == (
        "relu" if cfg["act_fn"] == "relu" else "jumprelu", False, "llama_scope")
    assert card.model.id == "meta-llama/Llama-3.1-8B"
    assert (card.hook.module, card.hook.site, card.hook.layer) == ("model.layers.7", "resid", 7)


def test_llama_scope_norms_stored_in_the_weights_and_bf16(tmp_path):
    """Later lm_saes versions keep the averages in the state dict under dataset_average_activation_norm.<hook>."""
    cfg = hyperparams(dataset_average_activation_norm=None, hook_point_in="blocks.2.hook_mlp_out",
                      hook_point_out="blocks.2.hook_mlp_out")
    s = {k: v.to(torch.bfloat16) for k, v in weights(2).items()}
    stored = {**s, "dataset_average_activation_norm.blocks.2.hook_mlp_out": torch.tensor(6.0)}
    d = read_folder(write(tmp_path / "Llama3_1-8B-Base-L2M-8x", cfg, stored))
    ref = original.llama_scope({**cfg, "dataset_average_activation_norm": {"in": 6.0, "out": 6.0}},
                               {k: v.float() for k, v in s.items()}, X)
    torch.testing.assert_close(d(X).reconstruction, ref[0], rtol=1e-5, atol=1e-5)
    assert d.card.hook.module == "model.layers.2.mlp"


@pytest.mark.parametrize("changes,message", [
    ({"act_fn": "topk"}, "passing negative ones"),
    ({"act_fn": "batchtopk"}, "depends on the rest of the batch"),
    ({"norm_activation": "token-wise"}, "rescales every input"),
    ({"use_glu_encoder": True}, "GLU"),
    ({"hook_point_out": "blocks.7.hook_mlp_out"}, "transcoder"),
    ({"dataset_average_activation_norm": {}}, "needs dataset_average_activation_norm"),
    ({"jump_relu_threshold": -1.0}, "jump_relu_threshold >= 0")])
def test_llama_scope_refusals_say_why(tmp_path, changes, message):
    with pytest.raises(FormatError, match=message):
        read_folder(write(tmp_path / "f", hyperparams(**changes), weights()))
