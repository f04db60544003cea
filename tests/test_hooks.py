"""Tests of dictionaries/hooks.py (model loading, hook points, collect and patch) and wrap_model.

Models: tiny GPT-NeoX, GPT-2 and Llama.

Everything is real: transformers models built in-process, nnsight traces, torch forward hooks as the
independent reference. Dimensions are tiny (d_model 32..64, 2 layers, vocab 1024).
"""

from __future__ import annotations

import pytest
import torch

from dictionaries import attachment as A
from dictionaries import hooks as H
from dictionaries.errors import DictionariesError, HookPointError, NotWrappedError, ShapeMismatchError
from dictionaries.recipe import HookPoint

from helpers import ATTN, EMBED, FAMILIES, batch


@pytest.fixture()
def neox(models):
    return models["neox"][1]


def _hooks(family: str, layer: int = 1) -> list[str]:
    prefix, _ = FAMILIES[family]
    return [f"{prefix}.{layer}", f"{prefix}.{layer}.mlp", f"{prefix}.{layer}.{ATTN[family]}",
            f"{prefix}.{layer}.mlp:input", EMBED[family]]


def _torch_capture(model, path: str, io: str, ids, mask):
    """Reference: the activation at a module from a plain torch hook on a full forward."""
    module = model.get_submodule(path)
    got = {}
    if io == "output":
        h = module.register_forward_hook(lambda m, a, o: got.update(x=o[0] if isinstance(o, tuple) else o))
    else:
        h = module.register_forward_pre_hook(
            lambda m, a, k: got.update(x=a[0] if a else next(iter(k.values()))), with_kwargs=True)
    with torch.no_grad():
        pos = H._position_ids(mask)
        model(ids, attention_mask=mask, position_ids=pos, use_cache=False)
    h.remove()
    return got["x"]


# ---- A. primitives -----------------------------------------------------------------------------------
def test_wrap_model_accepts_wrapped_raw_and_folder(tiny_neox, tokenizer, tmp_path):
    wrapped = A.wrap_model(tiny_neox, tokenizer)
    assert A.wrap_model(wrapped) is wrapped
    assert H.torch_model(wrapped) is tiny_neox
    assert wrapped.tokenizer is tokenizer
    tiny_neox.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    from_folder = A.wrap_model(str(tmp_path / "m"))
    ids, mask = batch(tokenizer)
    a = H.run_patched(from_folder, ids, mask)
    b = H.run_patched(wrapped, ids, mask)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_resolve_hook_every_family(models, family):
    raw, wrapped = models[family]
    prefix, d = FAMILIES[family]
    for hook in _hooks(family):
        envoy = A.resolve_hook(wrapped, hook, d_in=d)
        assert envoy._module is raw.get_submodule(hook.split(":")[0])
        assert A.resolve_hook(raw, hook, d_in=d) is raw.get_submodule(hook.split(":")[0])
    hp = HookPoint(module=f"{prefix}.0.mlp", site="mlp", layer=0)
    assert H.find_hook(wrapped, hp).width == d


def test_wrap_model_errors(tmp_path):
    from dictionaries.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="cannot load model"):
        A.wrap_model(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelLoadError, match="no folder at this path"):  # not a Hub id error about its form
        H.load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(NotWrappedError):
        H.collect_activations("gpt2", ["transformer.h.0"], torch.zeros(1, 2, dtype=torch.long))


@pytest.mark.parametrize("device, words", [("nonsense", "expected cpu, cuda"), ("cuda:x", "expected cpu, cuda")])
def test_resolve_device_refuses_what_torch_cannot_parse(device, words):
    from dictionaries.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match=words) as info:
        H.resolve_device(device)
    assert info.value.argument == "device"
    assert H.resolve_device("cpu") == torch.device("cpu")


def test_resolve_device_refuses_a_device_this_machine_lacks():
    from dictionaries.errors import InvalidArgumentError

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(InvalidArgumentError, match="cuda"):
        H.resolve_device(f"cuda:{count}")  # one past the last (with no GPU: any cuda device)
    if count == 0:
        with pytest.raises(InvalidArgumentError, match="no cuda device"):
            H.resolve_device("cuda")
    else:
        assert H.resolve_device("cuda").type == "cuda"


def test_resolve_hook_missing_module_suggests(neox):
    with pytest.raises(HookPointError) as e:
        A.resolve_hook(neox, "gpt_neox.layer.1.mlp")
    assert isinstance(e.value, LookupError)
    assert isinstance(e.value, DictionariesError)
    assert "gpt_neox.layers.1.mlp" in e.value.suggestions
    assert "gpt_neox.layers.1.mlp" in str(e.value)


def test_resolve_hook_bad_io(neox):
    with pytest.raises(HookPointError, match="'input' or 'output'"):
        A.resolve_hook(neox, "gpt_neox.layers.1.mlp:inpt")


def test_resolve_hook_width_mismatch(neox):
    with pytest.raises(ShapeMismatchError) as e:
        A.resolve_hook(neox, "gpt_neox.layers.1.mlp", d_in=512)
    assert "512" in str(e.value)
    assert "64" in str(e.value)
    # a linear layer's own width: the MLP's up-projection outputs 4 * d_model
    assert H.find_hook(neox, "gpt_neox.layers.1.mlp.dense_h_to_4h").width == 256
    assert H.find_hook(neox, "gpt_neox.layers.1.mlp.dense_4h_to_h:input").width == 256


@pytest.mark.parametrize("family", list(FAMILIES))
def test_collect_activations_equals_torch_hooks(models, tokenizer, family):
    raw, wrapped = models[family]
    ids, mask = batch(tokenizer)
    hooks = _hooks(family, 1) + _hooks(family, 0)[:2]   # deliberately not in execution order
    got = H.collect_activations(wrapped, hooks, ids, mask)
    assert len(got) == len(hooks)
    for hook, x in zip(hooks, got):
        path, _, io = hook.partition(":")
        ref = _torch_capture(raw, path, io or "output", ids, mask)
        assert x.shape == (ids.shape[0], ids.shape[1], FAMILIES[family][1]) or x.shape == ref.shape
        torch.testing.assert_close(x, ref)


def test_collect_activations_stops_after_deepest(tiny_neox, neox, tokenizer):
    ids, mask = batch(tokenizer)
    fired = []
    later = tiny_neox.gpt_neox.layers[1].register_forward_hook(lambda *a: fired.append("layer1"))
    head = tiny_neox.get_output_embeddings().register_forward_hook(lambda *a: fired.append("head"))
    try:
        [x] = H.collect_activations(neox, [HookPoint(module="gpt_neox.layers.0.mlp", site="mlp", layer=0)], ids, mask)
        assert fired == []
        H.collect_activations(neox, ["gpt_neox.layers.1.mlp"], ids, mask)
        assert fired == []               # the block's own output hook fires after its MLP: stopped before
        H.run_patched(neox, ids, mask)
        assert fired == ["layer1", "head"]
    finally:
        later.remove()
        head.remove()
    assert x.shape == (3, ids.shape[1], 64)
    assert not x.requires_grad


def test_collect_activations_missing_hook(neox, tokenizer):
    ids, mask = batch(tokenizer)
    with pytest.raises(HookPointError):
        H.collect_activations(neox, ["gpt_neox.layers.7.mlp"], ids, mask)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_run_patched_clean_and_patched(models, tokenizer, family):
    raw, wrapped = models[family]
    ids, mask = batch(tokenizer)
    with torch.no_grad():
        clean = raw(ids, attention_mask=mask, position_ids=H._position_ids(mask)).logits
    torch.testing.assert_close(H.run_patched(wrapped, ids, mask), clean)
    assert H.run_patched(wrapped, ids, mask, patches={}).shape == (3, ids.shape[1], 1024)
    # a patch at an MLP output and one at an attention output (a tuple in transformers 5)
    prefix, _ = FAMILIES[family]
    mlp, attn = f"{prefix}.0.mlp", f"{prefix}.1.{ATTN[family]}"
    patches = {HookPoint(module=mlp, site="mlp", layer=0): lambda x: x * 0.5, attn: lambda x: x + 1.0}
    got = H.run_patched(wrapped, ids, mask, patches)
    h1 = raw.get_submodule(mlp).register_forward_hook(lambda m, a, o: o * 0.5)
    h2 = raw.get_submodule(attn).register_forward_hook(lambda m, a, o: (o[0] + 1.0, *o[1:]))
    with torch.no_grad():
        ref = raw(ids, attention_mask=mask, position_ids=H._position_ids(mask)).logits
    h1.remove()
    h2.remove()
    torch.testing.assert_close(got, ref)
    assert not torch.allclose(got, clean)


def test_run_patched_input_hook_and_batch_slices(tiny_neox, neox, tokenizer):
    ids, mask = batch(tokenizer)
    ids3, mask3 = ids.repeat(3, 1), mask.repeat(3, 1)
    b = ids.shape[0]

    def zero_middle(x):                   # the eval's pattern: slices of a repeated batch treated differently
        x = x.clone()
        x[b:2 * b] = 0
        return x

    got = H.run_patched(neox, ids3, mask3, {"gpt_neox.layers.1.mlp:input": zero_middle})
    clean = H.run_patched(neox, ids, mask)
    torch.testing.assert_close(got[:b], clean)
    torch.testing.assert_close(got[2 * b:], clean)
    h = tiny_neox.gpt_neox.layers[1].mlp.register_forward_pre_hook(lambda m, a: (a[0] * 0,))
    with torch.no_grad():
        ref = tiny_neox(ids, attention_mask=mask, position_ids=H._position_ids(mask)).logits
    h.remove()
    torch.testing.assert_close(got[b:2 * b], ref)


def test_run_patched_bad_patch_shape(neox, tokenizer):
    ids, mask = batch(tokenizer)
    with pytest.raises(ShapeMismatchError) as e:
        H.run_patched(neox, ids, mask, {"gpt_neox.layers.0.mlp": lambda x: x[..., :3]})
    assert str(tuple(ids.shape) + (64,)) in str(e.value)
    assert "3)" in str(e.value)


def _registry_names() -> list[str]:
    from dictionaries.registry import load_registry

    return [e.name for e in load_registry().filter()]


def _skeleton_config(model_id: str):
    """Each registry model's config as published (only widths and depth matter to a hook point)."""
    import transformers

    from training.toymodel import pythia70m_config

    llama3_8b = dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256)
    return {"EleutherAI/pythia-70m-deduped": pythia70m_config,
            "gpt2": transformers.GPT2Config,  # its defaults are GPT-2 small's
            "google/gemma-2-2b": lambda: transformers.Gemma2Config(
                hidden_size=2304, num_hidden_layers=26, intermediate_size=9216, num_attention_heads=8,
                num_key_value_heads=4, head_dim=256, vocab_size=256000),
            "meta-llama/Llama-3.1-8B": lambda: transformers.LlamaConfig(**llama3_8b),
            "meta-llama/Meta-Llama-3-8B": lambda: transformers.LlamaConfig(**llama3_8b)}[model_id]()


@pytest.fixture(scope="module")
def skeletons():
    """model id -> its exact module tree on the meta device (no weights allocated), built on first use."""
    from transformers import AutoModelForCausalLM

    built = {}

    def get(model_id: str):
        if model_id not in built:
            with torch.device("meta"):
                built[model_id] = AutoModelForCausalLM.from_config(_skeleton_config(model_id))
        return built[model_id]

    return get


@pytest.mark.parametrize("name", _registry_names())
def test_every_registry_hook_point_resolves_on_its_model(skeletons, name):
    from dictionaries.registry import load_registry

    card = load_registry().get(name).card
    skeleton = skeletons(card.model.id)
    module = A.resolve_hook(skeleton, card.hook, d_in=card.d_in)
    assert module is skeleton.get_submodule(card.hook.module)
    assert H.find_hook(skeleton, card.hook).width == card.d_in


@pytest.mark.parametrize("cls, saved_as", [("BertForMaskedLM", "BertForMaskedLM"), ("BertModel", "BertModel"),
                                           ("GPT2LMHeadModel", "GPT2LMHeadModel"), ("BertModel", None)])
def test_load_model_in_the_class_its_config_names(cls, saved_as, tokenizer, tmp_path):
    """An encoder loads with its own head (or none), never AutoModelForCausalLM's random causal-LM head."""
    import transformers

    config_cls = transformers.BertConfig if cls.startswith("Bert") else transformers.GPT2Config
    small = dict(vocab_size=1024, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config = config_cls(**small) if cls.startswith("Bert") else config_cls(vocab_size=1024, n_embd=32, n_layer=1,
                                                                            n_head=2)
    model = getattr(transformers, cls)(config)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    if saved_as is None:  # a config without `architectures`: the bare base model for an encoder
        import json

        cfg = json.loads((tmp_path / "config.json").read_text())
        cfg.pop("architectures", None)
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded, _ = H.load_model(str(tmp_path))
    assert type(loaded).__name__ == (saved_as or "BertModel")
    for name, p in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], p)
