"""Tests of dictionaries/features.py (features_of, inspect_feature, logit lens) and `dictctl inspect`."""

from __future__ import annotations

import pytest
import torch

from dictionaries import attachment as A
from dictionaries import features as F
from dictionaries.errors import (
    CardError,
    FeatureIndexError,
    FormatError,
    HookPointError,
    InvalidArgumentError,
    MissingFileError,
    ShapeMismatchError,
)

from helpers import FAMILIES, make_dictionary

TEXTS = ["The Eiffel Tower is in Paris", "Python objects are", "a", "for x in range(10): print(x)",
         "Exceptions are raised", "import sys"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_features_of_equals_unpadded_traces(models, family, capsys):
    raw, model = models[family]
    prefix, d_model = FAMILIES[family]
    d = make_dictionary(d_model, 96, f"{prefix}.1.mlp")
    got = F.features_of(model, d, TEXTS, batch_size=4, progress=True)
    assert len(got) == len(TEXTS)
    with A.attach(model, d) as sae:
        for text, f in zip(TEXTS, got):
            with torch.no_grad(), model.trace(text):
                alone = sae.features.save()
            assert f.shape == (len(model.tokenizer(text)["input_ids"]), 96)
            torch.testing.assert_close(f, alone[0], atol=1e-5, rtol=1e-4)
    assert "features" in capsys.readouterr().err          # the tqdm bar (2 batches)


def test_features_of_errors(models):
    raw, model = models["neox"]
    with pytest.raises(HookPointError):
        F.features_of(model, make_dictionary(64, 96, None), TEXTS)
    with pytest.raises(ShapeMismatchError):
        F.features_of(model, make_dictionary(32, 96, "gpt_neox.layers.0.mlp"), TEXTS)


@pytest.mark.parametrize("texts, options, argument", [
    ([], {}, "texts"),                     # would report a feature that fires on 0% of 0 tokens
    (TEXTS, {"top": -1}, "top"),           # would fail inside torch.topk
    (TEXTS, {"top": 0}, "top"),            # would report no context and no token
    (TEXTS, {"context": -5}, "context"),   # would cut the window from the wrong end
])
def test_inspect_feature_refuses_what_it_cannot_show(models, texts, options, argument):
    _, model = models["neox"]
    with pytest.raises(InvalidArgumentError) as info:
        F.inspect_feature(model, make_dictionary(64, 96, "gpt_neox.layers.1.mlp"), texts, 0, progress=False, **options)
    assert info.value.argument == argument


def test_inspect_feature_contexts_and_logit_lens(models):
    raw, model = models["neox"]
    d = make_dictionary(64, 96, "gpt_neox.layers.1.mlp")
    feats = F.features_of(model, d, TEXTS, progress=False)
    i = int(torch.cat(feats).gt(0).sum(0).argmax())        # the feature firing most often
    report = F.inspect_feature(model, d, TEXTS, i, top=5, context=3)
    acts = sorted(((float(v), t, p) for t, f in enumerate(feats) for p, v in enumerate(f[:, i]) if v > 0),
                  reverse=True)[:5]
    assert [(e.text, e.position) for e in report.examples] == [(t, p) for _, t, p in acts]
    for e, (v, t, p) in zip(report.examples, acts):
        assert e.activation == pytest.approx(v)
        ids = model.tokenizer(TEXTS[t])["input_ids"]
        assert e.tokens[e.marked] == model.tokenizer.decode([ids[p]])
        assert e.marked == min(p, 3)
        assert "[[" in e.render()
    n = sum(len(f) for f in feats)
    assert report.tokens == n
    assert report.frequency == pytest.approx(int(torch.cat(feats)[:, i].gt(0).sum()) / n)
    # logit lens by hand: final layer norm, then the unembedding
    with torch.no_grad():
        logits = raw.get_output_embeddings()(raw.gpt_neox.final_layer_norm(d.W_dec[i]))
    assert [s.id for s in report.promoted] == logits.topk(5).indices.tolist()
    assert [s.id for s in report.suppressed] == (-logits).topk(5).indices.tolist()
    assert report.promoted[0].score == pytest.approx(float(logits.max()), rel=1e-5)
    with pytest.raises(FeatureIndexError):
        F.inspect_feature(model, d, TEXTS, 96)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logit_lens_other_families(models, family):
    raw, model = models[family]
    prefix, d_model = FAMILIES[family]
    direction = torch.randn(d_model)
    promoted, suppressed = F.logit_lens(model, direction, top=3)
    norm = raw.transformer.ln_f if family == "gpt2" else raw.model.norm
    with torch.no_grad():
        logits = raw.get_output_embeddings()(norm(direction[None, None]))[0, 0]
    assert [s.id for s in promoted] == logits.topk(3).indices.tolist()
    assert F.logit_lens(model, torch.randn(d_model + 1)) == ([], [])   # not a residual direction


def test_read_texts(tmp_path):
    (tmp_path / "t.txt").write_text("one\n\n  two  \n")
    assert F.read_texts(tmp_path / "t.txt") == ["one", "two"]
    with pytest.raises(MissingFileError):
        F.read_texts(tmp_path / "none.txt")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(FormatError, match="not UTF-8"):
        F.read_texts(tmp_path / "latin1.txt")
    (tmp_path / "blank.txt").write_text("\n   \n")
    with pytest.raises(InvalidArgumentError, match="holds no text"):
        F.read_texts(tmp_path / "blank.txt")


def test_inspect_named_checks_its_arguments_before_loading_anything(tmp_path):
    """Neither the dictionary (it does not exist) nor a model is loaded before the texts and sizes are checked."""
    (tmp_path / "blank.txt").write_text("\n")
    with pytest.raises(InvalidArgumentError, match="holds no text"):
        F.inspect_named(str(tmp_path / "no-such-dictionary"), 0, tmp_path / "blank.txt")
    with pytest.raises(InvalidArgumentError, match="context -1"):
        F.inspect_named(str(tmp_path / "no-such-dictionary"), 0, tmp_path / "blank.txt", context=-1)


def _folders(tmp_path, raw, tokenizer, model_id: str | None, neuronpedia: str | None = None):
    from dictionaries.formats import write_native

    raw.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    d = make_dictionary(64, 96, "gpt_neox.layers.1.mlp", model_id=model_id)
    if neuronpedia:
        d.card = d.card.model_copy(update={"links": d.card.links.model_copy(update={"neuronpedia": neuronpedia})})
    write_native(d, tmp_path / "dict")
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS))
    return d


def test_cli_inspect(models, tokenizer, tmp_path):
    from typer.testing import CliRunner

    from dictionaries.cli import app

    raw, model = models["neox"]
    d = _folders(tmp_path, raw, tokenizer, model_id=str(tmp_path / "model"), neuronpedia="toy-neox/1-mlp-t")
    i = int(torch.cat(F.features_of(model, d, TEXTS, progress=False)).gt(0).sum(0).argmax())
    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "dict"), "--feature", str(i), "--texts",
                                   str(tmp_path / "texts.txt"), "--top", "3"])
    assert res.exit_code == 0, res.output
    report = F.inspect_feature(model, d, TEXTS, i, top=3)
    assert f"feature {i}" in res.output
    assert "promotes" in res.output
    assert "suppresses" in res.output
    assert f"neuronpedia: https://www.neuronpedia.org/toy-neox/1-mlp-t/{i}" in res.output
    for e in report.examples:
        assert f"text {e.text} pos {e.position}" in res.output


def test_cli_inspect_errors(models, tokenizer, tmp_path):
    from typer.testing import CliRunner

    from dictionaries.cli import app

    raw, _ = models["neox"]
    _folders(tmp_path, raw, tokenizer, model_id=None)
    base = ["inspect", str(tmp_path / "dict"), "--texts", str(tmp_path / "texts.txt")]
    with pytest.raises(CardError, match="--model"):
        CliRunner().invoke(app, base + ["--feature", "0"], catch_exceptions=False)
    with pytest.raises(FeatureIndexError):
        CliRunner().invoke(app, base + ["--feature", "999", "--model", str(tmp_path / "model")],
                           catch_exceptions=False)
