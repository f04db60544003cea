"""Tests of dictionaries/hookpoints.py: other libraries' hook names mapped to nnsight module paths, per model family."""

from __future__ import annotations

from pathlib import Path

import pytest

from dictionaries.hookpoints import (
    dictionary_learning_hook,
    dictionary_learning_model,
    family,
    model_id,
    saelens_hook,
    sparsify_hook,
)
from dictionaries.recipe import HookPoint


@pytest.mark.parametrize("name, expected", [("pythia-70m-deduped", "EleutherAI/pythia-70m-deduped"),
                                            ("EleutherAI/pythia-70m", "EleutherAI/pythia-70m"),
                                            ("gpt2-small", "gpt2"), ("gemma-2-2b", "google/gemma-2-2b"),
                                            ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B"), (None, None),
                                            ("", None)])
def test_model_id(name, expected):
    assert model_id(name) == expected


@pytest.mark.parametrize("model, fam", [("EleutherAI/pythia-70m-deduped", "gpt_neox"), ("gpt2", "gpt2"),
                                        ("openai-community/gpt2-medium", "gpt2"), ("meta-llama/Llama-3.1-8B", "llama"),
                                        ("google/gemma-2-2b", "gemma2"), ("Qwen/Qwen2.5-7B", "qwen2"),
                                        ("bert-base-uncased", "bert"), ("distilbert-base-uncased", None),
                                        ("EleutherAI/gpt-j-6b", "gptj"), ("facebook/opt-125m", "opt"),
                                        ("HuggingFaceTB/SmolLM2-135M", None), (None, None)])
def test_family(model, fam):
    assert family(model) == fam


TL_CASES = [  # (hook name, model, module, io, site, layer)
    ("blocks.3.hook_mlp_out", "EleutherAI/pythia-70m-deduped", "gpt_neox.layers.3.mlp", "output", "mlp", 3),
    ("blocks.3.hook_attn_out", "EleutherAI/pythia-70m-deduped", "gpt_neox.layers.3.attention", "output", "attn", 3),
    ("blocks.3.hook_resid_post", "EleutherAI/pythia-70m-deduped", "gpt_neox.layers.3", "output", "resid", 3),
    ("blocks.3.hook_resid_pre", "EleutherAI/pythia-70m-deduped", "gpt_neox.layers.3", "input", "resid", 2),
    ("blocks.0.hook_resid_pre", "gpt2", "transformer.h.0", "input", "embed", None),
    ("blocks.5.hook_mlp_out", "gpt2", "transformer.h.5.mlp", "output", "mlp", 5),
    ("blocks.5.hook_attn_out", "gpt2", "transformer.h.5.attn", "output", "attn", 5),
    ("blocks.5.attn.hook_z", "gpt2", "transformer.h.5.attn.c_proj", "input", "attn", 5),
    ("blocks.5.mlp.hook_post", "gpt2", "transformer.h.5.mlp.c_proj", "input", "mlp", 5),
    ("hook_embed", "gpt2", "transformer.wte", "output", "embed", None),
    ("blocks.7.hook_mlp_out", "meta-llama/Llama-3.1-8B", "model.layers.7.mlp", "output", "mlp", 7),
    ("blocks.7.hook_attn_out", "google/gemma-2-2b", "model.layers.7.post_attention_layernorm", "output", "attn", 7),
    ("blocks.7.attn.hook_z", "meta-llama/Llama-3.1-8B", "model.layers.7.self_attn.o_proj", "input", "attn", 7),
    # Gemma 2 adds the post-norm's output (TransformerLens' hook_attn_out / hook_mlp_out, Gemma Scope)
    ("blocks.7.hook_mlp_out", "google/gemma-2-2b", "model.layers.7.post_feedforward_layernorm", "output", "mlp", 7),
    ("blocks.3.hook_resid_mid", "gpt2", "transformer.h.3.ln_2", "input", "resid", 3),
    ("blocks.3.hook_mlp_in", "gpt2", "transformer.h.3.ln_2", "input", "resid", 3),
    ("blocks.3.ln2.hook_normalized", "gpt2", "transformer.h.3.mlp", "input", "mlp", 3),
    ("blocks.2.hook_mlp_out", "facebook/opt-125m", "model.decoder.layers.2.fc2", "output", "mlp", 2),
    ("blocks.2.hook_attn_out", "tiiuae/falcon-7b", "transformer.h.2.self_attention", "output", "attn", 2),
    ("blocks.2.hook_mlp_out", "bert-base-uncased", "bert.encoder.layer.2.output.dense", "output", "mlp", 2),
    ("hook_embed", "EleutherAI/gpt-j-6b", "transformer.wte", "output", "embed", None),
]


@pytest.mark.parametrize("hook, model, module, io, site, layer", TL_CASES)
def test_transformerlens_hooks(hook, model, module, io, site, layer):
    fields = saelens_hook(model, hook)
    assert fields == {"module": module, "io": io, "site": site, "layer": layer}
    HookPoint(**fields)  # a valid card field


@pytest.mark.parametrize("hook, model", [("blocks.3.hook_resid_mid", "EleutherAI/pythia-70m"),  # parallel block
                                         ("blocks.3.hook_mlp_out", "distilbert-base"),
                                         ("blocks.3.hook_mlp_out", None), ("blocks.x.hook_mlp_out", "gpt2"),
                                         (None, "gpt2")])
def test_unknown_hooks_stay_unset(hook, model):
    assert saelens_hook(model, hook) is None


@pytest.mark.parametrize("submodule, layer, module, site", [
    ("mlp_out_layer3", None, "gpt_neox.layers.3.mlp", "mlp"),
    ("attn_out_layer0", None, "gpt_neox.layers.0.attention", "attn"),
    ("resid_out_layer5", None, "gpt_neox.layers.5", "resid"), ("resid_post_layer_3", 3, "gpt_neox.layers.3", "resid"),
    ("embed", None, "gpt_neox.embed_in", "embed"), (None, 4, "gpt_neox.layers.4", "resid")])
def test_dictionary_learning_submodules(submodule, layer, module, site):
    fields, _ = dictionary_learning_hook("EleutherAI/pythia-70m-deduped", submodule, layer, "out",
                                         Path("/x/run/trainer_0"))
    assert (fields["module"], fields["site"], fields["io"]) == (module, site, "output")


def test_dictionary_learning_folder_names():
    folder = Path("/cache/dictionaries/pythia-70m-deduped/attn_out_layer4/10_32768")
    assert dictionary_learning_model(folder) == "EleutherAI/pythia-70m-deduped"
    fields, how = dictionary_learning_hook("EleutherAI/pythia-70m-deduped", None, None, None, folder)
    assert fields["module"] == "gpt_neox.layers.4.attention"
    assert "folder name" in how
    assert dictionary_learning_model(Path("/tmp/some/ae")) is None
    fields, how = dictionary_learning_hook("EleutherAI/pythia-70m-deduped", "my_custom_site", None, None, folder)
    assert fields is None
    assert "set card.hook by hand" in how


@pytest.mark.parametrize("model, hookpoint, module, site", [
    ("EleutherAI/pythia-160m", "layers.6", "gpt_neox.layers.6", "resid"),
    ("EleutherAI/pythia-160m", "layers.6.mlp", "gpt_neox.layers.6.mlp", "mlp"),
    ("gpt2", "h.2.attn", "transformer.h.2.attn", "attn"),
    ("meta-llama/Llama-3.2-1B", "layers.9.self_attn", "model.layers.9.self_attn", "attn"),
    ("HuggingFaceTB/SmolLM2-135M", "layers.1", None, None),  # family unknown: left unset
    ("gpt2", "h.2.ln_1", None, None),
    ("google/gemma-2-2b", "layers.4.mlp", "model.layers.4.mlp", "mlp"),
    ("facebook/opt-125m", "decoder.layers.4", "model.decoder.layers.4", "resid"),
    ("Qwen/Qwen3-0.6B", "embed_tokens", "model.embed_tokens", "embed")])
def test_sparsify_hookpoints(model, hookpoint, module, site):
    fields = sparsify_hook(model, hookpoint)
    assert (fields["module"], fields["site"]) == (module, site) if module else fields is None
