"""Neuronpedia: a card's feature URLs, and `dictctl export neuronpedia` (the files a Neuronpedia upload takes).

A card's `links.neuronpedia` is Neuronpedia's id of the dictionary, `<model>/<source>` (`gpt2-small/3-res-jb`),
where the source is `<layer>-<source set>`; a feature lives at https://www.neuronpedia.org/<model>/<source>/<i>.

The export follows the layout of Neuronpedia's own converter from SAEDashboard output to a Neuronpedia export,
`utils/neuronpedia-utils/neuronpedia_utils/convert-saedashboard-to-neuronpedia-export.py` in the
hijohnnylin/neuronpedia repository, with the record fields of its `db_models/` (feature.py, activation.py,
source.py): `<out>/<model>/<source>/` holds one-line `release.jsonl`, `model.jsonl`, `sourceset.jsonl` and
`source.jsonl`, and, from a dashboard site written by `dictctl dashboard`, `features/batch-N.jsonl.gz` (one
feature a line: density, max activation, logit lens, activation histogram) and `activations/batch-N.jsonl.gz`
(one top context a line: its tokens and the feature's activation on each). The site keeps each context's
activations quantised to 1/255 of the feature's maximum (the marked token's exactly), so those values are
that precise. No torch: this reads cards and the site's JSON.
"""

from __future__ import annotations

import datetime
import gzip
import json
from pathlib import Path
from typing import Any

from dictionaries.card import Card
from dictionaries.constants import CARD_FILE
from dictionaries.errors import InvalidArgumentError, MissingFileError
from dictionaries.files import write_atomic

SITE = "https://www.neuronpedia.org"
BATCH = 128
"""Features per batch file (the size Neuronpedia's dashboard runner writes by default, n-features-per-batch)."""


def neuronpedia_url(card: Card | None, feature: int | None = None) -> str | None:
    """The dictionary's (or one feature's) page on Neuronpedia, None when the card has no Neuronpedia id."""
    if card is None or not card.links.neuronpedia:
        return None
    return f"{SITE}/{card.links.neuronpedia}" + (f"/{feature}" if feature is not None else "")


def card_or_none(ref: str | Path) -> Card | None:
    """The card of a registry name or of a folder with card.json (no download); None for a foreign folder."""
    from dictionaries.references import resolve_one

    found = resolve_one(ref)
    if found.entry is not None:
        return found.entry.card
    if found.folder is not None and (found.folder / CARD_FILE).is_file():
        from dictionaries.card import read_card

        return read_card(found.folder / CARD_FILE)
    return None


def source_ids(card: Card, model: str | None = None, source_set: str | None = None) -> tuple[str, str, str]:
    """(Neuronpedia model id, source id `<layer>-<set>`, source set): from `links.neuronpedia`, or built from
    `model` (default: the card's model id without its organisation, lower case) and `source_set` (default
    `<site>-<features>`) with the card's layer (`e` for the embedding, as Neuronpedia's Pythia sets)."""
    if card.links.neuronpedia and model is None and source_set is None:
        np_model, _, source = card.links.neuronpedia.partition("/")
        return np_model, source, source.split("-", 1)[1] if "-" in source else source
    if model is None and card.model is None:
        raise InvalidArgumentError("model", None, "the card names no model and has no Neuronpedia id; pass --model")
    np_model = model or card.model.id.split("/")[-1].lower()
    layer = "e" if card.hook is None or card.hook.layer is None else str(card.hook.layer)
    sset = source_set or f"{card.hook.site if card.hook else 'x'}-{card.d_dict}"
    return np_model, f"{layer}-{sset}", sset


def export_neuronpedia(ref: str | Path, out: str | Path, *, dashboard: str | Path | None = None,
                       model: str | None = None, source_set: str | None = None, creator: str | None = None) -> Path:
    """`dictctl export neuronpedia`: write the upload files of the dictionary `ref` names (a registry name or a
    native folder) under `out/<model>/<source>/`; with `dashboard` (a site folder) its features and top
    contexts too. The folder written."""
    card = card_or_none(ref)
    if card is None:
        raise MissingFileError(str(ref), "Only registry names and native folders (with card.json) can be exported.")
    np_model, source, sset = source_ids(card, model, source_set)
    folder = Path(out) / np_model / source
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    who = creator or ", ".join(card.authors) or None
    records = _records(card, np_model, source, sset, who, now, ref)
    for name, record in records.items():
        write_atomic(folder / f"{name}.jsonl", json.dumps(record) + "\n")
    if dashboard is not None:
        _export_site(Path(dashboard), folder, np_model, source, now)
    return folder


def _records(card: Card, np_model: str, source: str, sset: str, who: str | None, now: str,
             ref: str | Path) -> dict[str, dict]:
    """release, model, sourceset and source records (Neuronpedia's SourceRelease, Model, SourceSet, Source)."""
    from dictionaries.references import resolve_one

    found = resolve_one(ref)
    loc = found.entry.location if found.entry is not None else None
    repo, sub = (loc.repo, getattr(loc, "subfolder", None)) if loc is not None and loc.kind == "hub" else (None, None)
    urls = [u for u in (card.links.paper, card.links.code) if u]
    release = card.name.split("/")[0] + "-" + sset
    return {
        "release": {"name": release, "description": card.name, "descriptionShort": card.name, "urls": urls,
                    "creatorNameShort": who, "creatorName": who, "creatorId": None, "createdAt": now},
        "model": {"id": np_model, "instruct": np_model.endswith("-it"), "displayNameShort": np_model,
                  "displayName": card.model.id if card.model else np_model, "creatorId": None, "createdAt": now,
                  "updatedAt": now},
        "sourceset": {"modelId": np_model, "name": sset, "creatorId": None, "createdAt": now, "creatorName": who,
                      "releaseName": release, "description": f"{card.hook.site if card.hook else ''} - "
                                                             f"{card.d_dict} features".strip(" -"),
                      "visibility": "PUBLIC"},
        "source": {"id": source, "modelId": np_model, "setName": sset, "visibility": "PUBLIC",
                   "hasDashboards": False, "hfRepoId": repo, "hfFolderId": sub,
                   "dataset": card.stats.dataset if card.stats else None, "creatorId": None, "createdAt": now},
    }


def read_site(site: Path) -> dict[str, Any]:
    """A dashboard site's data: every `data/*.js` file (`DASH.put(name, value);`) as name -> value."""
    files = sorted((site / "data").glob("*.js")) if (site / "data").is_dir() else []
    if not files:
        raise MissingFileError(str(site / "data"), "Not a dashboard site (`dictctl dashboard --out DIR` writes one).")
    data = {}
    for path in files:
        text = path.read_text(encoding="utf-8").strip()
        head, _, body = text.partition(",")
        if not head.startswith("DASH.put(") or not body.endswith(");"):
            raise MissingFileError(str(path), "Not a data file of a dashboard site.")
        data[json.loads(head[len("DASH.put("):])] = json.loads(body[:-2])
    return data


def _export_site(site: Path, folder: Path, np_model: str, source: str, now: str) -> None:
    """features/ and activations/ batches from the site's feature views."""
    data = read_site(site)
    meta, vocab, index = data["meta"], data["vocab"], data["index"]
    views = [(shard["first"] + i, v) for name, shard in sorted(data.items()) if name.startswith("shard_")
             for i, v in enumerate(shard["features"])]
    for batch, start in enumerate(range(0, len(views), BATCH)):
        features, activations = [], []
        for feature, view in views[start:start + BATCH]:
            row = feature - meta["first"]
            features.append(_feature(view, vocab, meta, np_model, source, feature, index["density"][row], now))
            activations += [_activation(ex, view["max"], vocab, np_model, source, feature, k, now)
                            for k, ex in enumerate(view["top"])]
        for kind, rows in (("features", features), ("activations", activations)):
            lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
            write_atomic(folder / kind / f"batch-{batch}.jsonl.gz", gzip.compress(lines, compresslevel=5))


def _feature(view: dict, vocab: list[str], meta: dict, np_model: str, source: str, feature: int, density: float,
             now: str) -> dict:
    """One Feature record: density, max activation, logit lens, histogram of positive activations."""
    lo, per_decade, _ = meta["hist"]
    first, *counts = view["hist"]
    centres = [10 ** (lo + (first + i + 0.5) / per_decade) for i in range(len(counts))]
    lens = {key: ([vocab[i] for i, _ in view.get(key, [])], [s for _, s in view.get(key, [])])
            for key in ("promoted", "suppressed")}
    return {"modelId": np_model, "layer": source, "index": str(feature), "creatorId": None, "createdAt": now,
            "maxActApprox": view["max"], "hasVector": False, "vector": [], "frac_nonzero": density,
            "pos_str": lens["promoted"][0], "pos_values": lens["promoted"][1],
            "neg_str": lens["suppressed"][0], "neg_values": lens["suppressed"][1],
            "freq_hist_data_bar_heights": counts, "freq_hist_data_bar_values": centres}


def _activation(example: list, maximum: float, vocab: list[str], np_model: str, source: str, feature: int,
                k: int, now: str) -> dict:
    """One Activation record: a top context's tokens and the feature's activation on each (de-quantised; the
    marked token's exact)."""
    value, marked, ids, quantised = example
    values = [q * maximum / 255.0 for q in quantised]
    values[marked] = value
    return {"id": f"{source}-{feature}-{k}", "tokens": [vocab[i] for i in ids], "modelId": np_model,
            "layer": source, "index": str(feature), "maxValue": max(values),
            "maxValueTokenIndex": values.index(max(values)),
            "minValue": min(values), "values": values, "creatorId": None, "createdAt": now}
