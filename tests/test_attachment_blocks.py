"""Tests of the attachment's cheap paths (dictionaries/attachment.py): a plain splice reconstructs in token blocks
without the dense features, the sparse decode's density probe, and an error-kept splice that encodes nothing.
Split from test_attachment.py (the size limit); its reference helpers are reused."""

from __future__ import annotations

import torch

from dictionaries import attachment as A
from dictionaries import hooks as H
from dictionaries import sparse_decoding as S

from helpers import batch, keep_pads, make_dictionary, reference_logits, traced_logits


def test_plain_splice_reconstructs_in_blocks(models, tokenizer, monkeypatch):
    """A splice that never reads the features decodes block by block (`reconstruct`): blocks of three tokens and
    500 features give the dense reconstruction; features dense past the density probe's slice still decode."""
    raw, model = models["neox"]
    path = "gpt_neox.layers.0.mlp"
    d = make_dictionary(64, 2048, path)
    ids, mask = batch(tokenizer)
    [x] = H.collect_activations(model, [path], ids, mask)
    with torch.no_grad():
        d.b_enc.sub_(d.pre_activation(x[mask.bool()]).flatten().quantile(0.995))
        monkeypatch.setattr(S, "ENCODE_BLOCK", (3, 500))                          # (tokens, features) a block
        torch.testing.assert_close(S.reconstruct(d, x), d.decode(d.encode(x)))
        f = d.encode(x.reshape(-1, 64))
        f[f.shape[0] // 16 + 1:] += 1.0                                          # dense after the probe's rows
        torch.testing.assert_close(S.decode_mostly_zero(d, f), d.decode(f))
        ref = reference_logits(raw, ids, mask, {path: keep_pads(mask, lambda x: d(x).reconstruction)})
    with A.attach(model, d) as sae:
        got = traced_logits(model, ids, mask, lambda: sae.splice(error=False))
    torch.testing.assert_close(got, ref)


def test_splice_keeping_the_error_encodes_nothing(models, tokenizer, monkeypatch):
    raw, model = models["neox"]
    d = make_dictionary(64, 96, "gpt_neox.layers.1.mlp")
    ids, mask = batch(tokenizer)
    clean = H.run_patched(model, ids, mask)

    def refuse(x):
        raise AssertionError("encoded")

    monkeypatch.setattr(d, "encode", refuse)
    with A.attach(model, d) as sae:
        got = traced_logits(model, ids, mask, lambda: sae.splice(error=True))
    torch.testing.assert_close(got, clean, rtol=0, atol=1e-5)
