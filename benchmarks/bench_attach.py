"""Cost of attaching dictionaries: a forward with spliced dictionaries against the bare forward.

On a model with Pythia-70m's exact config (random weights; same cost as the real model), batch 8 x 128
tokens, no grad: bare transformers forward, bare nnsight trace, a trace with one spliced 32768-feature
dictionary (at mlp3; with the error term kept, and replaced by the reconstruction), and with six (one per
layer). Dictionaries have random weights with thresholds set for about `l0` (64) active features a token,
as trained ones have. The best of `repeats` rounds, each timing every configuration once.

A dense 32768 x 512 encoder is 2 * 1024 * 512 * 32768 = 34 GFLOP per batch against about 92 GFLOP for
the model's matmuls; the decode of sparse features is cheap (`site.decode`: L0 rows a token), and with the
error kept and nothing edited neither encode nor decode is needed (the written activation is x itself: its
flop_ratio is 1). `flop_ratio` gives
(model + dictionary) / model matmul FLOPs next to each measurement, `over_flops` the measured ratio to the
bare nnsight trace over it (1.0: the dictionaries cost exactly their FLOPs); one large GEMM runs faster per
FLOP than the model's many small ops, so it can be below 1. The row "trace + 6 sites written back" reads
and writes the six hook points without a dictionary: nnsight's own per-site cost, inside the spliced rows.

Every round times each configuration once, in a shuffled order, so load from other processes weighs on all
alike; `ms` is the best round (load only ever adds time), `ms_median` the median one.

`python -m benchmarks.bench_attach [--repeats N] [--device cpu|cuda]`
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

D_DICT = 32768


def _timed(fn, repeats: int, device: torch.device, warm: bool = True) -> float:
    """Best seconds of fn() over `repeats` runs (after one warm-up unless `warm` is False)."""
    if warm:
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def _round_robin(fns: list, repeats: int, device: torch.device) -> list[list[float]]:
    """Seconds of each fn in every round, timed in turns (one run of each per round, in a shuffled order) so
    that load from other processes on a shared machine weighs on every configuration alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)  # no configuration always runs first in its round
        for i in order:
            times[i].append(_timed(fns[i], 1, device, warm=False))
    return times


def _dictionaries(model, ids, n: int, d_in: int, device: torch.device, l0: float):
    """n random relu dictionaries at mlp0..mlp(n-1), each threshold set so that about `l0` features fire
    per token on `ids` (Marks & Mueller's 32768-feature MLP dictionaries have L0 3..44; 8192: 10..235)."""
    from dictionaries.architectures import build_dictionary
    from dictionaries.card import Card, Files
    from dictionaries.hooks import collect_activations
    from dictionaries.recipe import HookPoint

    hooks = [HookPoint(module=f"gpt_neox.layers.{layer}.mlp", site="mlp", layer=layer) for layer in range(n)]
    acts = collect_activations(model, hooks, ids)
    out = []
    for hook, x in zip(hooks, acts):
        card = Card(name=f"bench/mlp{hook.layer}/{D_DICT}", architecture="relu", d_in=d_in, d_dict=D_DICT,
                    files=Files(items=[]), hook=hook)
        d = build_dictionary(card, device=device)
        with torch.no_grad():
            d.W_enc.normal_(0, d_in ** -0.5)
            d.W_dec.copy_(d.W_enc.T)
            pre = d.pre_activation(x[:1].reshape(-1, d_in)).flatten()           # one context's worth
            sample = pre[torch.randperm(pre.numel(), device=pre.device)[:1_000_000]]
            d.b_enc.fill_(-float(sample.quantile(1 - l0 / D_DICT)))
        out.append(d)
    return out


def _model_flops(hf, tokens: int) -> float:
    """2 * tokens * (parameters of every linear layer): the forward's matmul FLOPs (attention scores aside)."""
    params = sum(m.weight.numel() for m in hf.modules() if isinstance(m, torch.nn.Linear))
    return 2.0 * tokens * params


def run(repeats: int = 3, device: str = "cpu", batch: int = 8, context: int = 128, l0: float = 64.0) -> list[dict]:
    """Table rows: one per configuration, with the best and median ms and ratios to bare transformers and bare
    nnsight (of the best ms), and over_flops = x_nnsight / flop_ratio."""
    from dictionaries.attachment import attach, wrap_model
    from training.toymodel import build_model, build_tokenizer, pythia70m_config

    dev = torch.device(device)
    hf = build_model(pythia70m_config()).to(dev)
    model = wrap_model(hf, build_tokenizer())
    ids = torch.randint(2, 50000, (batch, context), generator=torch.Generator().manual_seed(0)).to(dev)
    dicts = _dictionaries(hf, ids, 6, hf.config.hidden_size, dev, l0)
    tokens = batch * context
    model_gflop = _model_flops(hf, tokens) / 1e9
    enc_gflop = 2.0 * tokens * hf.config.hidden_size * D_DICT / 1e9
    dec_gflop = 2.0 * tokens * hf.config.hidden_size * l0 / 1e9          # the sparse decode: L0 rows a token

    def bare():
        hf(ids, use_cache=False)

    def trace():
        with model.trace(ids):
            model.output.logits.save()

    def spliced(ds, error):
        def go():
            with attach(model, *ds) as sites, model.trace(ids):
                for site in (sites if isinstance(sites, tuple) else (sites,)):
                    site.splice(error=error)
                model.output.logits.save()
        return go

    def written_back():
        with model.trace(ids):
            for layer in range(len(dicts)):
                mlp = model.gpt_neox.layers[layer].mlp
                mlp.output = mlp.output + 0          # read and write the site, as a splice does
            model.output.logits.save()

    configs = [("bare transformers forward", bare, 0.0),
               ("bare nnsight trace", trace, 0.0),
               ("trace + 6 sites written back", written_back, 0.0),
               ("trace + 1 dictionary, splice(error=True)", spliced(dicts[3:4], True), 0.0),   # encodes nothing
               ("trace + 1 dictionary, splice(error=False)", spliced(dicts[3:4], False), enc_gflop + dec_gflop),
               ("trace + 6 dictionaries, splice(error=False)", spliced(dicts, False), 6 * (enc_gflop + dec_gflop))]
    rows = []
    with torch.no_grad():
        for (name, _, extra), secs in zip(configs, _round_robin([fn for _, fn, _ in configs], repeats, dev)):
            rows.append({"benchmark": name, "device": dev.type, "tokens": tokens, "ms": 1000 * min(secs),
                         "ms_median": 1000 * statistics.median(secs),
                         "flop_ratio": (model_gflop + extra) / model_gflop})
        base, nns = rows[0]["ms"], rows[1]["ms"]
        for r in rows:
            r["x_transformers"] = r["ms"] / base
            r["x_nnsight"] = r["ms"] / nns
            r["over_flops"] = r["x_nnsight"] / r["flop_ratio"]
        rows += _fixed_overhead(hf, model, dev, repeats)
    return rows


def _fixed_overhead(hf, model, dev: torch.device, repeats: int) -> list[dict]:
    """nnsight's per-trace overhead, visible where the forward itself is short: 1 x 16 tokens."""
    ids = torch.randint(2, 50000, (1, 16), generator=torch.Generator().manual_seed(1)).to(dev)

    def trace():
        with model.trace(ids):
            model.output.logits.save()

    bare_s, traced_s = _round_robin([lambda: hf(ids, use_cache=False), trace], 5 * repeats, dev)
    bare, traced = 1000 * min(bare_s), 1000 * min(traced_s)
    return [{"benchmark": "bare transformers forward (1 x 16)", "device": dev.type, "tokens": 16, "ms": bare,
             "ms_median": 1000 * statistics.median(bare_s), "flop_ratio": 1.0, "x_transformers": 1.0,
             "x_nnsight": bare / traced, "over_flops": bare / traced},
            {"benchmark": "bare nnsight trace (1 x 16)", "device": dev.type, "tokens": 16, "ms": traced,
             "ms_median": 1000 * statistics.median(traced_s), "flop_ratio": 1.0, "x_transformers": traced / bare,
             "x_nnsight": 1.0, "over_flops": 1.0}]


def _print(rows: list[dict]) -> None:
    cols = ["benchmark", "device", "tokens", "ms", "ms_median", "x_transformers", "x_nnsight", "flop_ratio",
            "over_flops"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--l0", type=float, default=64.0, help="active features a token in the dictionaries")
    args = parser.parse_args()
    _print(run(repeats=args.repeats, device=args.device, l0=args.l0))
