"""Transcoders and skip-transcoders: the card's fields, the modules, native folders, and attach (splice at the
output hook from features of the input hook) on tiny GPT-NeoX, GPT-2 and Llama models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError

from dictionaries.card import Card, Files
from dictionaries.formats import read_folder, write_native
from dictionaries.recipe import HookPoint, Recipe

from helpers import make_transcoder

KINDS = ["relu", "topk", "batchtopk", "jumprelu", "gated"]
IN = HookPoint(module="gpt_neox.layers.0.mlp", io="input", site="mlp", layer=0)
OUT = HookPoint(module="gpt_neox.layers.0.mlp", site="mlp", layer=0)


def _card(**kw) -> Card:
    return Card(**{"name": "t/mlp0/16", "architecture": "relu", "d_in": 8, "d_dict": 16, "files": Files(items=[]),
                   "hook": IN, **kw})


# ---- the card -----------------------------------------------------------------------------------------
def test_a_transcoder_card_has_no_pre_encoder_bias_unless_it_asks_and_then_it_is_refused():
    assert _card(output_hook=OUT).pre_encoder_bias is False   # b_dec lives in the output space
    assert _card().pre_encoder_bias is True                    # an SAE keeps the default
    with pytest.raises(ValidationError, match="pre_encoder_bias.*contradicts.*output_hook"):
        _card(output_hook=OUT, pre_encoder_bias=True)


@pytest.mark.parametrize("field", [{"skip": True}, {"d_out": 12}])
def test_transcoder_fields_without_an_output_hook_are_refused(field):
    with pytest.raises(ValidationError, match="for transcoders: give `output_hook`"):
        _card(**field)


def test_a_transcoder_recipe_refuses_resampling_into_the_decoder():
    base = {"preset": "x", "model": {"id": "m"}, "hook": IN, "output_hook": OUT, "dataset": {"path": "d"},
            "tokens": 8192, "d_dict": 16}
    assert Recipe(**base).pre_encoder_bias is False
    with pytest.raises(ValidationError, match="resampling.kind` anthropic"):
        Recipe(**base, resampling={"kind": "anthropic"})


def test_dictctl_schema_shows_the_transcoder_fields():
    out = subprocess.run([sys.executable, "-m", "dictionaries.cli", "schema"], capture_output=True, text=True,
                         check=True).stdout
    props = json.loads(out)["properties"]
    assert {"output_hook", "d_out", "skip"} <= set(props)
    assert "W_skip" in props["skip"]["description"]


# ---- the modules --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_every_architecture_predicts_the_output_width_with_the_skip_term(kind):
    d = make_transcoder(6, 10, 16, "m.mlp:input", "m.mlp", kind=kind, skip=True)
    assert tuple(d.W_dec.shape) == (16, 10) and tuple(d.b_dec.shape) == (10,) and tuple(d.W_skip.shape) == (6, 10)
    x = torch.randn(2, 3, 6)
    y, f = d(x)
    assert y.shape == (2, 3, 10) and f.shape == (2, 3, 16)
    # Paulo et al. 2025: prediction = W_dec f + b_dec + x W_skip, with f from the input alone (no b_dec shift)
    torch.testing.assert_close(y, f @ d.W_dec + d.b_dec + x @ d.W_skip)
    plain = make_transcoder(6, 10, 16, "m.mlp:input", "m.mlp", kind=kind, skip=False)
    assert plain.W_skip is None and torch.equal(plain(x).reconstruction, plain.decode(plain.encode(x)))


@pytest.mark.parametrize("kind", ["topk", "gated"])
@pytest.mark.parametrize("skip", [False, True])
def test_native_folders_round_trip(tmp_path, kind, skip):
    d = make_transcoder(6, 10, 16, "m.mlp:input", "m.mlp", kind=kind, skip=skip, seed=3)
    card = write_native(d, tmp_path / "tc")
    assert card.output_hook == d.card.output_hook and card.d_out == 10 and card.skip is skip
    back = read_folder(tmp_path / "tc")
    assert back.card.output_hook.module == "m.mlp" and back.d_out == 10
    x = torch.randn(4, 6)
    torch.testing.assert_close(back(x).reconstruction, d(x).reconstruction)
    saved = json.loads((tmp_path / "tc" / "card.json").read_text())
    assert saved["pre_encoder_bias"] is False and saved["output_hook"]["io"] == "output"


def test_a_card_that_disagrees_with_the_tensors_is_refused(tmp_path):
    d = make_transcoder(6, 10, 16, "m.mlp:input", "m.mlp", skip=True)
    with pytest.raises(Exception, match="skip"):
        write_native(d, tmp_path / "a", card=d.card.model_copy(update={"skip": False}))
    with pytest.raises(Exception, match="W_dec"):
        write_native(d, tmp_path / "b", card=d.card.model_copy(update={"d_out": 12}))
