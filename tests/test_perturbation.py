"""training/perturbation.py: the sensitivity test's perturbed forwards, whole contexts against the last token over
a cached prefix, with and without the blocks before the hook replayed, on tiny models of several families."""

from __future__ import annotations

from functools import cache

import pytest
import torch

from dictionaries.hooks import collect_activations
from training import perturbation as P

SMALL = dict(vocab_size=1024, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             initializer_range=0.2)  # logits far enough from uniform that a perturbation shows
GQA = dict(SMALL, num_key_value_heads=1, head_dim=16)
SPECS = {  # family -> (config class, model class, config kwargs): 2 layers, d_model 32
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", SMALL),                       # parallel attn + mlp
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=1024, n_embd=32, n_layer=2, n_head=2,
                                                initializer_range=0.2)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", SMALL),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", GQA),                              # post-norms, soft-capping
    "opt": ("OPTConfig", "OPTForCausalLM", dict(vocab_size=1024, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(vocab_size=1024, hidden_size=32, num_hidden_layers=2,
                                                         num_attention_heads=2)),      # block returns a tuple
}
SITES = [("resid_pre", 1), ("resid_mid", 1), ("resid_post", 0), ("resid_post", 1), ("mlp_in", 1), ("mlp_out", 1),
         ("attn_out", 1), ("attn_z", 0), ("mlp_post", 1)]


@cache
def tiny(name: str):
    import transformers

    config_cls, model_cls, kw = SPECS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**kw, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    return getattr(transformers, model_cls)(config).eval()


class _Bar:
    def update(self, n: int) -> None:
        pass


def _blocks(model):
    from dictionaries.model_families import family_of

    fam = family_of(model.config.model_type)
    return list(getattr(model, fam.base).get_submodule(fam.layers))


def test_the_blocks_before_a_hook_are_those_its_activation_does_not_feed(tiny_neox):
    from dictionaries.recipe import HookPoint

    blocks = _blocks(tiny_neox)
    for path, io, expected in [("gpt_neox.layers.1.mlp", "output", 1), ("gpt_neox.layers.1", "input", 1),
                               ("gpt_neox.layers.1.attention.dense", "input", 1), ("gpt_neox.layers.0", "output", 1),
                               ("gpt_neox.layers.1", "output", 2), ("gpt_neox.layers.0.mlp", "output", 0)]:
        found = P.find_blocks_before(tiny_neox, HookPoint(module=path, io=io, site="mlp", layer=0))
        assert found == blocks[:expected], (path, io)
    for outside in ("gpt_neox.embed_in", "gpt_neox.final_layer_norm"):       # not inside the block list
        assert P.find_blocks_before(tiny_neox, HookPoint(module=outside, site="resid", layer=0)) is None


def test_a_block_output_with_another_tensor_is_not_replayed():
    x = torch.zeros(2, 1, 4)
    assert P._replayable(x) and P._replayable((x, None))
    assert not P._replayable((x, torch.zeros(2, 2, 1, 1)))                 # attention weights need every row


def _directions(model, site, ids, n_kinds=2):
    """kind -> (N, d) random directions scaled to the norm of the hook's activation at the last token."""
    base = collect_activations(model, [site], ids)[0][:, -1].float()          # (N, d)
    g = torch.Generator().manual_seed(3)
    return {f"k{j}": torch.nn.functional.normalize(torch.randn(base.shape, generator=g), dim=-1)
            * base.norm(dim=-1, keepdim=True) for j in range(n_kinds)}


@pytest.mark.parametrize("name,site", [(n, s) for n in SPECS for s in SITES
                                       if not (s[0] == "resid_mid" and n in ("gpt_neox", "falcon"))])  # parallel
def test_replaying_the_blocks_before_the_hook_gives_the_full_forwards_curves(name, site):
    """The three paths agree at every site (inside a block, at its input or output, the last block's output)
    for parallel (NeoX, Falcon), sequential, post-norm (Gemma 2) and flattening (OPT) blocks; and with skipping,
    the blocks before the hook compute nothing for the perturbed rows (their modules see N rows only)."""
    model = tiny(name)
    ids = torch.randint(2, 1024, (3, 10), generator=torch.Generator().manual_seed(1))
    dirs, steps = _directions(model, site, ids), torch.tensor([0.0, 2.0, 32.0])
    full = P.curves_full(model, site, ids, None, torch.full((3,), 9), dirs, steps, 4, _Bar())
    plain = P.curves_from_prefix(model, site, ids, P.prefix_cache(model, ids), dirs, steps, 6, _Bar(),
                                 skip_before_hook=False)
    skipped = P.find_blocks_before(model, site)
    assert skipped is not None and len(skipped) == site[1] + (site[0] == "resid_post")
    cache, calls = P.prefix_cache(model, ids), []
    handles = [m.register_forward_hook(lambda m, _a, _o: calls.append(m)) for b in skipped for m in b.children()]
    try:
        fast = P.curves_from_prefix(model, site, ids, cache, dirs, steps, 6, _Bar())   # 6: 2 bases per forward
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == len(set(calls)) and (calls or not skipped)     # each ran once: in the clean forward
    for kind in dirs:
        assert full[kind][:, -1].min() > 1e-4, kind                           # the perturbations move the output
        torch.testing.assert_close(plain[kind], full[kind], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fast[kind], full[kind], rtol=1e-4, atol=1e-6)


def test_another_hook_on_a_replayed_block_applies_once():
    """A hook someone left on a skipped block (a splice at an earlier layer) changes the replayed output once, as
    it does in the whole-context forward, not twice (the recording takes the block's output before it)."""
    from dictionaries.hooks import first_tensor, replace_first

    model, site = tiny("gpt2"), ("mlp_out", 1)
    ids = torch.randint(2, 1024, (3, 10), generator=torch.Generator().manual_seed(1))
    dirs, steps = _directions(model, site, ids, n_kinds=1), torch.tensor([0.0, 8.0])
    shift = torch.randn(32, generator=torch.Generator().manual_seed(4))      # not constant: LayerNorm removes that
    handle = _blocks(model)[0].register_forward_hook(lambda _m, _a, out: replace_first(out, first_tensor(out) + shift))
    try:
        full = P.curves_full(model, site, ids, None, torch.full((3,), 9), dirs, steps, 6, _Bar())
        fast = P.curves_from_prefix(model, site, ids, P.prefix_cache(model, ids), dirs, steps, 6, _Bar())
    finally:
        handle.remove()
    torch.testing.assert_close(fast["k0"], full["k0"], rtol=1e-4, atol=1e-6)
    assert full["k0"][:, -1].min() > 1e-4
