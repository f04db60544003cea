"""Tests of `attach(...)` and `Attachment` (dictionaries/attachment.py) inside real nnsight traces and generations.

References are computed independently: the dictionary applied by hand to activations from plain torch
forward hooks, and the patched forward done with torch hooks on the raw transformers model.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from dictionaries import attachment as A
from dictionaries import hooks as H
from dictionaries.architectures import ARCHITECTURES
from dictionaries.errors import (
    FeatureIndexError,
    HookPointError,
    ModelMismatchError,
    NotWrappedError,
    OutsideTraceError,
    ShapeMismatchError,
)

from helpers import ATTN, EMBED, FAMILIES, TEXTS, batch, keep_pads, make_dictionary, reference_logits, traced_logits


def identity_dictionary(d_in: int, hook: str):
    """[I, -I] encoder, [I; -I] decoder, zero biases, relu: relu(x) - relu(-x) = x exactly."""
    d = make_dictionary(d_in, 2 * d_in, hook)
    eye = torch.eye(d_in)
    with torch.no_grad():
        d.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        d.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        d.b_enc.zero_()
        d.b_dec.zero_()
    return d


# ---- splice ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_splice_with_error_is_exact_and_without_matches_hand(models, tokenizer, family, kind):
    raw, model = models[family]
    prefix, d_model = FAMILIES[family]
    path = f"{prefix}.0.mlp"
    d = make_dictionary(d_model, 96, path, kind)
    ids, mask = batch(tokenizer)
    clean = H.run_patched(model, ids, mask)
    with A.attach(model, d) as sae:
        kept = traced_logits(model, ids, mask, lambda: sae.splice(error=True))
        spliced = traced_logits(model, ids, mask, lambda: sae.splice(error=False))
    assert torch.equal(kept, clean)
    with torch.no_grad():
        ref = reference_logits(raw, ids, mask, {path: keep_pads(mask, lambda x: d(x).reconstruction)})
    torch.testing.assert_close(spliced, ref)
    assert not torch.allclose(spliced, clean)


def test_sparse_features_decode_like_dense(models, tokenizer):
    from dictionaries import sparse_decoding as S

    raw, model = models["neox"]
    path = "gpt_neox.layers.0.mlp"
    d = make_dictionary(64, 2048, path)
    ids, mask = batch(tokenizer)
    [x] = H.collect_activations(model, [path], ids, mask)
    with torch.no_grad():   # one threshold leaving about 0.5% of the features active, as trained ones are
        d.b_enc.sub_(d.pre_activation(x[mask.bool()]).flatten().quantile(0.995))
        f = d.encode(x)
    density = float((f[mask.bool()] > 0).float().mean())
    assert 0 < density < S.ACTIVE_ROWS_DENSITY
    torch.testing.assert_close(S.decode_mostly_zero(d, f), d.decode(f))
    with A.attach(model, d) as sae:
        got = traced_logits(model, ids, mask, lambda: sae.splice(error=False))
    with torch.no_grad():
        ref = reference_logits(raw, ids, mask, {path: keep_pads(mask, lambda x: d(x).reconstruction)})
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_identity_dictionary_spliced_without_error_changes_nothing(models, tokenizer, family):
    raw, model = models[family]
    prefix, d_model = FAMILIES[family]
    ids, mask = batch(tokenizer)
    clean = H.run_patched(model, ids, mask)
    for path in (f"{prefix}.1", f"{prefix}.0.{ATTN[family]}", f"{prefix}.1.mlp:input", EMBED[family]):
        with A.attach(model, identity_dictionary(d_model, path)) as sae:
            got = traced_logits(model, ids, mask, lambda: sae.splice(error=False))
        torch.testing.assert_close(got, clean, rtol=0, atol=1e-5)


def test_features_reconstruction_error_are_consistent(models, tokenizer):
    raw, model = models["neox"]
    ids, mask = batch(tokenizer)
    d = make_dictionary(64, 96, "gpt_neox.layers.1.mlp")
    [x] = H.collect_activations(model, ["gpt_neox.layers.1.mlp"], ids, mask)
    with A.attach(model, d) as sae, torch.no_grad(), model.trace(ids, attention_mask=mask):
        f = sae.features.save()
        x_hat = sae.reconstruction.save()
        err = sae.error.save()
    real = mask.bool()
    assert f.shape == (3, ids.shape[1], 96)
    torch.testing.assert_close(f[real], d.encode(x)[real])
    assert (f[~real] == 0).all()
    torch.testing.assert_close(x_hat[real] + err[real], x[real])
    torch.testing.assert_close(x_hat[real], d(x).reconstruction[real])


def test_dictionary_in_another_dtype(models, tokenizer):
    raw, model = models["neox"]
    d = make_dictionary(64, 96, "gpt_neox.layers.0.mlp")
    ids, mask = batch(tokenizer)
    with A.attach(model, d) as sae:
        want = traced_logits(model, ids, mask, lambda: sae.splice(error=False))
    with A.attach(model, d.double()) as sae:
        with torch.no_grad(), model.trace(ids, attention_mask=mask):
            f = sae.features.save()
            sae.splice(error=False)
            got = model.output.logits.save()
    assert f.dtype == torch.float64
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ---- edits -------------------------------------------------------------------------------------------
def test_ablate_steer_set_equal_hand_edits(models, tokenizer):
    raw, model = models["neox"]
    path = "gpt_neox.layers.0.mlp"
    d = make_dictionary(64, 96, path)
    ids, mask = batch(tokenizer)
    [x] = H.collect_activations(model, [path], ids, mask)
    f = d.encode(x).detach()
    i, j = int(f[mask.bool()].sum(0).argmax()), 5           # a feature that fires, and another
    W = d.W_dec.detach()
    cases = {
        "ablate": (lambda s: s.ablate([i, j]), lambda x: x - f[..., [i, j]] @ W[[i, j]]),
        "ablate_value": (lambda s: s.ablate(i, value=2.0), lambda x: x + (2.0 - f[..., i:i + 1]) * W[i]),
        "steer": (lambda s: s.steer(i, 3.0), lambda x: x + 3.0 * W[i]),
        "set": (lambda s: s.set(j, 1.5), lambda x: x + (1.5 - f[..., j:j + 1]) * W[j]),
        "ablate_no_error": (lambda s: s.ablate(i, error=False),
                            lambda x: d.decode(f.index_fill(-1, torch.tensor([i]), 0.0))),
        "compose": (lambda s: (s.ablate(i), s.steer(j, 1.0)), lambda x: x - f[..., i:i + 1] * W[i] + W[j]),
    }
    clean = H.run_patched(model, ids, mask)
    with A.attach(model, d) as sae:
        for name, (edit, by_hand) in cases.items():
            got = traced_logits(model, ids, mask, lambda: edit(sae))
            with torch.no_grad():
                ref = reference_logits(raw, ids, mask, {path: keep_pads(mask, by_hand)})
            torch.testing.assert_close(got, ref, msg=name)
            assert not torch.allclose(got, clean), name


def test_two_sites_in_one_trace_equal_sequential_patches(models, tokenizer):
    raw, model = models["neox"]
    p0, p1 = "gpt_neox.layers.0.mlp", "gpt_neox.layers.1"
    d0, d1 = make_dictionary(64, 96, p0, seed=1), make_dictionary(64, 80, p1, seed=2)
    ids, mask = batch(tokenizer)
    with A.attach(model, d0, d1) as (s0, s1), torch.no_grad(), model.trace(ids, attention_mask=mask):
        s0.splice(error=False)
        f1 = s1.features.save()
        s1.ablate(3)
        logits = model.output.logits.save()
    # one after the other: layer 0 spliced, then layer 1 read from that forward and edited
    splice0 = keep_pads(mask, lambda x: d0(x).reconstruction)
    with torch.no_grad():
        h = raw.get_submodule(p0).register_forward_hook(lambda m, a, o: splice0(o))
        [x1] = H.collect_activations(raw, [p1], ids, mask)
        h.remove()
        g1 = d1.encode(x1)
        ref = reference_logits(raw, ids, mask, {p0: splice0,
                                               p1: keep_pads(mask, lambda x: x - g1[..., 3:4] * d1.W_dec[3])})
    torch.testing.assert_close(f1[mask.bool()], g1[mask.bool()])
    torch.testing.assert_close(logits, ref)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_padded_batch_features_equal_unpadded(models, tokenizer, family):
    raw, model = models[family]
    prefix, d_model = FAMILIES[family]
    d = make_dictionary(d_model, 96, f"{prefix}.1.mlp")
    ids, mask = batch(tokenizer)
    assert not mask.all()                                     # the batch really is padded
    with A.attach(model, d) as sae:
        with torch.no_grad(), model.trace(ids, attention_mask=mask):
            batched = sae.features.save()
        for row, text in enumerate(TEXTS):
            with torch.no_grad(), model.trace(text):
                alone = sae.features.save()
            torch.testing.assert_close(batched[row][mask[row].bool()], alone[0], atol=1e-5, rtol=1e-4)
            assert (batched[row][~mask[row].bool()] == 0).all()


def test_generate_with_splice(models, tokenizer):
    raw, model = models["neox"]
    path = "gpt_neox.layers.0.mlp"
    d = make_dictionary(64, 96, path)
    prompt = tokenizer(["The Eiffel Tower is in", "a"], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=1)
    with A.attach(model, d) as sae:
        with torch.no_grad(), model.generate(prompt["input_ids"], attention_mask=prompt["attention_mask"], **kw) as tr:
            shapes = list().save()
            for _ in tr.iter[0:4]:
                shapes.append(tuple(sae.features.shape))
                sae.splice(error=False)
            ids = tr.result.save()
    recon = {"n": 0}

    def splice(m, a, o):        # reference: the same splice by a torch hook during plain generate
        recon["n"] += 1
        real = _last_mask["m"][:, -o.shape[1]:].bool()[..., None]
        return torch.where(real, d(o).reconstruction, o)

    _last_mask = {}
    pre = raw.register_forward_pre_hook(lambda m, a, k: _last_mask.update(m=k["attention_mask"]), with_kwargs=True)
    h = raw.get_submodule(path).register_forward_hook(splice)
    with torch.no_grad():
        ref = raw.generate(prompt["input_ids"], attention_mask=prompt["attention_mask"], **kw)
    h.remove()
    pre.remove()
    assert shapes == [(2, prompt["input_ids"].shape[1], 96)] + [(2, 1, 96)] * 3
    assert recon["n"] == 4
    assert torch.equal(ids, ref)


# ---- the usage example of DESIGN.md section 1, with a local folder instead of the Hub ------------------
def test_design_usage_example(models, tmp_path):
    from dictionaries import attach, load_dictionary
    from dictionaries.formats import write_native

    raw, model = models["neox"]
    write_native(make_dictionary(64, 96, "gpt_neox.layers.1.mlp"), tmp_path / "d")
    d = load_dictionary(tmp_path / "d")
    with attach(model, d) as sae:
        with model.trace("The Eiffel Tower is in"):
            f = sae.features.save()
            sae.splice(error=True)
    assert f.shape[0] == 1
    assert f.shape[2] == 96
    assert (f > 0).any()


# ---- errors ------------------------------------------------------------------------------------------
def test_attach_errors(models):
    raw, model = models["neox"]
    with pytest.raises(NotWrappedError):
        with A.attach(raw, make_dictionary(64, 96, "gpt_neox.layers.0.mlp")):
            pass
    with pytest.raises(HookPointError, match="names no hook point"):
        with A.attach(model, make_dictionary(64, 96, None)):
            pass
    with pytest.raises(HookPointError) as e:
        with A.attach(model, make_dictionary(64, 96, "gpt_neox.layers.0.mpl")):
            pass
    assert "gpt_neox.layers.0.mlp" in e.value.suggestions
    with pytest.raises(ShapeMismatchError) as e:
        with A.attach(model, make_dictionary(512, 96, "gpt_neox.layers.0.mlp")):
            pass
    assert not isinstance(e.value, ModelMismatchError)
    assert "512" in str(e.value)
    assert "64" in str(e.value)
    with pytest.raises(HookPointError, match="2 hook points given for 1"):
        with A.attach(model, make_dictionary(64, 96, None), at=["gpt_neox.layers.0", "gpt_neox.layers.1"]):
            pass


def test_attach_at_overrides_card_hook(models, tokenizer):
    raw, model = models["neox"]
    d = make_dictionary(64, 96, None)
    ids, mask = batch(tokenizer)
    [x] = H.collect_activations(model, ["gpt_neox.layers.1.mlp:input"], ids, mask)
    with A.attach(model, d, at="gpt_neox.layers.1.mlp:input") as sae, torch.no_grad(), \
            model.trace(ids, attention_mask=mask):
        f = sae.features.save()
    torch.testing.assert_close(f[mask.bool()], d.encode(x)[mask.bool()])


def test_card_of_another_model(models):
    raw, model = models["neox"]
    old = raw.config._name_or_path
    raw.config._name_or_path = "EleutherAI/pythia-70m-deduped"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # the right model: no warning
            pythia = make_dictionary(64, 96, "gpt_neox.layers.0.mlp", model_id="EleutherAI/pythia-70m-deduped")
            with A.attach(model, pythia):
                pass
        with pytest.warns(A.ModelMismatchWarning, match="gpt2"):
            with A.attach(model, make_dictionary(64, 96, "gpt_neox.layers.0.mlp", model_id="openai-community/gpt2")):
                pass
        with pytest.raises(ModelMismatchError) as e:
            with A.attach(model, make_dictionary(768, 96, "gpt_neox.layers.0.mlp", model_id="openai-community/gpt2")):
                pass
    finally:
        raw.config._name_or_path = old
    assert e.value.card_model == "openai-community/gpt2"
    assert e.value.expected == 768
    assert e.value.found == 64


def test_feature_index_out_of_range(models, tokenizer):
    raw, model = models["neox"]
    ids, mask = batch(tokenizer)
    with A.attach(model, make_dictionary(64, 96, "gpt_neox.layers.0.mlp")) as sae:
        with pytest.raises(FeatureIndexError, match="0..95"):
            with torch.no_grad(), model.trace(ids, attention_mask=mask):
                sae.ablate(96)


def test_several_invokes_mask_each_invokes_pads(models):
    raw, model = models["neox"]
    d = make_dictionary(64, 96, "gpt_neox.layers.1.mlp")
    with A.attach(model, d) as sae:
        with torch.no_grad(), model.trace() as tr:
            with tr.invoke(TEXTS[0]):
                long = sae.features.save()
            with tr.invoke(TEXTS[2]):                   # one token, left-padded to the other's length
                short = sae.features.save()
        with torch.no_grad(), model.trace(TEXTS[2]):
            alone = sae.features.save()
    assert long.shape[:2] == short.shape[:2]
    assert short.shape[1] > 1
    assert (short[0, :-1] == 0).all()
    torch.testing.assert_close(short[:, -1:], alone, atol=1e-5, rtol=1e-4)


def test_site_outside_a_trace(models):
    raw, model = models["neox"]
    with A.attach(model, make_dictionary(64, 96, "gpt_neox.layers.0.mlp")) as sae:
        with pytest.raises(OutsideTraceError, match="model.trace"):
            sae.features
        with pytest.raises(OutsideTraceError):
            sae.splice()


@pytest.mark.gpu
def test_splice_on_cuda(tiny_neox, tokenizer):
    import copy

    raw = copy.deepcopy(tiny_neox).cuda()
    model = A.wrap_model(raw, tokenizer)
    d = make_dictionary(64, 96, "gpt_neox.layers.1.mlp").cuda()
    ids, mask = (t.cuda() for t in batch(tokenizer))
    clean = H.run_patched(model, ids, mask)
    with A.attach(model, d) as sae:
        kept = traced_logits(model, ids, mask, lambda: sae.splice(error=True))
        spliced = traced_logits(model, ids, mask, lambda: sae.splice(error=False))
    assert torch.equal(kept, clean)
    ref = reference_logits(raw, ids, mask, {"gpt_neox.layers.1.mlp": keep_pads(mask, lambda x: d(x).reconstruction)})
    torch.testing.assert_close(spliced, ref)


def test_a_module_named_like_an_nnsight_attribute_attaches():
    """BERT names its MLP output `encoder.layer.L.output`; nnsight serves that child as `E_output`."""
    import warnings

    import nnsight
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nnsight's note that it renamed the colliding child
        model = nnsight.NNsight(bert)
    d = make_dictionary(32, 64, "encoder.layer.1.output")
    ids = torch.randint(0, 100, (2, 7))
    clean = bert(ids).last_hidden_state
    with A.attach(model, d) as sae, torch.no_grad(), model.trace(ids):
        f = sae.features.save()
        sae.splice(error=True)
        out = model.output.last_hidden_state.save()
    assert f.shape == (2, 7, 64)
    torch.testing.assert_close(out, clean)
    [x] = H.collect_activations(bert, ["encoder.layer.1.output"], ids)
    torch.testing.assert_close(f, d.encode(x))
