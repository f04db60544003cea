"""Gemma Scope reader: params.npz folders laid out as the release is read into modules whose outputs equal the
tutorial's JumpReLUSAE (tests/original_impls.py), with the model and hook point taken from the path."""

from __future__ import annotations

import numpy as np
import original_impls as original
import pytest
import torch

from dictionaries.errors import FormatError, ShapeMismatchError
from dictionaries.formats import detect_format, read_folder

D, F = 12, 40
X = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(3))


def params(seed: int = 0) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    p = {"W_enc": torch.randn(D, F, generator=g) * 0.5, "W_dec": torch.randn(F, D, generator=g) * 0.5,
         "b_enc": torch.randn(F, generator=g) * 0.3, "b_dec": torch.randn(D, generator=g) * 0.3,
         "threshold": torch.rand(F, generator=g) * 0.6}
    return {k: v.numpy() for k, v in p.items()}


def write_npz(folder, p):
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **p)
    return folder


@pytest.mark.parametrize("repo,hook,module,site,layer", [
    ("gemma-scope-2b-pt-res", "resid_post", "model.layers.5", "resid", 5),
    ("gemma-scope-9b-it-mlp", "mlp_out", "model.layers.5.post_feedforward_layernorm", "mlp", 5),
    ("gemma-scope-2b-pt-att", "attn_z", "model.layers.5.self_attn.o_proj", "attn", 5)])
def test_gemma_scope_matches_the_tutorial_forward(tmp_path, repo, hook, module, site, layer):
    p = params()
    folder = write_npz(tmp_path / repo / "layer_5" / "width_16k" / "average_l0_82", p)
    assert detect_format(folder) == "gemma_scope"
    d = read_folder(folder)
    out = d(X)
    ref = original.gemma_scope({k: torch.from_numpy(v) for k, v in p.items()}, X)
    torch.testing.assert_close(out.reconstruction, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.features, ref[1], rtol=1e-5, atol=1e-5)
    assert (ref[1] > 0).any() and (ref[1] == 0).any()   # the threshold both kept and cut features
    card = d.card
    assert (card.architecture, card.pre_encoder_bias, card.files.format) == ("jumprelu", False, "gemma_scope")
    assert card.model.id == "google/gemma-2-" + repo.split("-")[2] + ("-it" if "-it-" in repo else "")
    assert (card.hook.module, card.hook.site, card.hook.layer) == (module, site, layer)
    assert any("width_16k but the archive holds 40" in n for n in card.provenance.notes)
    assert "average L0 82 as reported by the release (folder name)" in card.provenance.notes


def test_gemma_scope_w_prefixed_names_and_unknown_path(tmp_path):
    p = params(1)
    p["w_enc"], p["w_dec"] = p.pop("W_enc"), p.pop("W_dec")   # older archives' spelling
    d = read_folder(write_npz(tmp_path / "some" / "folder", p))
    ref = original.gemma_scope({"W_" + k[2:] if k.startswith("w_") else k: torch.from_numpy(v)
                                for k, v in p.items()}, X)
    torch.testing.assert_close(d(X).features, ref[1], rtol=1e-5, atol=1e-5)
    assert d.card.hook is None and d.card.model is None


@pytest.mark.parametrize("where,change,message", [
    ("gemma-scope-2b-pt-transcoders/layer_3/width_16k/average_l0_76", None, "transcoder"),
    ("gemma-scope-2b-pt-res/embedding/width_4k/average_l0_6", None, "embedding"),
    ("gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_76", "drop", "missing ['threshold']"),
    ("gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_76", "shape", "'threshold': expected shape .40,.")])
def test_gemma_scope_refusals_say_why(tmp_path, where, change, message):
    p = params()
    if change == "drop":
        del p["threshold"]
    elif change == "shape":
        p["threshold"] = p["threshold"][:-1]
    with pytest.raises((FormatError, ShapeMismatchError), match=message.replace("[", r"\[").replace("]", r"\]")):
        read_folder(write_npz(tmp_path / where, p))


def test_gemma_scope_object_arrays_are_never_unpickled(tmp_path):
    folder = tmp_path / "g"
    folder.mkdir()
    np.savez(folder / "params.npz", W_enc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(FormatError, match="not a readable numpy"):
        read_folder(folder)
