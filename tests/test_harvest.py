"""training/harvest.py: rows per hook from one forward, pad and BOS positions dropped, bad hook points early.

References come from plain torch forward hooks on the same tiny GPT-NeoX, independent of attach.py.
"""

from __future__ import annotations

import pytest
import torch

from dictionaries.errors import HookPointError
from dictionaries.recipe import HookPoint
from training.harvest import Harvester, harvest_chunks

MLP0 = HookPoint(module="gpt_neox.layers.0.mlp", site="mlp", layer=0)
RESID1 = HookPoint(module="gpt_neox.layers.1", site="resid", layer=1)


def _reference(model, paths, input_ids, attention_mask):
    """(batch, pos, d) per module path from plain forward hooks over the full forward."""
    saved, handles = {}, []
    for path in paths:
        def hook(_m, _a, out, path=path):
            saved[path] = out[0] if isinstance(out, tuple) else out
        handles.append(model.get_submodule(path).register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
    for h in handles:
        h.remove()
    return [saved[p] for p in paths]


@pytest.fixture
def batch(tokenizer):
    # right padding stated here: wrapping the shared tokenizer in nnsight (test_attach) turns it to left
    ids = tokenizer(["def f(x): return x", "The for statement is used to iterate"], add_special_tokens=False,
                    padding=True, padding_side="right", return_tensors="pt")
    input_ids, mask = ids["input_ids"], ids["attention_mask"]
    bos = tokenizer.bos_token_id
    input_ids = torch.cat([torch.full((2, 1), bos), input_ids], dim=1)  # a leading BOS on both rows
    mask = torch.cat([torch.ones(2, 1, dtype=mask.dtype), mask], dim=1)
    input_ids[0, 3] = bos                                               # and one inside the first row
    assert (mask == 0).any()                                            # the shorter row is padded
    return input_ids, mask


def test_rows_drop_pad_and_bos(tiny_neox, tokenizer, batch):
    input_ids, mask = batch
    harvester = Harvester(tiny_neox, [MLP0, RESID1], bos_id=tokenizer.bos_token_id, exclude_bos=True)
    rows = harvester(input_ids, mask)
    keep = mask.bool() & (input_ids != tokenizer.bos_token_id)
    refs = _reference(tiny_neox, [MLP0.module, RESID1.module], input_ids, mask)
    assert [r.shape for r in rows] == [(int(keep.sum()), 64), (int(keep.sum()), 64)]
    assert int(keep.sum()) == int(mask.sum()) - 3
    for got, ref in zip(rows, refs):
        torch.testing.assert_close(got, ref[keep], rtol=1e-5, atol=1e-6)


def test_bos_rows_kept_when_not_excluded(tiny_neox, tokenizer, batch):
    input_ids, mask = batch
    rows = Harvester(tiny_neox, [MLP0], bos_id=tokenizer.bos_token_id, exclude_bos=False)(input_ids, mask)
    ref = _reference(tiny_neox, [MLP0.module], input_ids, mask)[0]
    torch.testing.assert_close(rows[0], ref[mask.bool()], rtol=1e-5, atol=1e-6)


def test_widths_are_known_before_training(tiny_neox, tokenizer):
    harvester = Harvester(tiny_neox, [MLP0, RESID1], bos_id=0, exclude_bos=True)
    assert harvester.dims == [64, 64]


def test_missing_hook_point_fails_at_construction(tiny_neox):
    bad = HookPoint(module="gpt_neox.layers.7.mlp", site="mlp", layer=7)
    with pytest.raises(HookPointError) as info:
        Harvester(tiny_neox, [MLP0, bad], bos_id=0, exclude_bos=True)
    assert "gpt_neox.layers.7.mlp" in str(info.value)
    assert any("layers.1.mlp" in s or "layers.0.mlp" in s for s in info.value.suggestions)


def test_chunks_follow_the_contexts_and_end(tiny_neox, tokenizer):
    contexts = torch.randint(2, 1024, (5, 8), generator=torch.Generator().manual_seed(0))
    taken = []

    def next_contexts(n):
        out = contexts[len(taken): len(taken) + n]
        taken.extend(range(len(out)))
        return out

    harvester = Harvester(tiny_neox, [MLP0], bos_id=0, exclude_bos=True)
    chunk = harvest_chunks(harvester, next_contexts, 2)
    sizes = []
    while (rows := chunk()) is not None:
        sizes.append(rows[0].shape[0])
    assert sizes == [16, 16, 8]
