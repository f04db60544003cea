"""Dashboard cost: building every feature's dashboard against the forward passes and encodes it needs.

Pythia-70m's exact config (random weights: the same cost as the real model), a TopK dictionary (k = 32) of
8192 features at `gpt_neox.layers.3.mlp`, random token contexts of 128. In the same run, on the same
batches: (a) the floor, one forward stopped at the hook plus one encode per batch and nothing else;
(b) the whole dashboard: the same, folded into the per-feature tables, then the logit lens and nearest
features of every decoder direction, then the site written. The target is (b) <= 1.3 x (a).

The issue's size is 262,144 tokens; on two CPU cores the default is 16,384 (the ratio is per batch and the
weights-only work is fixed, so fewer tokens is the harder case for the ratio). `--tokens 262144` (or
BENCH_DASHBOARD_TOKENS) runs the full size; `--features` changes the dictionary width. The site's size is
measured for 8192 features and extrapolated per feature to 32768 (the tables are full once every feature
has fired `top` + `samples` times; the token count no longer changes the size after that).

Timing: the floor and the whole build alternate for `--rounds` rounds (default 3; the order flips each round,
so a change in the machine's load hits both alike), and the rows give medians, the ratio being of medians,
with the min and max of each, then each round's ratio and the ratio of the minima (the least disturbed
runs); a last row gives os.getloadavg() before and after.

SAEDashboard (PyPI `sae-dashboard`) sits beside it (benchmarks/bench_dashboard_peer.py): its own venv, the
same dictionary and token ids, its data generation only, on a random-weight TransformerLens Pythia-70m.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from statistics import median

import torch

from benchmarks.bench_dashboard_peer import saedashboard_row
from dictionaries.architectures import build_dictionary
from dictionaries.card import Card, Files
from dictionaries.recipe import HookPoint, ModelRef

HOOK = HookPoint(module="gpt_neox.layers.3.mlp", site="mlp", layer=3)
CONTEXT, BATCH = 128, 32


def _arg(name: str, default: int) -> int:
    flag = f"--{name}"
    if flag in sys.argv:
        return int(sys.argv[sys.argv.index(flag) + 1])
    return int(os.environ.get(f"BENCH_DASHBOARD_{name.upper()}", default))


def setup(features: int, tokens: int, device: str, seed: int = 0):
    from training.toymodel import build_model, pythia70m_config

    config = pythia70m_config()
    model = build_model(config, seed=seed).to(device)
    card = Card(name=f"bench/mlp3/{features}", architecture="topk", k=32, d_in=config.hidden_size, d_dict=features,
                files=Files(items=[]), model=ModelRef(id="pythia70m-config-random"), hook=HOOK)
    d = build_dictionary(card, device=device)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in d.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen).to(device) * 0.05)
        d.W_dec.div_(d.W_dec.norm(dim=1, keepdim=True))              # unit decoder rows, as trained TopK ones are
    rows = tokens // CONTEXT
    ids = torch.randint(0, config.vocab_size, (rows, CONTEXT), generator=gen)
    batches = [(ids[i:i + BATCH], torch.ones_like(ids[i:i + BATCH])) for i in range(0, rows, BATCH)]
    return model, d, batches, config.vocab_size


def _floor(model, d, batches) -> float:
    from dictionaries.hooks import collect_activations

    start = time.perf_counter()
    for ids, mask in batches:
        [x] = collect_activations(model, [HOOK], ids.to(d.W_enc.device), mask.to(d.W_enc.device))
        with torch.no_grad():
            d.encode(x)
    _sync()
    return time.perf_counter() - start


def _dashboard(model, d, batches, vocab_size: int, out: str) -> tuple[float, float, float, int]:
    """Seconds of (the pass folding batches into the tables, + lens and nearest, + writing the site), bytes."""
    from dictionaries.dashboard import DashboardBuilder
    from dictionaries.dashboard_site import site_size, write_site

    start = time.perf_counter()
    builder = DashboardBuilder(model, d)
    for ids, mask in batches:
        builder.add(ids, mask)
    _sync()
    passed = time.perf_counter() - start
    data = builder.finish()
    _sync()
    finished = time.perf_counter() - start
    write_site(data, [f"t{i}" for i in range(vocab_size)], out)
    return passed, finished, time.perf_counter() - start, site_size(out)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rounds(model, d, batches, vocab: int, rounds: int) -> tuple[list[float], list[tuple]]:
    """`rounds` timings of each, alternating which goes first, so that load drifts hit both alike."""
    floors, dashes = [], []
    for r in range(rounds):
        for which in (("floor", "dash") if r % 2 == 0 else ("dash", "floor")):
            if which == "floor":
                floors.append(_floor(model, d, batches))
            else:
                with tempfile.TemporaryDirectory() as out:
                    dashes.append(_dashboard(model, d, batches, vocab, out))
    return floors, dashes


def run() -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    features, tokens = _arg("features", 8192), _arg("tokens", 262_144 if device == "cuda" else 16_384)
    rounds = _arg("rounds", 3)
    model, d, batches, vocab = setup(features, tokens, device)
    load_before = os.getloadavg()
    _floor(model, d, batches[:1])                                         # warm-up, not timed
    floors, dashes = _rounds(model, d, batches, vocab, rounds)
    load_after = os.getloadavg()
    floor = median(floors)
    passed, built, total = (median(t[i] for t in dashes) for i in range(3))
    size = dashes[-1][3]
    common = {"device": device, "features": features, "tokens": tokens}
    spread = lambda xs: f"{rounds} rounds, min {min(xs):.2f} max {max(xs):.2f}"  # noqa: E731
    peer = saedashboard_row(d, batches, vocab, device)
    return [
        {"what": "forward to hook + encode (floor), median", **common, "seconds": floor, "x floor": 1.0,
         "note": spread(floors)},
        {"what": "dashboard: the one pass (tables), median", **common, "seconds": passed, "x floor": passed / floor,
         "target": "<= 1.3", "note": spread([t[0] for t in dashes])},
        {"what": "the one pass / floor, per round and of the minima", "note": "rounds " + ", ".join(
            f"{t[0] / f:.2f}" for t, f in zip(dashes, floors))
            + f"; min/min {min(t[0] for t in dashes) / min(floors):.2f}"},
        {"what": "+ logit lens + nearest (weights only)", **common, "seconds": built, "x floor": built / floor},
        {"what": "+ writing the site", **common, "seconds": total, "x floor": total / floor,
         "site MB": size / 1e6, "MB at 32768 features (extrapolated)": size / features * 32768 / 1e6},
        {**peer, **common},
        {"what": "machine load (1/5/15-min loadavg)", "note": f"before {_load(load_before)}, after "
         f"{_load(load_after)}; {os.cpu_count()} CPUs; floor and pass alternate, ratios are of medians"},
    ]


def _load(avg: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in avg)
