"""training/evaluate.py: every stat against a direct computation, on small tensors and on the tiny GPT-NeoX.

References here use plain torch forward hooks on the transformers module and full-tensor formulas, not the
package's attach/segment machinery, so each check can fail independently of the code under test.
"""

from __future__ import annotations

import json

import pytest
import torch

from dictionaries.architectures import ARCHITECTURES, build_dictionary
from dictionaries.card import Card, Files, compare_stats
from dictionaries.errors import EvalInputError, InvalidArgumentError, MissingFileError, ModelLoadError, UnknownNameError
from dictionaries.recipe import HookPoint, ModelRef
from dictionaries.references import card_of
from training.evaluate import evaluate, evaluate_and_write, pack_batches

D = 64  # tiny_neox's width


def make_card(name="toy/mlp0/128", layer=0, kind="relu", d_dict=2 * D, model_id="toy"):
    return Card(name=name, architecture=kind, d_in=D, d_dict=d_dict, k=D if kind in ("topk", "batchtopk") else None,
                files=Files(items=[]), model=ModelRef(id=model_id),
                hook=HookPoint(module=f"gpt_neox.layers.{layer}.mlp", site="mlp", layer=layer))


def identity_like(kind="relu", scale=1.0, layer=0, name="toy/mlp0/128"):
    """f = [relu(x), relu(-x)], x_hat = scale * (f+ - f-) = scale * x: exact reconstruction at scale 1."""
    d = build_dictionary(make_card(name=name, layer=layer, kind=kind))
    eye = torch.eye(D)
    with torch.no_grad():
        d.W_enc.copy_(torch.cat([eye, -eye], 1))
        d.W_dec.copy_(scale * torch.cat([eye, -eye], 0))
    return d


@pytest.fixture(scope="module")
def contexts(tokenizer):
    from training.toymodel import corpus_documents

    return pack_batches(corpus_documents()[:300], tokenizer=tokenizer, tokens=8 * 24, context_length=24,
                        batch_size=4)                             # two batches: the sums stream across them


def reference(model, hook_layer, ids, mask, keep, replace):
    """Logits with the mlp output at counted positions replaced by replace(x), via a plain torch hook."""
    module = model.gpt_neox.layers[hook_layer].mlp
    seen = {}

    def hook(_m, _a, out):
        seen["x"] = out
        if replace is None:
            return None
        return torch.where(keep[..., None], replace(out), out)

    h = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
    finally:
        h.remove()
    return logits, seen["x"]


def ce_and_kl(logits, clean, ids, predicts):
    lp = torch.log_softmax(logits[:, :-1][predicts].double(), -1)
    lc = torch.log_softmax(clean[:, :-1][predicts].double(), -1)
    tgt = ids[:, 1:][predicts]
    ce = -lp.gather(1, tgt[:, None]).mean()
    kl = (lc.exp() * (lc - lp)).sum(-1).mean()
    return float(ce), float(kl)


# ---- on the tiny GPT-NeoX ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_identity_dictionary_recovers_all_loss(tiny_neox, contexts, kind):
    [r] = evaluate(tiny_neox, [identity_like(kind)], contexts, tokens=10**6, context_length=24, sensitivity=False,
                   progress=False)
    s = r.stats
    assert s.fvu == pytest.approx(0, abs=1e-10)
    assert s.mse == pytest.approx(0, abs=1e-12)
    assert s.kl == pytest.approx(0, abs=1e-9)
    assert s.frac_loss_recovered == pytest.approx(1, abs=1e-6)
    assert s.ce_zero != pytest.approx(s.ce_clean, abs=1e-6)  # the test is meaningful: ablation changes the loss


def test_zero_dictionary_recovers_no_loss(tiny_neox, contexts):
    d = build_dictionary(make_card())                         # all-zero weights: x_hat = 0
    [r] = evaluate(tiny_neox, [d], contexts, tokens=10**6, context_length=24, sensitivity=False, progress=False)
    assert r.stats.frac_loss_recovered == pytest.approx(0, abs=1e-9)
    assert r.stats.ce_spliced == pytest.approx(r.stats.ce_zero, rel=1e-12)
    assert r.stats.frac_alive == 0
    assert r.stats.l0 == 0
    assert r.stats.fvu > 0.99


def test_every_stat_matches_a_plain_hook_reference(tiny_neox, contexts):
    """A half-scale dictionary (x_hat = x/2) at layer 1, against hooks + formulas on the whole eval set."""
    d = identity_like(scale=0.5, layer=1, name="toy/mlp1/128")
    [r] = evaluate(tiny_neox, [d], contexts, tokens=10**6, context_length=24, sensitivity=False, progress=False)
    ids = torch.cat([b[0] for b in contexts])
    mask = torch.ones_like(ids)
    keep = ids != 0                                           # BOS/EOS id 0 excluded by default
    predicts = keep[:, :-1]
    clean, x = reference(tiny_neox, 1, ids, mask, keep, None)
    spliced, _ = reference(tiny_neox, 1, ids, mask, keep, lambda a: 0.5 * a)
    zero, _ = reference(tiny_neox, 1, ids, mask, keep, torch.zeros_like)
    ce_clean, _ = ce_and_kl(clean, clean, ids, predicts)
    ce_spliced, kl = ce_and_kl(spliced, clean, ids, predicts)
    ce_zero, _ = ce_and_kl(zero, clean, ids, predicts)
    xs = x[keep].double()
    s = r.stats
    assert s.tokens == int(keep.sum())
    assert s.ce_clean == pytest.approx(ce_clean, rel=1e-5)
    assert s.ce_spliced == pytest.approx(ce_spliced, rel=1e-5)
    assert s.ce_zero == pytest.approx(ce_zero, rel=1e-5)
    assert s.kl == pytest.approx(kl, rel=1e-3, abs=1e-7)
    assert s.frac_loss_recovered == pytest.approx((ce_zero - ce_spliced) / (ce_zero - ce_clean), rel=1e-3)
    assert s.mse == pytest.approx(float(((0.5 * xs) ** 2).mean()), rel=1e-5)
    assert s.fvu == pytest.approx(float((0.5 * xs).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum()), rel=1e-5)
    assert s.l1 == pytest.approx(float(xs.abs().sum(1).mean()), rel=1e-5)


def test_bos_and_pad_positions_are_excluded(tiny_neox):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 1024, (4, 12), generator=gen)
    ids[:, 0] = 0                                             # BOS at the start of each row
    ids[1, 5] = 0                                             # and a document separator
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0                                           # right padding
    ids[2, 8:] = 1
    d = identity_like(scale=0.5)
    excl = evaluate(tiny_neox, [d], [(ids, mask)], tokens=48, context_length=12, sensitivity=False, progress=False)[0]
    incl = evaluate(tiny_neox, [d], [(ids, mask)], tokens=48, context_length=12, sensitivity=False, progress=False,
                    exclude_bos=False)[0]
    assert excl.stats.tokens == 48 - 5 - 4
    assert excl.stats.exclude_bos is True
    assert incl.stats.tokens == 48 - 4
    assert incl.stats.exclude_bos is False
    # the excluded BOS positions keep their activation: spliced differs from a full splice's loss
    keep = (mask.bool() & (ids != 0))
    clean, x = reference(tiny_neox, 0, ids, mask, keep, None)
    xs = x[keep].double()
    assert excl.stats.mse == pytest.approx(float((0.5 * xs).pow(2).mean()), rel=1e-5)


def test_one_pass_equals_separate_passes_and_groups(tiny_neox, contexts):
    a, b = identity_like(scale=0.5), identity_like(scale=0.8, layer=1, name="toy/mlp1/128")
    together = evaluate(tiny_neox, [a, b], contexts, tokens=10**6, context_length=24, sensitivity=False,
                        progress=False)
    grouped = evaluate(tiny_neox, [a, b], contexts, tokens=10**6, context_length=24, sensitivity=False,
                       progress=False, max_rows=12)          # 4 contexts * 3 segments: one dictionary per forward
    for i, d in enumerate((a, b)):
        [alone] = evaluate(tiny_neox, [d], contexts, tokens=10**6, context_length=24, sensitivity=False,
                           progress=False)
        for key in ("mse", "fvu", "l1", "l0", "ce_clean", "ce_spliced", "ce_zero", "kl", "frac_loss_recovered"):
            for other in (together[i], grouped[i]):
                assert getattr(other.stats, key) == pytest.approx(getattr(alone.stats, key), rel=1e-5, abs=1e-9), key


def test_a_small_logits_budget_bounds_every_forward_and_log_softmax(tiny_neox, contexts, monkeypatch):
    """With a budget of 4 rows of logits, each forward holds one context's three segments (3 rows) and each
    log-softmax one context, and every stat equals the unchunked evaluation's."""
    import dictionaries.hooks
    import training.evaluate as module

    assert module.LOGITS_BUDGET <= 256 << 20                  # the default stays a small fixed number of bytes
    a, b = identity_like(scale=0.5), identity_like(scale=0.8, layer=1, name="toy/mlp1/128")
    whole = evaluate(tiny_neox, [a, b], contexts, tokens=10**6, context_length=24, sensitivity=False,
                     progress=False)
    rows, softmaxed = [], []
    run_patched, log_softmax = dictionaries.hooks.run_patched, torch.log_softmax

    def counted_run(model, ids, *args):
        rows.append(ids.shape[0])
        return run_patched(model, ids, *args)

    def counted_softmax(x, dim):
        softmaxed.append(x.shape[0])
        return log_softmax(x, dim)

    monkeypatch.setattr(dictionaries.hooks, "run_patched", counted_run)
    monkeypatch.setattr(torch, "log_softmax", counted_softmax)
    monkeypatch.setattr(module, "LOGITS_BUDGET", 4 * 4 * 24 * tiny_neox.config.vocab_size)
    chunked = evaluate(tiny_neox, [a, b], contexts, tokens=10**6, context_length=24, sensitivity=False,
                       progress=False)
    assert rows and max(rows) == 3                             # 8 contexts, 2 dictionaries: 16 forwards
    assert len(rows) == 16
    assert softmaxed and max(softmaxed) == 1
    for one, other in zip(whole, chunked):
        for key in ("mse", "fvu", "l1", "l0", "ce_clean", "ce_spliced", "ce_zero", "kl", "frac_loss_recovered"):
            assert getattr(other.stats, key) == pytest.approx(getattr(one.stats, key), rel=1e-6, abs=1e-9), key
        assert torch.equal(other.density, one.density)


def test_an_nnsight_wrapped_model_gives_the_same_stats(tiny_neox, tokenizer, contexts):
    from dictionaries.attachment import wrap_model

    d = identity_like(scale=0.5)
    plain, wrapped = (evaluate(m, [d], contexts, tokens=10**6, context_length=24, sensitivity=False,
                               progress=False)[0].stats for m in (tiny_neox, wrap_model(tiny_neox, tokenizer)))
    assert plain.model_dump() == wrapped.model_dump()


def test_deterministic_for_a_seed(tiny_neox, contexts):
    d = identity_like(scale=0.7)
    runs = [evaluate(tiny_neox, [d], contexts, tokens=10**6, context_length=24, seed=3, sensitivity_samples=4,
                     progress=False)[0] for _ in range(2)]
    assert runs[0].stats.model_dump(exclude={"date"}) == runs[1].stats.model_dump(exclude={"date"})
    for kind in ("random", "real", "dictionary"):
        assert torch.equal(runs[0].sensitivity.kl[kind], runs[1].sensitivity.kl[kind])
    assert runs[0].stats.sensitivity.samples == 4


# ---- bad inputs ----------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(tiny_neox, tokenizer, contexts):
    no_hook = build_dictionary(make_card().model_copy(update={"hook": None}))
    with pytest.raises(EvalInputError, match="no hook point"):
        evaluate(tiny_neox, [no_hook], contexts, progress=False)
    with pytest.raises(EvalInputError, match="none were given"):
        evaluate(tiny_neox, [], contexts, progress=False)
    with pytest.raises(EvalInputError, match="need a tokenizer"):
        pack_batches(["some text"], tokens=10, context_length=4, batch_size=1)
    with pytest.raises(EvalInputError, match="fewer than 64 tokens"):
        pack_batches(["short"], tokenizer=tokenizer, tokens=64, context_length=64, batch_size=1)
    with pytest.raises(EvalInputError, match="no token batches"):
        pack_batches([], tokens=64, context_length=8, batch_size=1)


# ---- folders and the command line ---------------------------------------------------------------------
@pytest.fixture
def workspace(tmp_path, tiny_neox, tokenizer):
    from dictionaries.formats import write_native
    from training.toymodel import corpus_documents

    model_dir = tmp_path / "model"
    tiny_neox.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    text = tmp_path / "eval.txt"
    text.write_text("\n\n".join(corpus_documents()[:200]))
    a = identity_like(scale=0.5)
    with torch.no_grad():
        a.b_enc.fill_(-0.05)                                  # some features never fire: a real histogram
    write_native(a, tmp_path / "a")
    b = identity_like(scale=0.9, layer=1, name="toy/mlp1/128")
    write_native(b, tmp_path / "b")
    return tmp_path


def test_eval_of_a_native_folder_writes_stats_density_and_plots(workspace):
    from training.density import read_density

    [(folder, card)] = evaluate_and_write(str(workspace / "a"), model=str(workspace / "model"),
                                          dataset=str(workspace / "eval.txt"), tokens=512, context_length=32,
                                          sensitivity_samples=8, progress=False)
    on_disk = json.loads((workspace / "a" / "card.json").read_text())
    assert on_disk["stats"]["source"] == "measured"
    assert on_disk["stats"]["tokens"] > 0
    assert on_disk["stats"]["fvu"] == pytest.approx(card.stats.fvu)
    assert 0 < card.stats.fvu < 1
    assert set(on_disk["stats"]["sensitivity"]) == {"random", "real", "dictionary", "samples", "max_step"}
    freq = read_density(workspace / "a")
    assert freq.shape == (2 * D,)
    assert float((freq == 0).sum()) == card.stats.density["dead"]
    for png in ("density.png", "sensitivity.png"):
        data = (workspace / "a" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 5000
    from dictionaries.loader import load_dictionary

    assert load_dictionary(str(workspace / "a")).card.stats.fvu == pytest.approx(card.stats.fvu)  # still loads


def test_eval_of_trained_folders_with_an_in_process_model(workspace, tiny_neox, tokenizer):
    """What a training run does: its fresh folders, its model object, one pass."""
    written = evaluate_and_write([workspace / "a", workspace / "b"], model=tiny_neox, tokenizer=tokenizer,
                                 dataset=str(workspace / "eval.txt"), tokens=256, context_length=32,
                                 sensitivity=False, progress=False)
    assert [w[0] for w in written] == [str(workspace / "a"), str(workspace / "b")]
    assert all(card.stats.source == "measured" and card.stats.tokens > 200 for _, card in written)


def test_eval_out_never_writes_outside_out(workspace):
    """A folder's card name is free text: `--out DIR` must not follow a `../` in it out of DIR."""
    from dictionaries.errors import CardError
    from dictionaries.formats import write_native

    evil = identity_like(scale=0.5, name="../../escaped")
    write_native(evil, workspace / "evil", card=evil.card)
    with pytest.raises(CardError, match="output folder under --out"):
        evaluate_and_write(str(workspace / "evil"), model=str(workspace / "model"), out=str(workspace / "out"),
                           dataset=str(workspace / "eval.txt"), tokens=256, context_length=32, sensitivity=False,
                           progress=False)
    assert not (workspace.parent / "escaped").exists()
    assert not (workspace / "out").exists()


def test_cli_eval_glob_and_compare(workspace):
    from typer.testing import CliRunner

    from dictionaries.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(workspace / "[ab]"), "--model", str(workspace / "model"),
                                 "--dataset", str(workspace / "eval.txt"), "--tokens", "256", "--context-length",
                                 "32", "--no-sensitivity"])
    assert result.exit_code == 0, result.output
    assert "toy/mlp0/128" in result.output
    assert "toy/mlp1/128" in result.output
    assert not (workspace / "a" / "sensitivity.png").exists()
    assert (workspace / "b" / "density.png").exists()
    (names, rows) = compare_stats(card_of(str(workspace / "a")), card_of(str(workspace / "b")))
    values = {k: (va, vb) for k, va, vb, _ in rows}
    diffs = {k: d for k, _, _, d in rows}
    assert diffs["fvu"] == pytest.approx(values["fvu"][1] - values["fvu"][0])
    assert diffs["exclude_bos"] is None
    on_disk = [json.loads((workspace / x / "card.json").read_text())["stats"] for x in "ab"]
    assert names == ("toy/mlp0/128", "toy/mlp1/128")
    assert values["fvu"] == (on_disk[0]["fvu"], on_disk[1]["fvu"])
    assert values["fvu"][1] < values["fvu"][0]
    assert values["density.dead"] == (on_disk[0]["density"]["dead"], on_disk[1]["density"]["dead"])
    result = runner.invoke(app, ["compare", str(workspace / "a"), str(workspace / "b")])
    assert result.exit_code == 0
    assert "frac_loss_recovered" in result.output
    assert "density.dead" in result.output


def test_eval_errors_for_models_names_and_mixtures(workspace):
    with pytest.raises(ModelLoadError, match="cannot load model"):
        evaluate_and_write(str(workspace / "a"), model=str(workspace / "nowhere"), dataset=str(workspace / "eval.txt"),
                           tokens=64, context_length=32, progress=False)
    with pytest.raises(UnknownNameError):
        evaluate_and_write("pythia70m/mlp9/*", tokens=64, progress=False)
    from dictionaries.formats import write_native

    write_native(identity_like(), workspace / "c", card=make_card(name="other/mlp0/128", model_id="other"))
    with pytest.raises(EvalInputError, match="one model"):
        evaluate_and_write(str(workspace / "[ac]"), dataset=str(workspace / "eval.txt"), tokens=64, progress=False)


def test_show_prints_the_density_summary_of_an_evaluated_entry(workspace, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from dictionaries.cli import app

    [(_, card)] = evaluate_and_write(str(workspace / "a"), model=str(workspace / "model"),
                                     dataset=str(workspace / "eval.txt"), tokens=128, context_length=32,
                                     sensitivity=False, progress=False)
    root = workspace / "reg"
    (root / "cards" / "toy" / "mlp0").mkdir(parents=True)
    (root / "cards" / "toy" / "mlp0" / "128.yaml").write_text(yaml.safe_dump(card.model_dump(mode="json",
                                                                                               exclude_none=True)))
    (root / "registry.yaml").write_text(yaml.safe_dump({"version": 1, "entries": {"toy/mlp0/128": {
        "card": "toy/mlp0/128.yaml", "location": {"kind": "url", "url": "https://example.invalid/toy/"}}}}))
    monkeypatch.setenv("DICTIONARIES_REGISTRY", str(root / "registry.yaml"))
    result = CliRunner().invoke(app, ["show", "toy/mlp0/128"])
    d = card.stats.density
    assert result.exit_code == 0, result.output
    assert (f"feature density: {int(d['dead'])} dead of {2 * D}, {int(d['above_1e-1'])} above 1e-1"
            in result.output)
    # a registry name against a folder
    names, rows = compare_stats(card_of("toy/mlp0/128"), card_of(str(workspace / "a")))
    assert all(va == vb for k, va, vb, _ in rows if k != "date")


def test_cli_reports_eval_errors_in_one_line(workspace, monkeypatch, capsys):
    from dictionaries import cli

    monkeypatch.setattr("sys.argv", ["dictctl", "eval", str(workspace / "a"), "--model", str(workspace / "nowhere"),
                                     "--dataset", str(workspace / "eval.txt")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "cannot load model" in err
    assert "--model" in err


@pytest.mark.parametrize("options, error, words", [
    ({"tokens": 0}, InvalidArgumentError, "tokens 0"), ({"tokens": -1}, InvalidArgumentError, "tokens -1"),
    ({"batch_size": 0}, InvalidArgumentError, "batch_size 0"),          # range() with step 0 mid-eval
    ({"context_length": 0}, InvalidArgumentError, "context_length 0"),  # a division by zero mid-eval
    ({"device": "nonsense"}, InvalidArgumentError, "device 'nonsense'"),
    ({"dataset": "{w}/nowhere.txt"}, MissingFileError, "nowhere.txt"),
])
def test_eval_arguments_are_checked_before_any_work(workspace, options, error, words):
    options = {k: v.format(w=workspace) if isinstance(v, str) else v for k, v in options.items()}
    options.setdefault("dataset", str(workspace / "eval.txt"))
    with pytest.raises(error, match=words):  # "no-such-model" would fail later: these come first
        evaluate_and_write(str(workspace / "a"), model=str(workspace / "no-such-model"), progress=False, **options)
