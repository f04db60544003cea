"""training/run.py: kill and resume bit-identical, several dictionaries from one pass, bad input, outputs.

Real components throughout: the tiny GPT-NeoX, the real Trainer, text from Python's docs in a file. A "kill"
is an exception raised from inside a training step (after the last checkpoint, before the next one).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from dictionaries.errors import (
    FormatError,
    HookPointError,
    InvalidArgumentError,
    NonFiniteLossError,
    OutOfDataError,
    RecipeError,
    RecipeMismatchError,
    SharedHarvestError,
)
from dictionaries.recipe import Recipe
from training import run as run_module
from training.toymodel import corpus_documents
from training.trainer import Trainer

from helpers import MLP0, Killed, kill_at, run_recipe, train, weights

RESID1 = {"module": "gpt_neox.layers.1", "site": "resid", "layer": 1}


def test_killed_and_resumed_run_is_bit_identical(tmp_path, corpus, tiny_neox, tokenizer, monkeypatch):
    recipes = [run_recipe(corpus), run_recipe(corpus, hook=RESID1, d_dict=64)]
    expected = train(recipes, tmp_path / "whole", tiny_neox, tokenizer)

    kill_at(monkeypatch, 2 * 13 + 1)  # during step 13 of 24: checkpoint at step 10, steps 11-13 are lost
    with pytest.raises(Killed):
        train(recipes, tmp_path / "cut", tiny_neox, tokenizer, log_file=tmp_path / "curve.jsonl")
    assert (tmp_path / "cut" / "checkpoint" / "latest").read_text() == "step-10"
    monkeypatch.undo()
    resumed = train(recipes, tmp_path / "cut", tiny_neox, tokenizer, resume=True, log_file=tmp_path / "curve.jsonl")

    assert [p.relative_to(tmp_path / "cut") for p in resumed] == [p.relative_to(tmp_path / "whole") for p in expected]
    for a, b in zip(expected, resumed):
        wa, wb = weights(a), weights(b)
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), key
    lines = [json.loads(line) for line in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [step for step in range(1, 25) for _ in range(2)]  # no repeats
    assert all(line["data_s"] >= 0 and line["step_s"] > 0 for line in lines)  # where each step's time went
    assert {line["dictionary"] for line in lines} == {
        "toy-neox/mlp0/96", "toy-neox/resid1/64"}
    assert not (tmp_path / "cut" / "checkpoint").exists()  # a finished run drops its checkpoint


def test_several_from_one_pass_equal_each_alone(tmp_path, corpus, tiny_neox, tokenizer):
    recipes = [run_recipe(corpus), run_recipe(corpus, d_dict=64, penalty={"coefficient": 3e-3}),
               run_recipe(corpus, hook=RESID1)]
    names = ["a/mlp0/96", "a/mlp0/64", "a/resid1/96"]
    together = train(recipes, tmp_path / "together", tiny_neox, tokenizer, names=names)
    for i, (recipe, name) in enumerate(zip(recipes, names)):
        alone = train([recipe], tmp_path / f"alone{i}", tiny_neox, tokenizer, names=[name])
        wa, wb = weights(together[i]), weights(alone[0])
        for key in wa:
            assert torch.equal(wa[key], wb[key]), (name, key)


def test_output_card_holds_the_exact_recipe(tmp_path, corpus, tiny_neox, tokenizer):
    from dictionaries.formats import read_folder

    recipe = run_recipe(corpus, tokens=128 * 6)
    (folder,) = train(recipe, tmp_path, tiny_neox, tokenizer)
    card = json.loads((folder / "card.json").read_text())
    assert Recipe.model_validate(card["recipe"]) == recipe
    assert card["provenance"]["code"].startswith("dictionaries ")
    assert any("768 tokens" in note for note in card["provenance"]["notes"])
    assert any(re.search(r"after a start-up of \d+\.\d s", note) for note in card["provenance"]["notes"])
    dictionary = read_folder(folder)
    assert dictionary.d_in == 64
    assert dictionary.d_dict == 96
    assert dictionary.card.hook.module == MLP0["module"]
    assert "stats" not in card  # eval_tokens=0 skips the evaluation


def test_trained_dictionary_arrives_with_measured_stats(tmp_path, corpus, tiny_neox, tokenizer):
    """The run ends with the same evaluation as `dictctl eval`: stats, density file and plots in the folder."""
    from dictionaries.formats import read_folder

    recipe = run_recipe(corpus, tokens=128 * 6)
    (folder,) = train(recipe, tmp_path, tiny_neox, tokenizer, eval_tokens=512)
    card = read_folder(folder).card
    assert any(re.search(r"evaluation on 512 held-out tokens: \d+\.\d s", n) for n in card.provenance.notes)
    stats = card.stats
    assert stats.source == "measured"
    assert stats.eval_set.dataset == recipe.dataset           # the whole spec, not the path alone
    assert stats.eval_set.seed == recipe.seed
    assert stats.eval_set.prepend_bos == recipe.prepend_bos
    assert stats.eval_set.contexts == 512 // 32
    assert "which training skipped" in stats.eval_set.held_out
    assert stats.tokens > 0
    assert stats.context_length == 32
    assert stats.l0 is not None
    assert stats.frac_loss_recovered is not None
    assert stats.mse >= 0
    assert (folder / "density.safetensors").exists()
    assert (folder / "density.png").exists()


def test_eval_tokens_beyond_the_holdout_are_refused_before_training(tmp_path, corpus, tiny_neox, tokenizer):
    with pytest.raises(RecipeError, match="holdout_tokens"):
        train(run_recipe(corpus), tmp_path, tiny_neox, tokenizer, eval_tokens=1024)
    assert not (tmp_path / "checkpoint").exists()


def test_resume_refuses_a_different_recipe(tmp_path, corpus, tiny_neox, tokenizer, monkeypatch):
    kill_at(monkeypatch, 7)
    with pytest.raises(Killed):
        train(run_recipe(corpus), tmp_path, tiny_neox, tokenizer)
    monkeypatch.undo()
    other = run_recipe(corpus, penalty={"coefficient": 5e-3}, optimizer={"lr": 2e-3, "warmup_steps": 4})
    with pytest.raises(RecipeMismatchError) as info:
        train(other, tmp_path, tiny_neox, tokenizer, resume=True)
    fields = [f for f, _, _ in info.value.differences]
    assert fields == ["penalty.coefficient"]  # a new lr may change on resume (tests/test_run_faults.py)
    assert "penalty.coefficient: checkpoint 0.001, now 0.005" in str(info.value)
    assert (tmp_path / "checkpoint" / "latest").read_text() == "step-5"  # the checkpoint is untouched


def test_out_of_data_keeps_the_checkpoint(tmp_path, tiny_neox, tokenizer):
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(corpus_documents()[:60]))
    recipe = run_recipe(small, tokens=128 * 1000)
    with pytest.raises(OutOfDataError) as info:
        train(recipe, tmp_path / "out", tiny_neox, tokenizer)
    err = info.value
    assert 0 < err.tokens_done < err.tokens_wanted == 128 * 1000
    assert err.tokens_done % 128 == 0
    assert "ran out after" in str(err)
    assert "is kept" in str(err)
    saved = torch.load(f"{err.checkpoint}/trainers.pt", weights_only=True)
    assert saved["step"] * 128 == err.tokens_done


def _first_seen_between(recipe, tokenizer, low, high):
    """A token id whose first appearance in the run's stream is in context `low`..`high` (None if none)."""
    from training.data import TokenStream

    stream = TokenStream(recipe.dataset, tokenizer, context_length=recipe.context_length, seed=recipe.seed)
    contexts = stream.next_contexts(high)
    seen = set(contexts[:low].flatten().tolist())
    late = [t for t in contexts[low:].flatten().tolist() if t not in seen]
    return late[0] if late else None


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, corpus, tokenizer):
    """A broken model (one token's embedding is NaN) gives NaN activations once that token is read."""
    from training.toymodel import build_model

    recipe = run_recipe(corpus, resampling={"kind": "none"})
    token = _first_seen_between(recipe, tokenizer, 40, 80)
    broken = build_model()
    with torch.no_grad():
        broken.gpt_neox.embed_in.weight[token] = float("nan")
    with pytest.raises(NonFiniteLossError) as info:
        train(recipe, tmp_path, broken, tokenizer, checkpoint_every=2)
    err = info.value
    assert err.step >= 2
    assert err.checkpoint is not None
    assert err.name == "toy-neox/mlp0/96"
    saved = torch.load(f"{err.checkpoint}/trainers.pt", weights_only=True)
    assert saved["step"] <= err.step
    assert all(torch.isfinite(v).all() for v in saved["trainers"][0]["module"].values())
    assert "is kept" in str(err)


def test_missing_hook_point_fails_before_training(tmp_path, corpus, tiny_neox, tokenizer):
    bad = run_recipe(corpus, hook={"module": "gpt_neox.layers.9.mlp", "site": "mlp", "layer": 9})
    with pytest.raises(HookPointError):
        train([run_recipe(corpus), bad], tmp_path, tiny_neox, tokenizer)
    assert not (tmp_path / "checkpoint").exists()


def test_recipes_that_cannot_share_a_pass(tmp_path, corpus, tiny_neox, tokenizer):
    with pytest.raises(SharedHarvestError) as info:
        train([run_recipe(corpus), run_recipe(corpus, context_length=64)], tmp_path, tiny_neox, tokenizer,
              names=["a/mlp0/96", "b/mlp0/96"])
    assert info.value.field == "context_length"
    assert info.value.values == [32, 64]
    with pytest.raises(SharedHarvestError) as info:  # two outputs cannot share one folder
        train([run_recipe(corpus), run_recipe(corpus)], tmp_path, tiny_neox, tokenizer)
    assert info.value.field == "names"


# ---- dictctl train ---------------------------------------------------------------------------------------
def dictctl(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `dictctl` in-process; (exit code, stdout, stderr)."""
    import sys

    from dictionaries import cli

    monkeypatch.setattr(sys, "argv", ["dictctl", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


SMALL = "batch_size: 128\nbuffer_contexts: 16\nharvest_batch_size: 8\ncontext_length: 32\nd_dict: 64\n" \
        "optimizer: {warmup_steps: 2}\n"


def test_cli_trains_a_glob_of_entries_from_one_pass(tmp_path, corpus, toy_folder, monkeypatch, capsys):
    (tmp_path / "small.yaml").write_text(SMALL)
    code, out, err = dictctl(monkeypatch, capsys, "train", "pythia70m/mlp[01]/8192", "--model", str(toy_folder),
                             "--dataset", str(corpus), "--tokens", "1536", "--recipe", str(tmp_path / "small.yaml"),
                             "--out", str(tmp_path / "out"), "--device", "cpu", "--eval-tokens", "0")
    assert code == 0, err
    assert "stats not measured (--eval-tokens 0)" in out
    for layer in (0, 1):
        folder = tmp_path / "out" / "pythia70m" / f"mlp{layer}" / "8192"
        assert f"wrote {folder}" in out
        card = json.loads((folder / "card.json").read_text())
        r = card["recipe"]
        assert (r["tokens"], r["model"]["id"], r["dataset"]["path"], r["d_dict"]) == (1536, str(toy_folder),
                                                                                      str(corpus), 64)
        assert r["preset"] == "marks2023"
        assert r["hook"]["module"] == f"gpt_neox.layers.{layer}.mlp"
        assert card["name"] == f"pythia70m/mlp{layer}/8192"
        assert card["d_in"] == 64
        assert "stats" not in card                                      # --eval-tokens 0 skipped the evaluation


def test_cli_trains_a_whole_recipe_file(tmp_path, corpus, toy_folder, monkeypatch, capsys):
    whole = SMALL + (f"preset: topk\nk: 8\ntokens: 1024\nmodel: {{id: {toy_folder}}}\ndataset: {{path: {corpus}}}\n"
                     "hook: {module: gpt_neox.layers.1, site: resid, layer: 1}\n")
    (tmp_path / "whole.yaml").write_text(whole)
    code, out, err = dictctl(monkeypatch, capsys, "train", "--recipe", str(tmp_path / "whole.yaml"),
                             "--out", str(tmp_path / "out"))
    assert code == 0, err
    card = json.loads((tmp_path / "out" / toy_folder.name / "resid1" / "64" / "card.json").read_text())
    assert card["architecture"] == "topk"
    assert card["k"] == 8
    assert card["stats"]["sensitivity"]["samples"] > 0                 # evaluated by default, sensitivity too


@pytest.mark.parametrize("yaml_text, field", [("learning_rate: 0.1\n", "learning_rate"),
                                              ("optimizer: {lrate: 0.1}\n", "optimizer.lrate"),
                                              ("prune_below: 0.99\n", "prune_below"),
                                              ("architecture: topk\n", "k")])
def test_cli_rejects_unknown_or_contradictory_fields(tmp_path, yaml_text, field, monkeypatch, capsys):
    (tmp_path / "bad.yaml").write_text(yaml_text)
    code, _, err = dictctl(monkeypatch, capsys, "train", "pythia70m/mlp0/8192", "--recipe", str(tmp_path / "bad.yaml"),
                           "--out", str(tmp_path / "out"))
    assert code == 1
    assert "invalid recipe" in err
    assert repr(field) in err
    assert not (tmp_path / "out").exists()


def test_cli_reports_a_missing_dataset_column(tmp_path, toy_folder, monkeypatch, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"body": d}) + "\n" for d in corpus_documents()[:50]))
    (tmp_path / "small.yaml").write_text(SMALL)
    code, _, err = dictctl(monkeypatch, capsys, "train", "pythia70m/mlp0/8192", "--model", str(toy_folder),
                           "--dataset", str(data), "--tokens", "1024", "--recipe", str(tmp_path / "small.yaml"),
                           "--out", str(tmp_path / "out"))
    assert code == 1
    assert "unknown dataset column" in err
    assert "'body'" in err


# ---- torch.distributed -----------------------------------------------------------------------------------
TORCHRUN_SCRIPT = '''
import hashlib, sys
from pathlib import Path
import torch
from dictionaries.recipe import Recipe
from training import run
from training.toymodel import build_model, build_tokenizer
from training.trainer import Trainer

recipe = Recipe.model_validate_json(Path(sys.argv[1]).read_text())
out = Path(sys.argv[2])
finish = Trainer.finish

def finish_and_record(self):  # every rank records what it ends with, so the test can compare ranks
    module = finish(self)
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in module.native_state().values())).hexdigest()
    (out / f"rank{torch.distributed.get_rank()}.sha256").write_text(digest)
    return module

Trainer.finish = finish_and_record
out.mkdir(parents=True, exist_ok=True)
run.train(recipe, out=out, model=build_model(), tokenizer=build_tokenizer(), progress=False, checkpoint_every=5)
'''


def _mse(folder, rows):
    from dictionaries.formats import read_folder

    d = read_folder(folder)
    with torch.no_grad():
        return float((d(rows).reconstruction - rows).pow(2).mean())


@pytest.mark.slow
def test_two_processes_under_torchrun_match_one(tmp_path, corpus, tiny_neox, tokenizer):
    import os
    import subprocess

    from training.data import TokenStream
    from training.harvest import Harvester

    recipe = run_recipe(corpus, tokens=128 * 30, resampling={"kind": "none"}, penalty={"coefficient": 1e-4},
                         optimizer={"lr": 3e-3, "warmup_steps": 2})
    (tmp_path / "recipe.json").write_text(recipe.model_dump_json())
    (tmp_path / "script.py").write_text(TORCHRUN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", str(tmp_path / "script.py"),
                           str(tmp_path / "recipe.json"), str(tmp_path / "two")], capture_output=True, text=True,
                          env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "two" / "rank0.sha256").read_text() == (tmp_path / "two" / "rank1.sha256").read_text()
    (two,) = [p.parent for p in (tmp_path / "two").rglob("card.json")]
    (one,) = train(recipe, tmp_path / "one", tiny_neox, tokenizer)

    # held-out activations: other contexts of the same text (another seed), at the recipe's hook
    contexts = TokenStream(recipe.dataset, tokenizer, context_length=32, seed=99).next_contexts(32)
    rows = Harvester(tiny_neox, [recipe.hook], bos_id=0, exclude_bos=True)(contexts)[0]
    initial = Trainer(recipe, 64, total_steps=1).module
    with torch.no_grad():
        mse_initial = float((initial(rows).reconstruction - rows).pow(2).mean())
    mse_one, mse_two = _mse(one, rows), _mse(two, rows)
    assert mse_one < 0.5 * mse_initial  # training did something the comparison can see
    assert abs(mse_two - mse_one) < 0.05 * mse_one, (mse_initial, mse_one, mse_two)


@pytest.mark.gpu
def test_cuda_run_matches_the_cpu_run(tmp_path, corpus, tokenizer):
    """The same recipe on a GPU reads the same batches; the weights agree with the CPU run to float tolerance."""
    from training.toymodel import build_model

    recipe = run_recipe(corpus, resampling={"kind": "none"})
    (cpu,) = train(recipe, tmp_path / "cpu", build_model(), tokenizer)
    (gpu,) = train(recipe, tmp_path / "gpu", build_model().to("cuda"), tokenizer, device="cuda")
    wc, wg = weights(cpu), weights(gpu)
    for key in wc:
        torch.testing.assert_close(wg[key], wc[key], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("every", [0, -1])  # 0 divided by zero mid-run; -1 never checkpointed
def test_checkpoint_every_below_one_is_refused_before_the_model_loads(tmp_path, corpus, every):
    with pytest.raises(InvalidArgumentError, match="checkpoint_every"):
        run_module.train(run_recipe(corpus), out=tmp_path, checkpoint_every=every)  # "toy-neox" is never loaded


def test_a_corrupt_checkpoint_is_refused_naming_it(tmp_path, corpus):
    (tmp_path / "checkpoint" / "step-5").mkdir(parents=True)
    (tmp_path / "checkpoint" / "latest").write_text("step-5")
    (tmp_path / "checkpoint" / "step-5" / "trainers.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(FormatError, match="cannot be read \\(trainers.pt.*without --resume") as info:
        run_module.train(run_recipe(corpus), out=tmp_path, resume=True)
    assert info.value.path == str(tmp_path / "checkpoint" / "step-5")


@pytest.mark.parametrize("name", ["bricken2023", "topk"])
def test_a_recipe_with_bf16_autocast_ends_within_tolerance_of_float32(tmp_path, corpus, tiny_neox, tokenizer, name):
    """The recipe's `autocast` reaches the trainers: held-out FVU and L0 within BF16_TOLERANCE, recorded in the card."""
    from dictionaries.formats import read_folder
    from training.trainer import BF16_TOLERANCE

    extra = {"k": 8} if name == "topk" else {"penalty": {"coefficient": 1e-4}}
    extra.update(resampling={"kind": "none"}, optimizer={"lr": 3e-3, "warmup_steps": 2})
    cards = {}
    for autocast in ("none", "bfloat16"):
        recipe = run_recipe(corpus, name=name, tokens=128 * 40, holdout_tokens=1024, autocast=autocast, **extra)
        (folder,) = train(recipe, tmp_path / autocast, tiny_neox, tokenizer, eval_tokens=1024)
        cards[autocast] = read_folder(folder).card
    fp32, bf16 = cards["none"].stats, cards["bfloat16"].stats
    assert cards["bfloat16"].recipe.autocast == "bfloat16" and fp32.fvu < 0.8      # and training did something
    assert bf16.fvu != fp32.fvu                                   # the bf16 forward did run
    assert abs(bf16.fvu - fp32.fvu) <= BF16_TOLERANCE["fvu"], (fp32.fvu, bf16.fvu)
    assert abs(bf16.l0 - fp32.l0) <= BF16_TOLERANCE["l0_relative"] * fp32.l0, (fp32.l0, bf16.l0)
