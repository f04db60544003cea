"""Big models (issue 11, item 5): model dtype and device_map through the real loading path, and a bf16 model with
an fp32 dictionary in attach, harvest, training, evaluation, inspect and dashboards (activations cast at the
boundary). CPU bf16 is real bf16 arithmetic, so these run anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dictionaries.attachment import attach, wrap_model
from dictionaries.errors import InvalidArgumentError
from dictionaries.hooks import collect_activations, load_model
from dictionaries.placement import dtype_name, input_device, is_dispatched, model_dtype, parse_device_map

from helpers import batch, dictctl, make_dictionary

ROOT = Path(__file__).resolve().parents[1]
HOOK = "gpt_neox.layers.1.mlp"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The toy GPT-NeoX and its tokenizer saved as a local model folder, in bf16 (as Pythia's checkpoints are
    saved in fp16: their config names that dtype)."""
    from training.toymodel import build_model, build_tokenizer

    path = tmp_path_factory.mktemp("model") / "toy"
    build_model().to(torch.bfloat16).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def test_model_dtype_names():
    assert model_dtype(None) is torch.float32
    assert [model_dtype(v) for v in ("bf16", "BFloat16", "torch.float16", "half", torch.bfloat16)] == \
        [torch.bfloat16, torch.bfloat16, torch.float16, torch.float16, torch.bfloat16]
    assert dtype_name("bf16") == "bfloat16" and dtype_name(None) == "float32"
    for bad in ("int8", "fp8", torch.int32, 3):
        with pytest.raises(InvalidArgumentError, match="fp32, bf16 or fp16"):
            model_dtype(bad)


def test_parse_device_map():
    assert parse_device_map(None) is None
    assert parse_device_map("auto") == "auto" and parse_device_map("cpu") == "cpu"
    assert parse_device_map('{"gpt_neox": "cpu", "embed_out": "cpu"}') == {"gpt_neox": "cpu", "embed_out": "cpu"}
    with pytest.raises(InvalidArgumentError, match="JSON object"):
        parse_device_map('{"gpt_neox": ')
    with pytest.raises(InvalidArgumentError, match="device"):
        parse_device_map("autoo")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgumentError, match="no cuda device"):
            parse_device_map({"gpt_neox": 0})


def test_load_model_dtype_and_device_map(folder, tokenizer):
    """fp32 is the default whatever the config says (transformers 5 alone would load the config's dtype: bf16
    here); bf16 loads bf16; "cpu" and "auto" maps go through transformers + accelerate (which computes the
    "auto" map from the memory it sees) and give the same model (its logits) as a plain load."""
    plain, _ = load_model(str(folder))
    assert next(plain.parameters()).dtype is torch.float32 and not is_dispatched(plain)
    half, _ = load_model(str(folder), dtype="bf16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    ids, mask = batch(tokenizer)
    with torch.no_grad():
        ref = plain(ids, attention_mask=mask).logits
    for device_map in ("cpu", "auto"):
        placed, _ = load_model(str(folder), device_map=device_map)
        assert not is_dispatched(placed)  # one device: placed as it loads, no accelerate hooks between blocks
        assert input_device(placed) == torch.device("cpu")
        with torch.no_grad():
            assert torch.equal(placed(ids, attention_mask=mask).logits, ref)
    meta, _ = load_model(str(folder), device_map={"": "meta"})  # the map reaches transformers: placed on meta
    assert {p.device.type for p in meta.parameters()} == {"meta"}


def test_bf16_model_fp32_dictionary_attach(folder, tokenizer):
    """Read and splice on a bf16 model with an fp32 dictionary: features in the dictionary's dtype, the error
    term writes the output back exactly, without it the output moves; an ablation moves it by a bf16 delta."""
    model = wrap_model(str(folder), dtype="bf16")
    d = make_dictionary(64, 96, HOOK)
    ids, mask = batch(tokenizer)
    with model.trace({"input_ids": ids, "attention_mask": mask}):
        clean = model.output.logits.save()
    with attach(model, d) as sae:
        with model.trace({"input_ids": ids, "attention_mask": mask}):
            f = sae.features.save()
            x_hat = sae.reconstruction.save()
            sae.splice(error=True)
            same = model.output.logits.save()
        with model.trace({"input_ids": ids, "attention_mask": mask}):
            sae.splice(error=False)
            spliced = model.output.logits.save()
        with model.trace({"input_ids": ids, "attention_mask": mask}):
            sae.ablate(list(range(96)))
            ablated = model.output.logits.save()
    assert f.dtype is torch.float32 and x_hat.dtype is torch.bfloat16 and clean.dtype is torch.bfloat16
    assert int((f > 0).sum()) > 0
    assert torch.equal(same, clean)
    real = mask.bool()
    assert not torch.allclose(spliced[real], clean[real], atol=1e-2)
    assert not torch.allclose(ablated[real], clean[real], atol=1e-2)
    [x] = collect_activations(model, [HOOK], ids, mask)  # harvest stays in the model's dtype
    assert x.dtype is torch.bfloat16 and x.shape == (*ids.shape, 64)


DISK_MAP = {"gpt_neox.embed_in": "cpu", "gpt_neox.emb_dropout": "cpu", "gpt_neox.rotary_emb": "cpu",
            "gpt_neox.layers.0": "cpu", "gpt_neox.layers.1": "disk", "gpt_neox.final_layer_norm": "cpu",
            "lm_head": "cpu"}
"""Block 1 offloaded to disk: accelerate dispatches the model with hooks that bring its weights in for each
forward, as for a model bigger than the devices' memory (on a CPU-only machine, the one multi-place map)."""


def test_a_dispatched_model_with_offloaded_weights(folder, tokenizer):
    """A model spread by a device map (accelerate's hooks, weights loaded from disk at their block) works in
    harvest, attach and evaluation exactly as the same model loaded whole."""
    from training.evaluate import evaluate

    whole = wrap_model(str(folder))
    spread = wrap_model(str(folder), device_map=json.dumps(DISK_MAP))
    hf = spread._module
    assert is_dispatched(hf) and hf.hf_device_map["gpt_neox.layers.1"] == "disk"
    assert "meta" in {p.device.type for p in hf.gpt_neox.layers[1].parameters()}  # not in memory between forwards
    ids, mask = batch(tokenizer)
    d = make_dictionary(64, 96, HOOK)
    outputs = []
    for model in (whole, spread):
        [x] = collect_activations(model, [HOOK], ids, mask)
        with attach(model, d) as sae:
            with model.trace({"input_ids": ids, "attention_mask": mask}):
                sae.splice(error=False)
                spliced = model.output.logits.save()
        [r] = evaluate(model, [d], [(ids, mask)], tokens=ids.numel(), context_length=ids.shape[1],
                       sensitivity=False, progress=False)
        outputs.append((x, spliced, r.stats))
    (x1, s1, st1), (x2, s2, st2) = outputs
    assert torch.equal(x1, x2) and torch.allclose(s1, s2, atol=1e-5)
    assert st1.fvu == pytest.approx(st2.fvu, rel=1e-5) and st1.ce_spliced == pytest.approx(st2.ce_spliced, rel=1e-5)


def test_wrap_model_dtype_and_device_map_of_objects(tokenizer):
    from training.toymodel import build_model

    raw = build_model()
    wrapped = wrap_model(raw, tokenizer, dtype="fp16")
    assert next(raw.parameters()).dtype is torch.float16 and wrapped.tokenizer is tokenizer
    with pytest.raises(InvalidArgumentError, match="HF id or folder"):
        wrap_model(build_model(), tokenizer, device_map="auto")


def test_bf16_model_in_inspect_and_dashboard(folder, tokenizer):
    """inspect (contexts, frequency, logit lens through a bf16 unembedding) and a dashboard pass on a bf16 model
    agree with the fp32 model to bf16 precision."""
    from dictionaries.dashboard import build_dashboard, token_batches
    from dictionaries.features import inspect_feature
    from training.toymodel import corpus_documents

    d = make_dictionary(64, 96, HOOK)
    texts = [t[:300] for t in corpus_documents()[:6]]
    runs = {}
    for dtype in ("fp32", "bf16"):
        model = wrap_model(str(folder), dtype=dtype)
        report = inspect_feature(model, d, texts, 5, top=5, progress=False)
        data = build_dashboard(model, d, token_batches(tokenizer, texts, tokens=512, context_length=32),
                               progress=False)
        runs[dtype] = report, data
    (r32, d32), (r16, d16) = runs["fp32"], runs["bf16"]
    assert r32.tokens == r16.tokens and 0 < r32.frequency < 1 and abs(r32.frequency - r16.frequency) < 0.03
    assert r16.no_lens is None and len({s.id for s in r16.promoted} & {s.id for s in r32.promoted}) >= 3
    assert d16.tokens == d32.tokens and int(d32.count.sum()) > 0
    assert (d16.count - d32.count).abs().sum() <= 0.03 * d32.count.sum()


def test_train_and_eval_with_a_bf16_model(tmp_path, folder, tokenizer):
    """A recipe with model_dtype bfloat16 loads its model so (here through a device map), trains an fp32
    dictionary on the bf16 activations, evaluates it on the held-out tokens (loss recovered, sensitivity) and
    records the dtype; `dictctl eval`'s library call then defaults to the recipe's model dtype."""
    from dictionaries.errors import RecipeError
    from dictionaries.loader import load_dictionary
    from dictionaries.recipe import Recipe
    from training.evaluate import evaluate_and_write
    from training.presets import preset
    from training.run import train
    from training.toymodel import build_model, corpus_documents

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(corpus_documents()[:60]))
    fields = dict(model={"id": str(folder)}, hook={"module": HOOK, "site": "mlp", "layer": 1},
                  dataset={"path": str(corpus)}, context_length=32, tokens=128 * 12, batch_size=128,
                  buffer_contexts=16, harvest_batch_size=8, d_dict=96, k=8, holdout_tokens=1024)
    recipe = Recipe.model_validate(preset("topk", **fields, model_dtype="bfloat16"))
    [out] = train(recipe, out=tmp_path / "run", device="cpu", device_map="auto", progress=False)
    trained = load_dictionary(str(out))
    card = trained.card
    assert card.recipe.model_dtype == "bfloat16" and card.dtype == "float32"
    assert trained.W_enc.dtype is torch.float32
    s = card.stats
    assert s.tokens > 0 and 0 < s.fvu < 1 and s.l0 <= 8 and s.frac_loss_recovered is not None
    assert s.sensitivity is not None
    with pytest.raises(RecipeError, match="model_dtype"):  # a model object in another dtype than the recipe's
        train(recipe, out=tmp_path / "other", model=build_model(), tokenizer=tokenizer, progress=False)
    evaluated = {}
    for dtype in (None, "fp32"):
        [(_, c)] = evaluate_and_write(str(out), dataset=str(corpus), tokens=512, context_length=32, progress=False,
                                      sensitivity=False, out=str(tmp_path / f"ev-{dtype}"), model_dtype=dtype)
        evaluated[dtype] = c.stats
    bf16, fp32 = evaluated[None], evaluated["fp32"]
    assert bf16.ce_clean != fp32.ce_clean  # the default is the recipe's bf16, not fp32
    assert abs(bf16.ce_clean - fp32.ce_clean) < 0.02 * fp32.ce_clean and abs(bf16.fvu - fp32.fvu) < 0.05


def test_cli_bad_model_dtype_and_device_map_are_one_line(tmp_path, monkeypatch, capsys):
    """The real `dictctl` in a subprocess for one; the same entry point in this process for the other (cheaper)."""
    r = subprocess.run([sys.executable, "-m", "dictionaries.cli", "eval", str(tmp_path), "--model-dtype", "int8"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("bad argument: model dtype 'int8'") and "fp32, bf16 or fp16" in r.stderr
    code, _, err = dictctl(monkeypatch, capsys, "train", "pythia70m/mlp3/8192", "--device-map", "everywhere")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("bad argument: device_map 'everywhere'") and "auto, balanced" in err
