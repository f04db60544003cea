"""dictionaries/sparse_decoding.py and the paths that use it: decoding (and its gradients) through the active
features only equals the dense (B, F) @ (F, d) product, in the module's decode, in the TopK / BatchTopK training
loss (AuxK included) and over whole Trainer runs."""

from __future__ import annotations

import pytest
import torch

from dictionaries.architectures import BatchTopKDictionary, TopKDictionary
from dictionaries.sparse_decoding import decode_code, decode_dense, flat_code, gathered_pre_activations, topk_code
from training import losses
from training.trainer import Trainer

from helpers import dense_and_sparse
from synthetic import D_IN, SparseSource, make_recipe

B, D, F, K = 40, 12, 96, 5


def _params(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype).requires_grad_() for shape in ((F, D), (D,), (D, F), (F,))]


def test_decode_code_and_its_gradients_equal_the_dense_product():
    W_dec, b_dec, _, _ = _params()
    g = torch.Generator().manual_seed(1)
    pre = torch.randn(B, F, generator=g, dtype=torch.float64)
    pre[3] = -1.0                                                     # a token with no positive entry
    rows, feats = flat_code(pre.flatten().topk(K * B).indices, F)     # BatchTopK-like: uneven counts per row
    values = pre[rows, feats].relu().requires_grad_()
    dense_f = torch.zeros(B, F, dtype=torch.float64).index_put((rows, feats), values)
    target = torch.randn(B, D, generator=g, dtype=torch.float64)
    sparse = decode_code(W_dec, b_dec, rows, feats, values, B)
    grads = torch.autograd.grad((sparse - target).pow(2).sum(), (W_dec, b_dec, values))
    dense = dense_f @ W_dec + b_dec
    expected = torch.autograd.grad((dense - target).pow(2).sum(), (W_dec, b_dec, values))
    torch.testing.assert_close(sparse, dense)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    assert torch.equal(topk_code(torch.tensor([[2, 0], [1, 3]]))[0], torch.tensor([0, 0, 1, 1]))


@pytest.mark.parametrize("pre_encoder_bias", [True, False], ids=["b_dec", "no_b_dec"])
@pytest.mark.parametrize("known", [False, True], ids=["computed", "known"])
def test_gathered_pre_activations_and_their_gradients_equal_the_dense_projection(known, pre_encoder_bias,
                                                                                  monkeypatch):
    """(x - b_dec) W_enc + b_enc at the kept entries, computed from the gathered columns, or given (`known`) and
    returned exactly, with the dense projection's gradients in x, W_enc, b_enc and b_dec; in entry and feature
    blocks that divide neither the entries nor F (the block size made 7)."""
    import dictionaries.sparse_decoding as sd

    monkeypatch.setattr(sd, "ENTRIES_PER_BLOCK_ELEMENTS", 7 * D)
    monkeypatch.setattr(sd, "TRANSPOSED_BLOCK_ELEMENTS", 7 * D)
    _, b_dec, W_enc, b_enc = _params()
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    indices = torch.randn(B, F).topk(K, -1).indices
    rows, feats = topk_code(indices)
    inputs = (x, W_enc, b_enc, b_dec) if pre_encoder_bias else (x, W_enc, b_enc)
    dense = ((x - b_dec if pre_encoder_bias else x) @ W_enc + b_enc)[rows, feats]
    given = dense.detach() + 1e-3 if known else None           # off by 1e-3: the result is the given values
    got = gathered_pre_activations(x, W_enc, b_enc, b_dec if pre_encoder_bias else None, rows, feats, given)
    weights = torch.randn(got.shape, dtype=torch.float64)
    grads = torch.autograd.grad((got * weights).sum(), inputs)
    expected = torch.autograd.grad((dense * weights).sum(), inputs)
    assert torch.equal(got, given) if known else torch.allclose(got, dense)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name, dead", [("topk", 0), ("topk", 30), ("batchtopk", 0)])
def test_sparse_training_loss_equals_the_dense_one_with_its_gradients(name, dead, dtype):
    """Loss, reconstruction, features and every parameter's gradient; AuxK over `dead` dead features."""
    recipe = make_recipe(name, d_dict=F, k=K)
    module = (TopKDictionary if name == "topk" else BatchTopKDictionary)(D, F, k=K, dtype=dtype)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.3)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    mask = torch.zeros(F, dtype=torch.bool)
    mask[torch.randperm(F, generator=g)[:dead]] = True
    (dense, sparse), grads = dense_and_sparse(module, x, recipe, mask)
    assert sparse.code is not None and dense.code is None              # the sparse path did run
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(sparse.loss, dense.loss, **tol)
    torch.testing.assert_close(sparse.x_hat, dense.x_hat, **tol)
    assert sparse.features is None                                      # no dense (B, F) kept: the code has it
    rows, feats, values = sparse.code
    torch.testing.assert_close(torch.zeros_like(dense.features).index_put_((rows, feats), values), dense.features,
                               **tol)
    if dead:
        assert float(dense.terms["auxk"].detach()) > 0
        torch.testing.assert_close(sparse.terms["auxk"], dense.terms["auxk"], **tol)
    if name == "batchtopk":
        torch.testing.assert_close(sparse.smallest_kept, dense.smallest_kept, **tol)
    assert grads[0].keys() == grads[1].keys() and "W_enc" in grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], **tol, msg=n)


@pytest.mark.parametrize("name", ["topk", "batchtopk"])
def test_trainer_runs_with_sparse_decoding_track_the_dense_ones(name):
    """60 float64 steps (AuxK's dead features appear on the way): the same weights and metrics."""
    recipe = make_recipe(name, dtype="float64", d_dict=512, k=2,     # 512 features, 512 picks a step: some die
                         **({"penalty.aux_dead_tokens": 512} if name == "topk" else {}))
    runs = []
    for sparse in (False, True):
        source = SparseSource()
        t = Trainer(recipe, D_IN, total_steps=60)
        t.sparse_decoding = sparse
        t.estimate_input_scale(source(1024))
        metrics = [t.step(source().double()) for _ in range(60)]
        runs.append((t, metrics))
    (dense, m_dense), (sparse, m_sparse) = runs
    if name == "topk":
        assert max(m["loss_auxk"] for m in m_dense) > 0                   # AuxK was exercised
    for a, b in zip(m_dense, m_sparse):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key
    for (n, p), q in zip(dense.module.named_parameters(), sparse.module.parameters()):
        torch.testing.assert_close(q, p, msg=n)


def test_module_decode_takes_the_sparse_path_without_a_gradient_and_matches_dense(monkeypatch):
    import dictionaries.architectures as A

    W_dec, b_dec, W_enc, b_enc = (p.detach().float() for p in _params())
    d = TopKDictionary(D, F, k=K)
    with torch.no_grad():
        for p, v in zip((d.W_dec, d.b_dec, d.W_enc, d.b_enc), (W_dec, b_dec, W_enc, b_enc)):
            p.copy_(v)
    calls = []
    monkeypatch.setattr(A, "decode_dense", lambda *a: calls.append(1) or decode_dense(*a))
    x = torch.randn(3, 7, D)
    with torch.no_grad():
        f = d.encode(x)                                                  # (3, 7, F), K of F non-zero
        got = d.decode(f)
    assert calls == [1]
    torch.testing.assert_close(got, f @ W_dec + b_dec, rtol=1e-5, atol=1e-5)
    f.requires_grad_()
    d.decode(f).sum().backward()                                        # a gradient to f: the dense product
    assert calls == [1] and torch.count_nonzero(f.grad) == f.numel()


def test_sparse_loss_of_a_skip_transcoder_equals_the_dense_one():
    """A skip-transcoder (d_out != d_in, W_skip, no pre-encoder bias) predicting a target, AuxK included."""
    recipe = make_recipe("topk", d_dict=F, k=K)
    module = TopKDictionary(D, F, k=K, d_out=D + 3, skip=True, pre_encoder_bias=False, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    x, y = torch.randn(B, D, generator=g, dtype=torch.float64), torch.randn(B, D + 3, generator=g, dtype=torch.float64)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::3] = True
    results = []
    for sparse in (False, True):
        module.zero_grad(set_to_none=True)
        out = losses.compute_loss(module, x, recipe, losses.LossContext(dead), target=y, sparse=sparse)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}))
    (dense, g_dense), (sparse, g_sparse) = results
    assert sparse.code is not None and "W_skip" in g_dense
    torch.testing.assert_close(sparse.loss, dense.loss)
    torch.testing.assert_close(sparse.x_hat, dense.x_hat)
    assert g_sparse.keys() == g_dense.keys()
    for n in g_dense:
        torch.testing.assert_close(g_sparse[n], g_dense[n], msg=n)


def _inference_dictionary(kind: str, **kw):
    """A kind with seeded weights and a negative encoder bias: a minority of its F features fire per token."""
    from dictionaries.architectures import ARCHITECTURES

    extra = {"k": K} if kind in ("topk", "batchtopk") else {}
    d = ARCHITECTURES[kind](D, F, **extra, **kw)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        d.b_enc.sub_(0.5)                                   # fewer features fire: a sparse code
        if kind == "jumprelu":
            d.threshold.abs_().mul_(0.5)
        elif kind == "batchtopk":
            d.threshold.fill_(0.3)                          # the global inference threshold
    return d


@pytest.mark.parametrize("kind,kw", [("relu", {}), ("topk", {}), ("batchtopk", {}), ("jumprelu", {}), ("gated", {}),
                                     ("relu", {"pre_encoder_bias": False}),
                                     ("jumprelu", {"d_out": D + 3, "skip": True, "pre_encoder_bias": False})])
def test_block_encode_and_reconstruct_equal_the_dense_path(kind, kw, monkeypatch):
    """encode_code in blocks that divide neither tokens nor features gives encode(x)'s nonzeros, rows then features
    ascending; reconstruct and encode_and_predict (what a plain splice and the evaluation call) equal dense."""
    import dictionaries.sparse_decoding as S

    d = _inference_dictionary(kind, **kw)
    x = torch.randn(3, 11, D)
    monkeypatch.setattr(S, "ENCODE_BLOCK", (4, 13))
    monkeypatch.setattr(S, "RECONSTRUCT_BLOCK_BYTES", 5 * F * 4)       # TopK: 5 tokens a block
    with torch.no_grad():
        f = d.encode(x)
        flat = f.reshape(-1, F)
        assert 0 < int(torch.count_nonzero(f)) < f.numel() // 2
        rows, features, values = S.encode_code(d, x.reshape(-1, D))
        want_rows, want_features = flat.nonzero(as_tuple=True)
        assert torch.equal(rows, want_rows) and torch.equal(features, want_features)
        torch.testing.assert_close(values, flat[want_rows, want_features])
        if "skip" not in kw:
            torch.testing.assert_close(S.reconstruct(d, x), f @ d.W_dec + d.b_dec)
        x_hat, f_got = S.encode_and_predict(d, x)
        torch.testing.assert_close(f_got, f)
        torch.testing.assert_close(x_hat, d(x).reconstruction)
