"""Feature dashboards, the site: the static files written from `dashboard.DashboardData`, and serving them.

The site needs no server: index.html, dashboard.js and dashboard.css (package data under
dictionaries/dashboard_static/) and data/*.js files that each call `DASH.put(name, value)`. They are
loaded with <script> tags, which a page opened from disk (file://) or from a Hub repo's files may do
where fetch() would meet CORS. data/meta.js holds the identity, data/vocab.js the decoded tokens,
data/index.js one row per feature (density, max and mean activation, top tokens: the table that sorts,
filters and searches), data/shard_NNNN.js the feature views of SHARD features each (contexts as token ids
with the feature's activation on every token quantised to 0..255 of the feature's maximum, the exact
activation of the marked token, the histogram, the logit lens, the nearest features).
"""

from __future__ import annotations

import json
import math
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from dictionaries.dashboard import HIST_BINS, HIST_LO, HIST_PER_DECADE, DashboardData, Examples
from dictionaries.errors import CardError, FeatureIndexError
from dictionaries.files import write_atomic

SHARD = 256
"""Features per data shard."""
STATIC = ("index.html", "dashboard.js", "dashboard.css")


def _r(x: float, digits: int = 4) -> float:
    """`x` to `digits` significant digits (JSON stays short)."""
    if not math.isfinite(x) or x == 0:
        return 0.0
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def _js(name: str, value: Any) -> bytes:
    return f"DASH.put({json.dumps(name)},{json.dumps(value, separators=(',', ':'), ensure_ascii=False)});\n".encode()


def vocab_of(tokenizer: Any) -> list[str]:
    """Every token id decoded on its own (what a context shows)."""
    size = len(tokenizer)
    return [tokenizer.decode([i]) for i in range(size)]


def _examples(e: Examples, row: int, maximum: float, before: int, *, by_value: bool) -> list[list]:
    """[activation, index of the marked token, [ids], [acts 0..255]] per held example;
    the reservoir sorted by activation, highest first."""
    score, value, ids, acts = (t[row].tolist() for t in (e.score, e.value, e.ids, e.acts))  # lists: fast reads
    held = [k for k, v in enumerate(score) if math.isfinite(v)]
    if by_value:
        held.sort(key=lambda k: -value[k])
    scale = 255.0 / maximum if maximum > 0 else 0.0
    out = []
    for k in held:
        real = [i for i, t in enumerate(ids[k]) if t >= 0]  # a window is cut at the context's ends: keep what is
        lo, hi = real[0], real[-1] + 1
        out.append([_r(value[k]), before - lo, ids[k][lo:hi], [min(255, round(max(a, 0.0) * scale))
                                                              for a in acts[k][lo:hi]]])
    return out


def feature_view(data: DashboardData, row: int) -> dict[str, Any]:
    """One feature's view: counts, histogram (first non-empty bin and counts), examples, lens, nearest."""
    maximum = float(data.maximum[row])
    hist = data.hist[row].tolist()
    nonzero = [i for i, v in enumerate(hist) if v]
    view: dict[str, Any] = {"n": int(data.count[row]), "max": _r(maximum),
                            "hist": [nonzero[0], *hist[nonzero[0]:nonzero[-1] + 1]] if nonzero else [0],
                            "top": _examples(data.top, row, maximum, data.before, by_value=False),
                            "samples": _examples(data.samples, row, maximum, data.before, by_value=True)}
    for key, pair in (("promoted", data.promoted), ("suppressed", data.suppressed)):
        if pair is not None:
            view[key] = [[i, _r(v, 3)] for i, v in zip(pair[0][row].tolist(), pair[1][row].tolist())]
    if data.nearest is not None:
        view["near"] = [[i, _r(c, 3)] for i, c in zip(data.nearest[0][row].tolist(), data.nearest[1][row].tolist())]
    return view


def index_rows(data: DashboardData, top_tokens: int = 3) -> dict[str, list]:
    """The feature table: density, max and mean activation, and the distinct tokens of the top examples."""
    density = data.density.tolist()
    mean = (data.total / data.count.clamp_min(1)).tolist()
    tops = []
    for row in range(data.count.shape[0]):
        seen: list[int] = []
        for ids in data.top.ids[row, :, data.before].tolist() if data.count[row] else []:
            if ids >= 0 and ids not in seen:
                seen.append(ids)
        tops.append(seen[:top_tokens])
    return {"density": [_r(d) for d in density], "max": [_r(float(m)) for m in data.maximum],
            "mean": [_r(m) for m in mean], "top": tops}


def write_site(data: DashboardData, vocab: list[str], out: str | Path) -> Path:
    """Write the static site into `out` (created; data/ replaced); the path of its index.html."""
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for old in (out / "data").glob("*.js"):
        old.unlink()
    for name in STATIC:
        with resources.as_file(resources.files("dictionaries") / "dashboard_static" / name) as src:
            shutil.copyfile(src, out / name)
    n = data.count.shape[0]
    meta = {**data.identity, "first": data.lo, "features": n, "tokens": data.tokens, "shard": SHARD,
            "before": data.before, "hist": [HIST_LO, HIST_PER_DECADE, HIST_BINS]}
    write_atomic(out / "data" / "meta.js", _js("meta", meta))
    write_atomic(out / "data" / "vocab.js", _js("vocab", vocab))
    write_atomic(out / "data" / "index.js", _js("index", index_rows(data)))
    for start in range(0, n, SHARD):
        views = [feature_view(data, row) for row in range(start, min(start + SHARD, n))]
        name = f"shard_{start // SHARD:04d}"  # counted from the first feature written (`--features`)
        write_atomic(out / "data" / f"{name}.js", _js(name, {"first": data.lo + start, "features": views}))
    return out / "index.html"


def site_size(out: str | Path) -> int:
    """Bytes of every file of the site."""
    return sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())


def serve(out: str | Path, port: int = 8000, *, say: Any = print) -> None:
    """Serve the site on 127.0.0.1:`port` until Ctrl-C."""
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(out))
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as server:
        say(f"serving {out} at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            say("stopped")


def parse_range(spec: str | None, d_dict: int) -> range:
    """`--features`: "START:STOP" (either side may be empty) or "N" (the first N); all features when None."""
    if not spec:
        return range(d_dict)
    start, sep, stop = spec.partition(":")
    try:
        lo, hi = (int(start or 0), int(stop or d_dict)) if sep else (0, int(spec))
    except ValueError:
        raise FeatureIndexError(spec, d_dict) from None
    if not 0 <= lo < hi <= d_dict:
        raise FeatureIndexError(spec, d_dict)
    return range(lo, hi)


def make_dashboard(ref: str | Path, out: str | Path, *, dataset: str | None = None, tokens: int = 65_536,
                   model: str | None = None, features: str | None = None, context_length: int = 128,
                   batch_size: int = 16, device: str | None = None, progress: bool = True, model_dtype: Any = None,
                   device_map: Any = None) -> Path:
    """`dictctl dashboard`: load the dictionary and its model (default the card's), read `tokens` tokens of
    `dataset` (default the card's recipe dataset), build the data in one pass, write the site; its index.html.
    The model loads in `model_dtype` (fp32 by default) and is placed by `device_map` (placement.py)."""
    from dictionaries.dashboard import build_dashboard, read_source, token_batches
    from dictionaries.hooks import load_model
    from dictionaries.loader import load_dictionary
    from dictionaries.placement import model_dtype as as_dtype
    from dictionaries.placement import parse_device_map

    as_dtype(model_dtype), parse_device_map(device_map)  # bad values before anything loads
    dictionary = load_dictionary(ref, device=device)
    chosen = parse_range(features, dictionary.d_dict)  # every cheap check before the model loads
    card = dictionary.card
    model_id = model or (card.model.id if card is not None and card.model is not None else None)
    if model_id is None:
        raise CardError(str(ref), "model", "the card names no model; pass `--model` (HF id or folder)")
    source = dataset or (card.recipe.dataset.path if card is not None and card.recipe is not None else None)
    if source is None:
        raise CardError(str(ref), "recipe.dataset", "the card names no dataset; pass `--dataset` (text file, "
                                                    "folder of .txt or a dataset id)")
    hf, tokenizer = load_model(model_id, device=device, dtype=model_dtype, device_map=device_map)
    batches = token_batches(tokenizer, read_source(source), tokens=tokens, context_length=context_length,
                            batch_size=batch_size)
    data = build_dashboard(hf, dictionary, batches, features=chosen, progress=progress)
    data.identity["dataset"] = str(source)
    return write_site(data, vocab_of(tokenizer), out)
