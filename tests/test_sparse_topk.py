"""training/sparse_topk.py: the blockwise choosing forward keeps exactly the entries a top over the whole (B, F)
pre-activations keeps (TopK per token, BatchTopK over the batch, AuxK over the dead features), with their
values, for blocks that divide neither F nor k; and the sparse loss equals the dense one for any block size."""

from __future__ import annotations

import pytest
import torch

import training.sparse_topk as st
from dictionaries.architectures import BatchTopKDictionary, TopKDictionary

from helpers import dense_and_sparse
from synthetic import make_recipe

B, D, F, K, AUX = 24, 10, 90, 4, 6


def _module(name: str, seed: int = 0):
    module = (TopKDictionary if name == "topk" else BatchTopKDictionary)(D, F, k=K, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    return module, torch.randn(B, D, generator=g, dtype=torch.float64)


def _entries(kept) -> dict[tuple[int, int], float]:
    return {(int(r), int(f)): float(v) for r, f, v in zip(kept.rows, kept.features, kept.known)}


@pytest.mark.parametrize("sample", [st.SAMPLE_SIZE, 2], ids=["whole_top", "thresholded"])
@pytest.mark.parametrize("block_features", [F, 7, 3, 1], ids=lambda w: f"width{w}")
@pytest.mark.parametrize("name", ["topk", "batchtopk"])
def test_blockwise_choice_equals_the_whole_top(name, block_features, sample, monkeypatch):
    """With sample 2, BatchTopK's flat tops over blocks of 24 x 7 or more take flat_top's threshold path."""
    monkeypatch.setattr(st, "CHOOSE_BLOCK_ELEMENTS", block_features * B)
    monkeypatch.setattr(st, "SAMPLE_SIZE", sample)
    module, x = _module(name)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::4] = True                                                      # 23 dead features
    choice = st.choose(module, x, make_recipe(name, d_dict=F, k=K), dead, AUX)
    with torch.no_grad():
        pre = (x - module.b_dec) @ module.W_enc + module.b_enc            # (B, F), the whole top's input
    if name == "topk":
        values, indices = pre.topk(K, dim=-1)
        want = {(r, int(indices[r, j])): float(values[r, j]) for r in range(B) for j in range(K)}
        assert choice.smallest is None
    else:
        values, indices = pre.relu().flatten().topk(K * B)
        want = {(int(i) // F, int(i) % F): float(v) for v, i in zip(values, indices)}
        assert float(choice.smallest) == pytest.approx(float(values[values > 0].min()))
    assert torch.all(choice.kept.rows[1:] >= choice.kept.rows[:-1])        # rows ascending
    got = _entries(choice.kept)
    assert got.keys() == want.keys()
    assert all(got[key] == pytest.approx(want[key], abs=1e-12) for key in want)
    masked = pre.masked_fill(~dead, float("-inf"))
    values, indices = masked.topk(AUX, dim=-1)
    want_aux = {(r, int(indices[r, j])): float(values[r, j]) for r in range(B) for j in range(AUX)}
    got_aux = _entries(choice.aux)
    assert got_aux.keys() == want_aux.keys() and all(dead[f] for _, f in got_aux)
    assert all(got_aux[key] == pytest.approx(want_aux[key], abs=1e-12) for key in want_aux)


def test_no_dead_features_no_auxk_picks():
    module, x = _module("topk")
    choice = st.choose(module, x, make_recipe("topk", d_dict=F, k=K), torch.zeros(F, dtype=torch.bool), AUX)
    assert choice.aux is None


@pytest.mark.parametrize("block_features", [F, 7], ids=lambda w: f"width{w}")
@pytest.mark.parametrize("name", ["topk", "batchtopk"])
def test_sparse_loss_and_gradients_equal_the_dense_ones_in_blocks(name, block_features, monkeypatch):
    monkeypatch.setattr(st, "CHOOSE_BLOCK_ELEMENTS", block_features * B)
    module, x = _module(name, seed=3)
    recipe = make_recipe(name, d_dict=F, k=K, **{"penalty.aux_k": AUX})
    dead = torch.zeros(F, dtype=torch.bool)
    dead[1::5] = True
    (dense, sparse), grads = dense_and_sparse(module, x, recipe, dead)
    assert sparse.code is not None and float(dense.terms["auxk"].detach()) > 0
    torch.testing.assert_close(sparse.loss, dense.loss)
    torch.testing.assert_close(sparse.terms["auxk"], dense.terms["auxk"])
    assert grads[0].keys() == grads[1].keys() >= {"W_enc", "W_dec", "b_enc", "b_dec"}
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


STRIDE = (4096 // 64) | 1
"""flat_top's sample stride over 4096 values with SAMPLE_SIZE 64 (the tests' setting)."""


def _flat_cases():
    g = torch.Generator().manual_seed(3)
    n = 4096
    yield "normal", torch.randn(n, generator=g), 100
    yield "relu_few_positive", torch.relu(torch.randn(n, generator=g) - 2.5), 200   # k > positives: zeros kept
    clustered = torch.randn(n, generator=g)
    clustered[1::2] += 50.0          # the largest values all at odd places (the odd stride visits both kinds)
    yield "clustered", clustered, 300
    hidden = torch.zeros(n)
    hidden[torch.arange(n) % STRIDE != 0] = 1.0   # the sample sees only zeros: bound 0, every value a candidate
    yield "ties_off_sample", hidden, 50
    with_nan = torch.randn(n, generator=g)
    with_nan[[5, 700]] = float("nan")
    yield "nan", with_nan, 40


@pytest.mark.parametrize("case", list(_flat_cases()), ids=lambda c: c[0])
def test_flat_top_keeps_the_entries_topk_keeps(case, monkeypatch):
    """flat_top's threshold path (SAMPLE_SIZE 64 so that 4096 values take it) against values.topk: the same
    values, at indices that hold them; the same index set where no values tie at the boundary."""
    _, values, k = case
    monkeypatch.setattr(st, "SAMPLE_SIZE", 64)
    got_values, got_indices = st.flat_top(values, k)
    want_values, want_indices = values.topk(k, sorted=False)
    assert got_values.shape == (k,) and got_indices.unique().numel() == k
    torch.testing.assert_close(got_values.sort().values, want_values.sort().values, equal_nan=True)
    torch.testing.assert_close(values[got_indices], got_values, equal_nan=True)
    if values.unique().numel() == values.numel():
        assert set(got_indices.tolist()) == set(want_indices.tolist())


def test_flat_top_falls_back_to_the_whole_top_when_the_sample_misleads(monkeypatch):
    """Values whose large entries all sit off the sample's stride: too few reach the bound, and the whole top
    answers (rather than fewer than k entries)."""
    monkeypatch.setattr(st, "SAMPLE_SIZE", 64)
    n, k = 4096, 500
    values = torch.zeros(n)
    off = torch.arange(n) % STRIDE != 0               # every place the sample does not visit
    values[off] = torch.linspace(1.0, 2.0, int(off.sum()))
    values[~off] = 3.0                                 # the sample sees only these 64 largest: bound 3
    got_values, got_indices = st.flat_top(values, k)
    want_values, _ = values.topk(k, sorted=False)
    torch.testing.assert_close(got_values.sort().values, want_values.sort().values)
    assert set(got_indices.tolist()) == set(values.topk(k).indices.tolist())
