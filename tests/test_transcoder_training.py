"""Transcoders in training/: the trainer on (input, target) pairs, one run harvesting both hooks of the tiny
GPT-NeoX through `dictctl train --recipe`, and evaluation against the MLP's output (loss recovered when the
MLP's output is replaced by the prediction, zero-ablation as the baseline)."""

from __future__ import annotations

import json

import pytest
import torch

from training.trainer import Trainer

from helpers import dictctl, make_transcoder
from synthetic import BATCH, D_IN, SparseSource, make_recipe

D_OUT = 16
IN = {"module": "gpt_neox.layers.0.mlp", "io": "input", "site": "mlp", "layer": 0}
OUT = {"module": "gpt_neox.layers.0.mlp", "io": "output", "site": "mlp", "layer": 0}


class PairSource:
    """(x, y) with y a small ReLU MLP of x plus a linear part, (n, 24) -> (n, 16): what a transcoder predicts."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(50 + seed)
        self.x = SparseSource(seed)
        self.A = torch.randn(D_IN, 48, generator=g) / D_IN ** 0.5
        self.B = torch.randn(48, D_OUT, generator=g) / 48 ** 0.5
        self.C = 0.5 * torch.randn(D_IN, D_OUT, generator=g) / D_IN ** 0.5

    def __call__(self, n: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x(n)
        return x, torch.relu(x @ self.A) @ self.B + x @ self.C


def _fvu(module, x, y) -> float:
    with torch.no_grad():
        pred = module(x).reconstruction
    return float((y - pred).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


@pytest.mark.parametrize(("name", "fields"), [("paulo2025", {}), ("dunefsky2024", {}),
                                              ("paulo2025", {"input_normalization": "sqrt_d"}),
                                              ("topk", {"pre_encoder_bias": False})])   # tied init, d_out != d_in
def test_the_trainer_learns_to_predict_the_target(name, fields):
    recipe = make_recipe(name, hook=IN, output_hook=OUT, **fields)
    assert recipe.pre_encoder_bias is False
    source = PairSource()
    t = Trainer(recipe, D_IN, total_steps=300, d_out=D_OUT)
    if recipe.input_normalization != "none":
        t.estimate_input_scale(source(1024)[0])
        assert t.input_scale != 1.0
    metrics = [t.step(x, target=y) for x, y in (source() for _ in range(300))]
    assert metrics[-1]["loss"] < 0.5 * metrics[0]["loss"]
    x, y = source(2048)                        # fresh draws, not trained on
    module = t.finish()                        # raw units in and out: the input scale is folded back
    assert (module.d_in, module.d_out) == (D_IN, D_OUT) and (module.W_skip is not None) == recipe.skip
    untrained = _fvu(Trainer(recipe, D_IN, total_steps=1, d_out=D_OUT).finish(), x, y)
    assert _fvu(module, x, y) < 0.5 < untrained
    if recipe.skip:
        assert float(module.W_skip.detach().abs().sum()) > 0          # the skip term learned the linear part


def test_a_target_of_the_wrong_width_is_refused():
    from dictionaries.errors import ShapeMismatchError

    t = Trainer(make_recipe("paulo2025", hook=IN, output_hook=OUT), D_IN, total_steps=2, d_out=D_OUT)
    with pytest.raises(ShapeMismatchError, match=f"batch, {D_OUT}"):
        t.step(torch.zeros(BATCH, D_IN), target=torch.zeros(BATCH, D_IN))


# ---- one run on the tiny GPT-NeoX, through the command line ---------------------------------------------
def test_dictctl_trains_a_skip_transcoder_from_a_recipe_file(tmp_path, corpus, toy_folder, monkeypatch, capsys):
    recipe = (f"preset: paulo2025\nk: 8\ntokens: 2048\nmodel: {{id: {toy_folder}}}\ndataset: {{path: {corpus}}}\n"
              "hook: {module: gpt_neox.layers.1.mlp, io: input, site: mlp, layer: 1}\n"
              "output_hook: {module: gpt_neox.layers.1.mlp, site: mlp, layer: 1}\n"
              "batch_size: 128\nbuffer_contexts: 16\nharvest_batch_size: 8\ncontext_length: 32\nd_dict: 128\n"
              "holdout_tokens: 1024\noptimizer: {warmup_steps: 2, lr: 0.003}\n")
    (tmp_path / "tc.yaml").write_text(recipe)
    code, out, err = dictctl(monkeypatch, capsys, "train", "--recipe", str(tmp_path / "tc.yaml"),
                             "--out", str(tmp_path / "out"), "--device", "cpu")
    assert code == 0, err
    folder = tmp_path / "out" / toy_folder.name / "mlp1" / "128-transcoder"   # not the name of an SAE there
    card = json.loads((folder / "card.json").read_text())
    assert card["output_hook"]["io"] == "output" and card["hook"]["io"] == "input" and card["skip"] is True
    assert card["pre_encoder_bias"] is False and "d_out" not in card          # d_out = d_in = 64
    stats = card["stats"]
    assert 0 < stats["fvu"] < 1 and stats["l0"] <= 8 and "sensitivity" not in stats   # held-out, vs the MLP output
    # the tiny random model barely needs its MLP (CE_zero ~ CE_clean), so the ratio is only checked as defined
    gap = stats["ce_zero"] - stats["ce_clean"]
    assert stats["frac_loss_recovered"] == pytest.approx((stats["ce_zero"] - stats["ce_spliced"]) / gap)
    from dictionaries.formats import read_folder

    d = read_folder(folder)
    assert d.W_skip is not None and float(d.W_skip.detach().abs().sum()) > 0


# ---- evaluation against the MLP's output ----------------------------------------------------------------
def test_evaluate_measures_the_prediction_against_the_mlp_output(tiny_neox, tokenizer):
    from dictionaries.hooks import collect_activations, run_patched
    from training.evaluate import evaluate
    from training.toymodel import corpus_documents

    path = "gpt_neox.layers.0.mlp"
    d = make_transcoder(64, 64, 96, f"{path}:input", path, kind="topk", skip=True)
    sae = make_transcoder(64, 64, 96, f"{path}:input", path, kind="relu")
    sae.card = sae.card.model_copy(update={"output_hook": None, "hook": sae.card.output_hook})  # an SAE at mlp out
    texts = corpus_documents()[:8]
    tc_res, sae_res = evaluate(tiny_neox, [d, sae], texts, tokenizer=tokenizer, tokens=256, context_length=32,
                               batch_size=4, exclude_bos=False, sensitivity=True, progress=False)
    tc = tc_res.stats
    assert tc.sensitivity is None and sae_res.stats.sensitivity is not None
    # by hand: the same contexts, MLP input -> prediction, against the MLP output; CE with the output replaced
    from training.evaluate import pack_batches

    mse, n, predictions, ce = 0.0, 0, 0, {"spliced": 0.0, "zero": 0.0}
    batches = pack_batches(texts, tokenizer=tokenizer, tokens=256, context_length=32, batch_size=4, seed=0)
    assert all(mask is None or bool(mask.all()) for _, mask in batches)        # packed: every position is real
    with torch.no_grad():
        for ids, mask in batches:
            x, y = collect_activations(tiny_neox, [f"{path}:input", path], ids, mask)
            pred = d(x).reconstruction
            mse += float((pred - y).pow(2).sum())
            n += y.shape[0] * y.shape[1]
            predictions += ids.shape[0] * (ids.shape[1] - 1)                    # position t predicts token t+1
            for kind, new in (("spliced", pred), ("zero", torch.zeros_like(y))):
                logits = run_patched(tiny_neox, ids, mask, {path: lambda a, new=new: new})
                lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
                ce[kind] -= float(lp.sum())
    assert tc.mse == pytest.approx(mse / (n * 64), rel=1e-4)
    assert tc.ce_spliced == pytest.approx(ce["spliced"] / predictions, rel=1e-4)
    assert tc.ce_zero == pytest.approx(ce["zero"] / predictions, rel=1e-4)
    assert tc.frac_loss_recovered == pytest.approx((tc.ce_zero - tc.ce_spliced) / (tc.ce_zero - tc.ce_clean))


def test_a_transcoder_and_an_sae_train_together_and_resume_bit_identically(tmp_path, corpus, tiny_neox, tokenizer,
                                                                           monkeypatch):
    """One pass feeds both (the SAE reads the transcoder's output hook, so two hook points are harvested, and
    the transcoder takes rows from both); a kill between checkpoints and a resume end where an uninterrupted
    run does."""
    from dictionaries.recipe import Recipe
    from training import run as run_module
    from training.presets import preset

    from helpers import Killed, kill_at, weights

    common = dict(model={"id": "toy-neox"}, dataset={"path": str(corpus)}, context_length=32, tokens=128 * 12,
                  batch_size=128, buffer_contexts=16, harvest_batch_size=8, d_dict=64, holdout_tokens=512,
                  optimizer={"lr": 1e-3, "warmup_steps": 2})
    tc = Recipe.model_validate(preset("paulo2025", k=4, hook=IN, output_hook=OUT, **common))
    sae = Recipe.model_validate(preset("topk", k=4, hook=OUT, **common))
    names = ["toy/mlp0/64-tc", "toy/mlp0/64"]

    def train(out, **kw):
        return run_module.train([tc, sae], out=out, model=tiny_neox, tokenizer=tokenizer, names=names,
                                checkpoint_every=5, progress=False, eval_tokens=0, **kw)

    expected = train(tmp_path / "whole")
    kill_at(monkeypatch, 2 * 7 + 1)                    # during step 8 of 12: the checkpoint at step 5 is kept
    with pytest.raises(Killed):
        train(tmp_path / "cut")
    monkeypatch.undo()
    resumed = train(tmp_path / "cut", resume=True)
    for a, b in zip(expected, resumed):
        wa, wb = weights(a), weights(b)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert "W_skip" in weights(expected[0]) and "W_skip" not in weights(expected[1])
    card = json.loads((expected[0] / "card.json").read_text())
    assert card["output_hook"] == OUT and card["hook"] == IN


def test_dictctl_eval_writes_a_transcoders_stats_into_its_card(tmp_path, corpus, toy_folder, monkeypatch, capsys):
    from dictionaries.formats import write_native
    from dictionaries.recipe import ModelRef

    d = make_transcoder(64, 64, 96, "gpt_neox.layers.1.mlp:input", "gpt_neox.layers.1.mlp", kind="jumprelu",
                        skip=True, layer=1)
    write_native(d, tmp_path / "tc", card=d.card.model_copy(update={"model": ModelRef(id=str(toy_folder))}))
    code, out, err = dictctl(monkeypatch, capsys, "eval", str(tmp_path / "tc"), "--dataset", str(corpus),
                             "--tokens", "256", "--context-length", "32", "--device", "cpu")
    assert code == 0, err
    assert "loss recovered" in out and "FVU" in out
    stats = json.loads((tmp_path / "tc" / "card.json").read_text())["stats"]
    assert stats["tokens"] > 0 and stats["fvu"] > 0 and "sensitivity" not in stats
    assert stats["frac_loss_recovered"] == pytest.approx((stats["ce_zero"] - stats["ce_spliced"])
                                                         / (stats["ce_zero"] - stats["ce_clean"]))
