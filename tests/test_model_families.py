"""Tests of dictionaries/model_families.py through the one resolver (hooks.find_hook) and nnsight: every site
of every family in the table, on a tiny random model built from the family's config class.

For each (family, site): the plain-torch path (collect_activations, what harvesting and inspection use)
reads (batch, pos, d); inside an nnsight `trace` features read, a splice with the error term leaves the
output unchanged and one without it equals the same splice done by plain torch hooks (run_patched, what
evaluation uses); inside `generate` (causal LMs) a splice with the error term leaves the tokens unchanged.
A site the family has no module for raises HookPointError saying why.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import nnsight
import pytest
import torch

from dictionaries import attachment as A
from dictionaries import hooks as H
from dictionaries.errors import HookPointError
from dictionaries.model_families import FAMILIES, SITES, family_of, site_path
from dictionaries.recipe import HookPoint

from helpers import batch, make_dictionary

LAYER = 1
SMALL = dict(vocab_size=1024, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
GQA = dict(SMALL, num_key_value_heads=2, head_dim=16)
SPECS = {  # family -> (config class, model class, config kwargs)
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=1024, n_embd=32, n_layer=2, n_head=2)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", SMALL),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(vocab_size=1024, n_embd=32, n_layer=2, n_head=2, rotary_dim=8)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", SMALL),
    "mistral": ("MistralConfig", "MistralForCausalLM", GQA),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", GQA),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", GQA),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", GQA),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", GQA),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", GQA),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", SMALL),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(vocab_size=1024, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(vocab_size=1024, hidden_size=32, num_hidden_layers=2,
                                                         num_attention_heads=2)),
    "bert": ("BertConfig", "BertForMaskedLM", SMALL),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", dict(SMALL, max_position_embeddings=130)),
}


def test_every_family_has_a_spec_and_every_site_an_entry():
    assert set(SPECS) == set(FAMILIES)
    for fam in FAMILIES.values():
        assert set(fam.sites) | set(fam.unreadable) == set(SITES), fam.name


@lru_cache(maxsize=1)
def tiny(name: str):
    import transformers

    config_cls, model_cls, kw = SPECS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**kw, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    model = getattr(transformers, model_cls)(config).eval()
    assert family_of(config.model_type) is FAMILIES[name]
    return model


def _splice_reference(d):
    def patch(x):                       # (batch, pos, d): what attach's splice(error=False) writes
        return d.decode(d.encode(x)).to(x.dtype)
    return patch


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("name", list(SPECS))
def test_site_reads_splices_and_generates(name, site, tokenizer):
    raw = tiny(name)
    fam = FAMILIES[name]
    where = site_path(fam, site, LAYER, config=raw.config)
    if isinstance(where, str):
        with pytest.raises(HookPointError, match="parallel"):
            H.find_hook(raw, (site, LAYER))
        return
    found = H.find_hook(raw, (site, LAYER))
    assert (found.path, found.io) == (where.module, where.io)
    ids, mask = batch(tokenizer, ["The Eiffel Tower is in", "a b"])
    x, = H.collect_activations(raw, [(site, LAYER)], ids, mask)              # (batch, pos, d)
    assert x.shape[:2] == ids.shape and (found.width in (None, x.shape[-1]))
    d = make_dictionary(x.shape[-1], 24, found.key)

    model = A.wrap_model(raw, tokenizer) if fam.causal else nnsight.NNsight(raw)
    with torch.no_grad():
        with model.trace(ids, attention_mask=mask):
            clean = model.output.logits.save()
        with A.attach(model, d, at=(site, LAYER)) as sae:
            with model.trace(ids, attention_mask=mask):
                f = sae.features.save()
                sae.splice(error=True)
                kept = model.output.logits.save()
            one = ids[:1]                                                        # no padding
            with model.trace(one):
                sae.splice(error=False)
                spliced = model.output.logits.save()
    assert f.shape == (*ids.shape, 24) and bool((f != 0).any())
    torch.testing.assert_close(kept, clean, rtol=0, atol=1e-5)
    reference = H.run_patched(raw, one, None, {(site, LAYER): _splice_reference(d)})
    torch.testing.assert_close(spliced, reference, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(spliced, clean[:1], atol=1e-4)
    if fam.causal:
        _check_generate(raw, model, d, site, ids[:1])


def _check_generate(raw, model, d, site, prompt):
    kw = dict(max_new_tokens=2, do_sample=False, pad_token_id=1)
    with torch.no_grad():
        ref = raw.generate(prompt, **kw)
        with A.attach(model, d, at=(site, LAYER)) as sae:
            with model.generate(prompt, **kw) as tr:
                for _ in tr.iter[0:2]:
                    sae.splice(error=True)
                ids = tr.result.save()
    assert torch.equal(ids, ref)


def test_unknown_model_type_says_to_give_a_path():
    raw = tiny("gpt2")
    raw.config.model_type = "mystery"
    try:
        with pytest.raises(HookPointError, match="not in the table"):
            H.find_hook(raw, ("mlp_out", 0))
    finally:
        raw.config.model_type = "gpt2"


def test_bare_base_model_has_no_prefix():
    from transformers import BertConfig, BertModel

    bare = BertModel(BertConfig(**SMALL)).eval()
    assert H.find_hook(bare, ("mlp_out", 1)).path == "encoder.layer.1.output.dense"
    assert H.find_hook(bare, ("resid_pre", 0)).key == "encoder.layer.0:input"


def test_sequential_variants_have_resid_mid():
    from transformers import FalconConfig, GPTNeoXConfig, OPTConfig

    neox = GPTNeoXConfig(use_parallel_residual=False)
    assert site_path(FAMILIES["gpt_neox"], "resid_mid", 2, config=neox).module == \
        "gpt_neox.layers.2.post_attention_layernorm"
    falcon = FalconConfig(parallel_attn=False, new_decoder_architecture=False)
    assert site_path(FAMILIES["falcon"], "resid_mid", 0, config=falcon).module == \
        "transformer.h.0.post_attention_layernorm"
    opt350 = OPTConfig(do_layer_norm_before=False)
    hook = site_path(FAMILIES["opt"], "resid_mid", 1, config=opt350)
    assert (hook.module, hook.io) == ("model.decoder.layers.1.self_attn_layer_norm", "output")
    assert "parallel" in site_path(FAMILIES["gptj"], "resid_mid", 0)


@pytest.mark.parametrize("name", list(SPECS))
def test_foreign_hook_names_land_on_the_table(name):
    """TransformerLens, dictionary_learning and sparsify names of a family resolve to modules of its model."""
    from dictionaries.hookpoints import dictionary_learning_hook, saelens_hook, sparsify_hook

    raw, fam = tiny(name), FAMILIES[name]
    for tl, site in (("hook_resid_pre", "resid_pre"), ("hook_mlp_out", "mlp_out"), ("hook_attn_out", "attn_out"),
                     ("attn.hook_z", "attn_z"), ("mlp.hook_post", "mlp_post"), ("hook_resid_post", "resid_post")):
        fields = saelens_hook(None, f"blocks.{LAYER}.{tl}", fam)
        assert H.find_hook(raw, HookPoint(**fields)).key == H.find_hook(raw, (site, LAYER)).key, tl
    fields, _ = dictionary_learning_hook(None, f"mlp_out_layer{LAYER}", None, "out", Path("/x/ae"), fam)
    assert fields["module"] == H.find_hook(raw, ("mlp_out", LAYER)).path
    fields = sparsify_hook(None, f"{fam.layers}.{LAYER}", fam)
    assert fields["module"] == H.find_hook(raw, ("resid_post", LAYER)).path
    H.find_hook(raw, HookPoint(**saelens_hook(None, "hook_embed", fam)))


# ---- training and evaluation at every site: one pass per family ------------------------------------------
@pytest.mark.parametrize("name", list(SPECS))
def test_every_site_trains_and_evaluates(name, tokenizer, tmp_path):
    """One train() pass per family trains a TopK dictionary at every site the family has (one harvest, all
    hooks); training.evaluate then measures each on held-out text in one pass: reconstruction stats, loss
    recovered through the LM head (causal and masked LMs alike) and the sensitivity test. (The folders'
    plots, written the same way for every model, are left out here: they cost more than the rest.)"""
    from dictionaries.loader import load_dictionary
    from dictionaries.recipe import DatasetSpec, Recipe
    from training.evaluate import evaluate
    from training.presets import preset
    from training.run import train
    from training.toymodel import corpus_documents

    raw = tiny(name)
    sites = [s for s in SITES if not isinstance(site_path(FAMILIES[name], s, LAYER, config=raw.config), str)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(corpus_documents()[:40]))
    recipes = [Recipe.model_validate(preset(
        "topk", model={"id": f"tiny-{name}"}, hook=H.site_hook(raw, site, LAYER).card_fields,
        dataset={"path": str(corpus)}, context_length=16, tokens=64 * 4, batch_size=64, buffer_contexts=8,
        harvest_batch_size=8, d_dict=48, k=4, holdout_tokens=256)) for site in sites]
    outs = train(recipes, out=tmp_path / "run", device="cpu", model=raw, tokenizer=tokenizer, progress=False,
                 names=[f"tiny-{name}/{site}" for site in sites], eval_tokens=0)
    assert len(outs) == len(sites) >= 6
    trained = [load_dictionary(str(out)) for out in outs]
    assert [d.card.hook.module for d in trained] == [r.hook.module for r in recipes]
    results = evaluate(raw, trained, DatasetSpec(path=str(corpus)), tokenizer=tokenizer, tokens=256,
                       context_length=16, sensitivity_samples=4, progress=False)
    for site, result in zip(sites, results):
        s = result.stats
        assert s.tokens > 0 and s.l0 <= 4 + 1e-6, (name, site)
        assert 0 < s.fvu < 10, (name, site)
        assert s.frac_loss_recovered is not None and s.ce_spliced is not None, (name, site)
        assert result.sensitivity is not None, (name, site)
