"""Eval throughput: `training.evaluate.evaluate` against dictionary_learning's evaluation, side by side.

Same dictionary (ReLU, 512 -> 4096 at `gpt_neox.layers.3.mlp`, built to reconstruct x_hat ~ 0.9 x), same
model (Pythia-70m's exact config, random weights: same cost as the real model), same tokens, same machine,
in one run. With random weights zero-ablating one MLP barely moves the loss (CE_zero - CE_clean ~ 1e-3), so
frac_loss_recovered is a ratio of tiny differences here: compare it on a trained model, not in this table.

dictionary_learning: the PyPI release (0.1.0) pins nnsight < 0.4 and the installed nnsight is 0.8, so it
cannot run here. Its procedure is re-derived from its source (`evaluation.evaluate` + `loss_recovered`)
on the same forward primitives we use (plain torch hooks, so nnsight's per-trace overhead is NOT counted
against it): per batch, the ActivationBuffer's harvest forward (stopped after the hook), then the metrics
on those activations, then `loss_recovered`'s five traces: a one-token probe ("_") to see whether the
output is a tuple, the clean run, a full run saving x, the run with x_hat spliced, the run with zeros;
three CrossEntropyLoss(ignore_index=pad) over all positions. Ours: one forward of the tripled batch.

Where the definitions agree (both without BOS exclusion, no padding, equal batch sizes): CE clean /
spliced / zero, L1, L0, frac_alive. They differ (listed, not compared): dictionary_learning's `l2_loss`
is the mean L2 norm of x - x_hat (not the element-wise MSE); its `frac_variance_explained` is per batch,
1 - sum var(x - x_hat) / sum var(x) (the residual centred), averaged over batches, while our FVU is
pooled over all tokens with the residual uncentred; its `frac_recovered` is the mean of per-batch ratios,
ours the ratio of means. KL is ours only.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from dictionaries.architectures import build_dictionary
from dictionaries.card import Card, Files
from dictionaries.recipe import HookPoint, ModelRef

HOOK = HookPoint(module="gpt_neox.layers.3.mlp", site="mlp", layer=3)
D_IN, D_DICT = 512, 4096
CONTEXT, BATCH, BATCHES = 128, 8, 3


def setup(seed: int = 0):
    """(model, dictionary, token batches): Pythia-70m config, a random ReLU dictionary, corpus contexts."""
    from training.evaluate import pack_batches
    from training.toymodel import (
        build_model,
        build_tokenizer,
        corpus_documents,
        pythia70m_config,
    )

    model = build_model(pythia70m_config(), seed=seed)
    card = Card(name="bench/mlp3/4096", architecture="relu", d_in=D_IN, d_dict=D_DICT, files=Files(items=[]),
                model=ModelRef(id="pythia70m-config-random"), hook=HOOK)
    d = build_dictionary(card)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # features 0..1023: [I, -I] at 0.9 (x_hat ~ 0.9 x); the rest random, rarely firing
        w = torch.randn(D_DICT, D_IN, generator=gen)
        d.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        eye = torch.eye(D_IN)
        d.W_dec[:2 * D_IN] = 0.9 * torch.cat([eye, -eye])
        d.W_enc.copy_(d.W_dec.T / 0.9)
        d.b_enc[2 * D_IN:] = -0.5
    batches = pack_batches(corpus_documents(), tokenizer=build_tokenizer(), tokens=CONTEXT * BATCH * BATCHES,
                           context_length=CONTEXT, batch_size=BATCH)
    return model, d, [ids for ids, _ in batches]


def dictionary_learning_style(model, d, batches, pad_id: int = 1) -> dict:
    """dictionary_learning 0.1.0's evaluate() + loss_recovered(), re-derived (see the module docstring)."""
    from dictionaries.hooks import collect_activations, run_patched

    out: dict[str, float] = defaultdict(float)
    active = torch.zeros(d.d_dict)
    for ids in batches:
        x = collect_activations(model, [HOOK], ids)[0].reshape(-1, d.d_in)          # buffer harvest, stopped
        x_hat, f = d(x)
        out["l2_loss"] += float(torch.linalg.norm(x - x_hat, dim=-1).mean())
        out["l1"] += float(f.norm(p=1, dim=-1).mean())
        out["l0"] += float((f != 0).float().sum(-1).mean())
        active += f.sum(0)
        out["frac_variance_explained"] += float(1 - torch.var(x - x_hat, dim=0).sum() / torch.var(x, dim=0).sum())
        out["cossim"] += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean())
        out["l2_ratio"] += float((torch.linalg.norm(x_hat, dim=-1) / torch.linalg.norm(x, dim=-1)).mean())
        out["relative_reconstruction_bias"] += float((x_hat.norm(dim=-1) ** 2).mean() / (x * x_hat).sum(-1).mean())
        run_patched(model, ids[:1, :1])                                               # trace("_") probe
        clean = run_patched(model, ids)
        saved = {}
        run_patched(model, ids, patches={HOOK: lambda a: saved.setdefault("x", a)})  # full run saving x
        spliced_in = d(saved["x"])[0]
        spliced = run_patched(model, ids, patches={HOOK: lambda a: spliced_in})
        zero = run_patched(model, ids, patches={HOOK: torch.zeros_like})
        losses = [torch.nn.CrossEntropyLoss(ignore_index=pad_id)(lg[:, :-1].reshape(-1, lg.shape[-1]),
                                                                 ids[:, 1:].reshape(-1))
                  for lg in (clean, spliced, zero)]
        out["ce_clean"] += float(losses[0])
        out["ce_spliced"] += float(losses[1])
        out["ce_zero"] += float(losses[2])
        out["frac_recovered"] += float((losses[1] - losses[2]) / (losses[0] - losses[2]))
    out = {k: v / len(batches) for k, v in out.items()}
    out["frac_alive"] = float((active != 0).float().mean())
    return out


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def run() -> list[dict]:
    from training.evaluate import evaluate

    model, d, batches = setup()
    tokens = sum(b.numel() for b in batches)
    with torch.no_grad():
        evaluate(model, [d], batches[:1], tokens=CONTEXT * BATCH, context_length=CONTEXT, sensitivity=False,
                 progress=False)                                                       # warm-up both paths
        dictionary_learning_style(model, d, batches[:1])
        ours, t_ours = _timed(lambda: evaluate(model, [d], batches, tokens=tokens, context_length=CONTEXT,
                                               batch_size=BATCH, exclude_bos=False, sensitivity=False,
                                               progress=False)[0].stats)
        theirs, t_theirs = _timed(lambda: dictionary_learning_style(model, d, batches))
    rows = [
        {"benchmark": "eval throughput", "method": "dictionaries (1 forward of 3x batch)", "tokens": tokens,
         "seconds": t_ours, "tokens/s": tokens / t_ours, "speedup": t_theirs / t_ours},
        {"benchmark": "eval throughput", "method": "dictionary_learning 0.1.0 procedure (re-derived, 5 traces + "
         "harvest)", "tokens": tokens, "seconds": t_theirs, "tokens/s": tokens / t_theirs, "speedup": 1.0},
    ]
    pairs = [("ce_clean", "ce_clean"), ("ce_spliced", "ce_spliced"), ("ce_zero", "ce_zero"),
             ("frac_loss_recovered", "frac_recovered"), ("l1", "l1"), ("l0", "l0"), ("frac_alive", "frac_alive"),
             ("mse", "l2_loss"), ("variance_explained", "frac_variance_explained"), ("kl", None)]
    differ = {"mse": "theirs: mean L2 norm, not MSE", "variance_explained": "theirs: per-batch, residual centred",
              "frac_loss_recovered": "theirs: mean of per-batch ratios", "kl": "ours only"}
    for ours_key, their_key in pairs:
        a = getattr(ours, ours_key)
        b = theirs.get(their_key) if their_key else None
        rows.append({"benchmark": "eval values", "method": ours_key, "ours": a, "dictionary_learning": b,
                     "abs diff": abs(a - b) if b is not None else None,
                     "note": differ.get(ours_key, "same definition")})
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
