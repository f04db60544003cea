"""Feature dashboards: the one-pass tables against features_of, the site's files, `dictctl dashboard`,
publishing a site beside the weights, and the page itself in headless Chromium."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from dictionaries.dashboard import DashboardBuilder, build_dashboard, keep_first, token_batches
from dictionaries.dashboard_site import SHARD, vocab_of, write_site
from dictionaries.features import features_of, inspect_feature, logit_lens

from helpers import chromium_page, dictctl, make_dictionary

HOOK = "gpt_neox.layers.0.mlp"
SCREENSHOT = os.environ.get("DASHBOARD_SCREENSHOT")  # where a copy of the browser test's screenshot goes


@pytest.fixture(scope="module")
def texts():
    from training.toymodel import corpus_documents

    # each text shorter than a context: one row each, so windows are those inspect_feature shows
    return [d[:160] for d in corpus_documents()[:24]]


@pytest.fixture(scope="module")
def wrapped(tiny_neox, tokenizer):
    from dictionaries.attachment import wrap_model

    return wrap_model(tiny_neox, tokenizer)


@pytest.fixture(scope="module")
def dictionary():
    return make_dictionary(64, 40, HOOK, kind="topk", seed=3)


@pytest.fixture(scope="module")
def data(tiny_neox, tokenizer, dictionary, texts):
    batches = token_batches(tokenizer, texts, tokens=10**6, context_length=128, batch_size=5)
    return build_dashboard(tiny_neox, dictionary, batches, progress=False, top=6, samples=9)


@pytest.fixture(scope="module")
def site(data, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    write_site(data, vocab_of(tokenizer), out)
    return out


def test_keep_first_keeps_the_k_best_of_each_group():
    groups = torch.tensor([0, 1, 0, 0, 1, 2])
    scores = torch.tensor([0.1, 5.0, 0.7, 0.3, 1.0, 2.0])
    pos, g, rank = keep_first(groups, scores, 4, 2)
    assert sorted(zip(g.tolist(), rank.tolist(), pos.tolist())) == [(0, 0, 2), (0, 1, 3), (1, 0, 1), (1, 1, 4),
                                                                   (2, 0, 5)]


def test_one_pass_matches_features_of(data, wrapped, dictionary, texts):
    feats = features_of(wrapped, dictionary, texts, progress=False)
    allf = torch.cat(feats)
    assert data.tokens == allf.shape[0]
    assert torch.equal(data.count, (allf > 0).sum(0))
    assert torch.allclose(data.maximum, allf.max(0).values.clamp_min(0), atol=1e-6)
    assert torch.allclose(data.total, allf.clamp_min(0).sum(0), rtol=1e-4, atol=1e-5)
    assert torch.equal(data.hist.sum(1), data.count)
    for feature in [int(i) for i in data.count.argsort(descending=True)[:3]]:
        report = inspect_feature(wrapped, dictionary, texts, feature, top=6, context=8, progress=False)
        windows = every_window(wrapped.tokenizer, feats, texts, feature)
        ours = [(f"{float(v):.4g}", "".join(tok_text(wrapped.tokenizer, i) for i in ids.tolist() if i >= 0))
                for v, ids in zip(data.top.value[feature], data.top.ids[feature]) if v > 0]
        # the same activations as inspect_feature's top contexts (ties may pick other places of equal value) ...
        assert sorted(a for a, _ in ours) == sorted(f"{e.activation:.4g}" for e in report.examples)
        # ... each at a place where features_of gives the feature that value, with that window
        assert all(o in {(a, t) for a, t, _ in windows} for o in ours)
        # the reservoir: firing tokens only, and more than the maxima (a feature firing often shows lower ones)
        values = data.samples.value[feature][data.samples.score[feature] > -math.inf]
        assert len(values) == min(9, int(data.count[feature])) and bool((values > 0).all())
        assert float(values.min()) < float(data.top.value[feature].min())
        marked = data.samples.acts[feature][:len(values), 8]
        assert torch.allclose(marked, values)


def tok_text(tokenizer, i: int) -> str:
    return tokenizer.decode([i])


def every_window(tokenizer, feats, texts, feature, before=8, after=4) -> set[tuple[str, str, str]]:
    """(activation to 4 digits, window text, marked token) of every place `feature` fires, from features_of."""
    out = set()
    for text, f in zip(texts, feats):
        ids = tokenizer(text)["input_ids"]
        for p, v in enumerate(f[:, feature].tolist()):
            if v > 0:
                window = ids[max(0, p - before):p + after + 1]
                out.add((f"{v:.4g}", "".join(tokenizer.decode([i]) for i in window), tokenizer.decode([ids[p]])))
    return out


def test_tables_do_not_grow_with_tokens(tiny_neox, tokenizer, dictionary, texts):
    builder = DashboardBuilder(tiny_neox, dictionary, top=4, samples=4)
    shapes = None
    for ids, mask in token_batches(tokenizer, texts * 3, tokens=10**6, context_length=32, batch_size=4):
        builder.add(ids, mask)
        now = [tuple(t.shape) for t in (builder.top.ids, builder.samples.acts, builder.hist, builder.count)]
        assert shapes in (None, now)
        shapes = now
    assert shapes[0] == (40, 4, 13)


def test_lens_and_nearest_are_those_of_the_weights(data, wrapped, dictionary):
    promoted, suppressed = logit_lens(wrapped, dictionary.W_dec[7].detach(), top=10)
    assert data.promoted[0][7].tolist() == [s.id for s in promoted]
    assert data.suppressed[0][7].tolist() == [s.id for s in suppressed]
    unit = torch.nn.functional.normalize(dictionary.W_dec.detach(), dim=-1)
    cos = unit @ unit.T
    cos.fill_diagonal_(-2)
    assert data.nearest[0][5].tolist() == cos[5].topk(8).indices.tolist()


def test_site_files(site, data):
    names = sorted(p.name for p in (site / "data").iterdir())
    assert names == ["index.js", "meta.js", "shard_0000.js", "vocab.js"]
    assert {p.name for p in site.iterdir()} >= {"index.html", "dashboard.js", "dashboard.css"}
    text = (site / "data" / "shard_0000.js").read_text()
    assert text.startswith('DASH.put("shard_0000",')
    shard = json.loads(text[len('DASH.put("shard_0000",'):-3])
    assert len(shard["features"]) == min(SHARD, 40)
    view = shard["features"][0]
    assert set(view) >= {"n", "max", "hist", "top", "samples", "promoted", "suppressed", "near"}


def _native(tmp_path, tiny_neox, tokenizer, neuronpedia=None):
    from dictionaries.formats import write_native

    model_dir = tmp_path / "model"
    tiny_neox.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    d = make_dictionary(64, 300, HOOK, kind="topk", seed=1, model_id=str(model_dir))
    card = d.card.model_copy(update={"name": "toyneox/mlp0/300"})
    if neuronpedia:
        card = card.model_copy(update={"links": card.links.model_copy(update={"neuronpedia": neuronpedia})})
    write_native(d, tmp_path / "native", card=card)
    return tmp_path / "native", model_dir


def test_cli_dashboard_and_publish_beside_the_weights(tmp_path, tiny_neox, tokenizer, texts, monkeypatch, capsys,
                                                      local_hub):
    native, _ = _native(tmp_path, tiny_neox, tokenizer)
    (tmp_path / "texts.txt").write_text("\n\n".join(texts))
    code, out, err = dictctl(monkeypatch, capsys, "dashboard", str(native), "--dataset", str(tmp_path / "texts.txt"),
                             "--tokens", "2000", "--out", str(tmp_path / "site"))
    assert code == 0, err
    assert "wrote" in out and (tmp_path / "site" / "index.html").is_file()
    assert sorted(p.name for p in (tmp_path / "site" / "data").glob("shard_*.js")) == ["shard_0000.js",
                                                                                       "shard_0001.js"]
    code, out, err = dictctl(monkeypatch, capsys, "dashboard", str(native), "--features", "290:400")
    assert code == 1 and err.startswith("feature out of range:") and len(err.strip().splitlines()) == 1

    from dictionaries.publish import publish

    result = publish(native, "org/dash", subfolder="mlp0", local_hub=local_hub, dashboard=tmp_path / "site")
    assert "mlp0/dashboard/index.html" in result.uploaded and "mlp0/dashboard/data/shard_0001.js" in result.uploaded
    assert local_hub.read("org/dash", "mlp0/dashboard/data/meta.js") == (tmp_path / "site/data/meta.js").read_bytes()
    assert local_hub.read("org/dash", "mlp0/weights.safetensors") is not None
    assert "(dashboard/index.html)" in local_hub.read("org/dash", "mlp0/README.md").decode()
    with pytest.raises(FileNotFoundError):  # not a site: nothing goes up
        publish(native, "org/dash2", local_hub=local_hub, dashboard=tmp_path)
    assert local_hub.read("org/dash2", "weights.safetensors") is None


# ---- the page in a browser -------------------------------------------------------------------------
def test_page_in_headless_chromium(data, site, wrapped, dictionary, texts, tmp_path):
    feature = int(data.count.argsort(descending=True)[1])
    report = inspect_feature(wrapped, dictionary, texts, feature, top=6, context=8, progress=False)
    windows = {(a, t.replace("\n", "\u23ce"), m.replace("\n", "\u23ce"))
               for a, t, m in every_window(wrapped.tokenizer, features_of(wrapped, dictionary, texts, progress=False),
                                           texts, feature)}
    errors: list[str] = []
    with chromium_page(errors) as page:
        page.goto((site / "index.html").as_uri())
        assert page.locator("tr.row").count() == 40
        page.click("th[data-key=max]")                   # sorts by max activation, highest first
        first = int(page.locator("tr.row").first.get_attribute("data-id"))
        assert first == int(data.maximum.argmax())
        page.fill("#search", str(feature))
        assert page.locator("tr.row").count() == 1
        page.click(f"tr.row[data-id='{feature}'] a")
        page.wait_for_selector("#top-contexts .context")
        assert page.url.endswith(f"#f={feature}")
        shown = page.eval_on_selector_all("#top-contexts .context", """els => els.map(e => [e.dataset.act,
            Array.from(e.querySelectorAll('.tok')).map(t => t.textContent).join(''),
            e.querySelector('.tok.marked').textContent])""")
        shown = [(f"{float(a):.4g}", t, m) for a, t, m in shown]
        assert sorted(a for a, _, _ in shown) == sorted(f"{e.activation:.4g}" for e in report.examples)
        assert all(s in windows for s in shown), [s for s in shown if s not in windows]
        assert page.locator("#samples .context").count() == min(9, int(data.count[feature]))
        assert page.locator("#nearest a").count() == 8
        page.screenshot(path=str(tmp_path / "feature.png"), full_page=True)
        if SCREENSHOT:
            shutil.copyfile(tmp_path / "feature.png", SCREENSHOT)
        page.goto((site / "index.html").as_uri() + "#f=999")
        assert "not in this dashboard" in page.inner_text("#view")
    assert errors == []

