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


def test_an_output_width_without_an_output_hook_is_refused():
    with pytest.raises(ValidationError, match="for transcoders: give `output_hook`"):
        _card(d_out=12)
    assert _card(skip=True, pre_encoder_bias=False).skip   # an SAE with a skip term (sparsify's skip_connection)


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


# ---- attach -------------------------------------------------------------------------------------------
def _spliced_by_hand(raw, path, d, ids, mask=None, edit=None):
    """Logits with the MLP's output replaced, by plain torch hooks (hooks.run_patched), by d's prediction from
    the MLP's input (pad positions keep the true output); `edit(f)` changes the features first."""
    from dictionaries.hooks import run_patched

    seen = {}

    def read(x):
        seen["x"] = x
        return x

    def write(y):
        x = seen["x"]
        f = d.encode(x)
        pred = d.predict(x, f if edit is None else edit(f.clone()))
        return pred if mask is None else torch.where(mask.bool()[..., None], pred, y)

    return run_patched(raw, ids, mask, {f"{path}:input": read, path: write})


def _traced(model, ids, mask, body):
    with torch.no_grad(), model.trace(ids, attention_mask=mask):
        body()
        logits = model.output.logits.save()
    return logits


@pytest.mark.parametrize(("family", "kind", "skip"), [("neox", "relu", False), ("neox", "topk", True),
                                                      ("gpt2", "jumprelu", True), ("llama", "gated", False)])
def test_splice_replaces_the_mlp_output_by_the_prediction(models, tokenizer, family, kind, skip):
    from dictionaries import attachment as A
    from dictionaries import hooks as H

    from helpers import FAMILIES, batch

    raw, model = models[family]
    prefix, d_model = FAMILIES[family]
    path = f"{prefix}.0.mlp"
    d = make_transcoder(d_model, d_model, 48, f"{path}:input", path, kind=kind, skip=skip)
    ids, mask = batch(tokenizer)
    clean = H.run_patched(model, ids, mask)
    x, = H.collect_activations(raw, [f"{path}:input"], ids, mask)                  # the MLP's input
    with A.attach(model, d) as tc:
        with torch.no_grad(), model.trace(ids, attention_mask=mask):
            f = tc.features.save()
            tc.splice(error=True)
            kept = model.output.logits.save()
        spliced = _traced(model, ids, mask, lambda: tc.splice(error=False))
        ablated = _traced(model, ids, mask, lambda: tc.ablate([0, 5], error=False))
        steered = _traced(model, ids, mask, lambda: tc.steer(3, 2.0))
    real = mask.bool()[..., None]
    torch.testing.assert_close(f, torch.where(real, d.encode(x), 0.0))             # features from the input hook
    assert bool((f != 0).any())
    assert torch.equal(kept, clean)                                                # the error term added back
    torch.testing.assert_close(spliced, _spliced_by_hand(raw, path, d, ids, mask))
    assert not torch.allclose(spliced, clean)

    def zero(f):
        f[..., [0, 5]] = 0
        return f

    torch.testing.assert_close(ablated, _spliced_by_hand(raw, path, d, ids, mask, zero))

    def plus(y):   # steering with the error term moves the true output by 2 W_dec[3] at real positions
        return y + torch.where(mask.bool()[..., None], 2.0 * d.W_dec[3], 0.0)

    torch.testing.assert_close(steered, H.run_patched(raw, ids, mask, {path: plus}))


@pytest.mark.parametrize("family", ["neox", "llama"])
def test_splice_inside_generate(models, tokenizer, family):
    from dictionaries import attachment as A

    from helpers import FAMILIES

    raw, model = models[family]
    prefix, d_model = FAMILIES[family]
    path = f"{prefix}.1.mlp"
    d = make_transcoder(d_model, d_model, 48, f"{path}:input", path, kind="topk", skip=True, layer=1)
    prompt = tokenizer(["The Eiffel Tower is in"], return_tensors="pt")["input_ids"]
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=1)
    outs = []
    for error in (True, False):
        with A.attach(model, d) as tc, torch.no_grad(), model.generate(prompt, **kw) as tr:
            for _ in tr.iter[0:3]:
                tc.splice(error=error)
            outs.append(tr.result.save())
    with torch.no_grad():
        clean = raw.generate(prompt, **kw)
        handle = raw.get_submodule(path).register_forward_hook(lambda m, a, o: d.predict(a[0], d.encode(a[0])))
        ref = raw.generate(prompt, **kw)
        handle.remove()
    assert torch.equal(outs[0], clean)
    assert torch.equal(outs[1], ref)


def test_an_output_hook_of_the_wrong_width_is_refused(models):
    from dictionaries import attachment as A
    from dictionaries.errors import ShapeMismatchError

    _, model = models["neox"]
    d = make_transcoder(64, 32, 48, "gpt_neox.layers.0.mlp:input", "gpt_neox.layers.0.mlp")
    with pytest.raises(ShapeMismatchError, match="32"), A.attach(model, d):
        pass


def _dictctl(*args: str, env: dict) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "dictionaries.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env})


def test_dictctl_show_prints_the_transcoder_fields_and_a_contradiction_in_one_line(registry):
    import yaml

    card = _card(name="toy/mlp0/16-tc", output_hook=OUT, skip=True).model_dump(mode="json", exclude_none=True)
    (registry.parent / "cards" / "toy" / "mlp0").mkdir(parents=True)
    (registry.parent / "cards" / "toy" / "mlp0" / "16-tc.yaml").write_text(yaml.safe_dump(card))
    index = yaml.safe_load(registry.read_text())
    index["entries"]["toy/mlp0/16-tc"] = {"card": "toy/mlp0/16-tc.yaml",
                                          "location": {"kind": "url", "url": "https://example.org/tc/"}}
    registry.write_text(yaml.safe_dump(index))
    env = {"DICTIONARIES_REGISTRY": str(registry)}
    shown = json.loads(_dictctl("show", "toy/mlp0/16-tc", "--json", env=env).stdout)
    assert shown["output_hook"]["module"] == "gpt_neox.layers.0.mlp" and shown["hook"]["io"] == "input"
    assert shown["skip"] is True and shown["pre_encoder_bias"] is False
    (registry.parent / "cards" / "toy" / "mlp0" / "16-tc.yaml").write_text(
        yaml.safe_dump({**card, "pre_encoder_bias": True}))
    bad = _dictctl("show", "toy/mlp0/16-tc", env=env)
    lines = [line for line in (bad.stdout + bad.stderr).splitlines() if line.strip()]
    assert bad.returncode == 1 and len(lines) == 1 and "pre_encoder_bias" in lines[0], lines
