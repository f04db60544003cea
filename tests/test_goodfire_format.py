"""Goodfire reader: a `<model>-SAE-l<L>.pth` state dict read into a module whose outputs equal the model card's
SparseAutoEncoder (tests/original_impls.py); the hook point comes from the file name."""

from __future__ import annotations

import original_impls as original
import pytest
import torch

from dictionaries.errors import FormatError, MissingFileError
from dictionaries.formats import detect_format, read_folder

D, F = 12, 40
X = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(4))


def state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"encoder_linear.weight": torch.randn(F, D, generator=g) * 0.5,
            "encoder_linear.bias": torch.randn(F, generator=g) * 0.3,
            "decoder_linear.weight": torch.randn(D, F, generator=g) * 0.5,
            "decoder_linear.bias": torch.randn(D, generator=g) * 0.3}


@pytest.mark.parametrize("name,model,layer", [
    ("Llama-3.1-8B-Instruct-SAE-l19.pth", "meta-llama/Llama-3.1-8B-Instruct", 19),
    ("Llama-3.3-70B-Instruct-SAE-l50.pt", "meta-llama/Llama-3.3-70B-Instruct", 50)])
def test_goodfire_matches_the_model_card_forward(tmp_path, name, model, layer):
    s = state()
    torch.save(s, tmp_path / name)
    assert detect_format(tmp_path) == "goodfire"
    d = read_folder(tmp_path)
    out, ref = d(X), original.goodfire(s, X)
    torch.testing.assert_close(out.reconstruction, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.features, ref[1], rtol=1e-5, atol=1e-5)
    assert (ref[1] > 0).any() and (ref[1] == 0).any()
    card = d.card
    assert (card.architecture, card.pre_encoder_bias, card.files.format) == ("relu", False, "goodfire")
    assert card.model.id == model
    assert (card.hook.module, card.hook.io, card.hook.site, card.hook.layer) == (f"model.layers.{layer}", "output",
                                                                                 "resid", layer)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_goodfire_refuses_pickled_objects_and_wrong_keys(tmp_path):
    torch.save({"encoder_linear.weight": Evil()}, tmp_path / "M-SAE-l1.pth")
    with pytest.raises(FormatError, match="weights_only=True"):
        read_folder(tmp_path, format="goodfire")
    s = state()
    s["encoder.weight"] = s.pop("encoder_linear.weight")
    torch.save(s, tmp_path / "M-SAE-l1.pth")
    with pytest.raises(FormatError, match=r"missing \['encoder_linear.weight'\]"):
        read_folder(tmp_path, format="goodfire")
    torch.save(state(), tmp_path / "N-SAE-l2.pth")
    with pytest.raises(MissingFileError, match="holds several"):
        read_folder(tmp_path, format="goodfire")
