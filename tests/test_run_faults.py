"""training/run.py under faults: weights that go non-finite, resuming with the changes training/resume.py
allows, and the curve file surviving a real kill -9.

Real components throughout (the tiny GPT-NeoX, the real Trainer, text from Python's docs). The kill -9 is a
real SIGKILL of a child process that trains; the NaN is either a learning rate beyond float32 or one
decoder row set to NaN by the update of a chosen step (after that step's loss was taken).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dictionaries.errors import NonFiniteLossError, RecipeMismatchError
from dictionaries.recipe import Recipe
from training import run as run_module
from training.presets import preset
from training.trainer import Trainer

from helpers import Killed, kill_at, weights

MLP0 = {"module": "gpt_neox.layers.0.mlp", "site": "mlp", "layer": 0}
NAME = "toy-neox/mlp0/96"


def make_recipe(corpus, *, optimizer=None, **fields) -> Recipe:
    base = dict(model={"id": "toy-neox"}, hook=MLP0, dataset={"path": str(corpus)}, context_length=32,
                tokens=128 * 12, batch_size=128, buffer_contexts=16, harvest_batch_size=8, d_dict=96,
                optimizer={"lr": 1e-3, "warmup_steps": 4, **(optimizer or {})})
    base.update(fields)
    return Recipe.model_validate(preset("bricken2023", **base))


def train(recipes, out, tiny_neox, tokenizer, **kw):
    kw = {"checkpoint_every": 5, "progress": False, "eval_tokens": 0, **kw}
    return run_module.train(recipes, out=out, model=tiny_neox, tokenizer=tokenizer, **kw)


# ---- finding 1: non-finite weights are never written ----------------------------------------------------
def test_a_learning_rate_beyond_float32_writes_nothing(tmp_path, corpus, tiny_neox, tokenizer):
    """One step at lr 1e39: the loss (taken before the update) is finite, the weights after it are not."""
    recipe = make_recipe(corpus, tokens=128, optimizer={"lr": 1e39, "warmup_steps": 0})
    with pytest.raises(NonFiniteLossError) as info:
        train(recipe, tmp_path, tiny_neox, tokenizer)
    assert info.value.what == "weights"
    assert info.value.checkpoint is None
    assert "weights are not finite" in str(info.value)
    assert not (tmp_path / NAME).exists()


def test_nan_weights_from_an_update_stop_at_the_last_good_checkpoint(tmp_path, corpus, tiny_neox, tokenizer,
                                                                     monkeypatch):
    """Step 10's update leaves a NaN decoder row; its checkpoint (every 5) must not be written with it."""
    real = Trainer._constrain_weights

    def constrain_then_break(self):
        real(self)
        if self.step_count == 9:  # inside step 10, after its loss and update
            self.module.W_dec.data[3] = float("nan")

    monkeypatch.setattr(Trainer, "_constrain_weights", constrain_then_break)
    with pytest.raises(NonFiniteLossError) as info:
        train(make_recipe(corpus), tmp_path, tiny_neox, tokenizer)
    err = info.value
    assert (tmp_path / "checkpoint" / "latest").read_text() == "step-5"
    saved = torch.load(tmp_path / "checkpoint" / "step-5" / "trainers.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved["trainers"][0]["module"].values())
    assert err.checkpoint == str(tmp_path / "checkpoint" / "step-5")
    assert err.step == 10
    assert err.what == "weights"
    assert not (tmp_path / NAME).exists()


# ---- finding 2: the changes a resume may make -----------------------------------------------------------
def test_resume_with_a_lower_lr_and_clipping_is_allowed_and_recorded(tmp_path, corpus, tiny_neox, tokenizer,
                                                                   monkeypatch):
    kill_at(monkeypatch, 7)
    with pytest.raises(Killed):
        train(make_recipe(corpus), tmp_path, tiny_neox, tokenizer)
    monkeypatch.undo()
    gentler = make_recipe(corpus, optimizer={"lr": 5e-4, "grad_clip": 1.0, "decay_fraction": 0.25})
    (folder,) = train(gentler, tmp_path, tiny_neox, tokenizer, resume=True)
    card = json.loads((folder / "card.json").read_text())
    assert Recipe.model_validate(card["recipe"]) == gentler
    (note,) = [n for n in card["provenance"]["notes"] if n.startswith("Resumed")]
    assert "at step 5 of 12" in note
    assert "optimizer.lr 0.001 -> 0.0005" in note
    assert "optimizer.grad_clip None -> 1.0" in note
    assert "optimizer.decay_fraction 0.0 -> 0.25" in note
    assert all(torch.isfinite(v).all() for v in weights(folder).values())


def test_resume_with_more_tokens_ends_as_the_longer_run(tmp_path, corpus, tiny_neox, tokenizer, monkeypatch):
    longer = make_recipe(corpus, tokens=128 * 24)
    (expected,) = train(longer, tmp_path / "whole", tiny_neox, tokenizer)
    kill_at(monkeypatch, 7)
    with pytest.raises(Killed):
        train(make_recipe(corpus), tmp_path / "cut", tiny_neox, tokenizer)
    monkeypatch.undo()
    (resumed,) = train(longer, tmp_path / "cut", tiny_neox, tokenizer, resume=True)
    wa, wb = weights(expected), weights(resumed)
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    notes = json.loads((resumed / "card.json").read_text())["provenance"]["notes"]
    assert any("tokens 1536 -> 3072" in n for n in notes)


@pytest.mark.parametrize("optimizer, fields, refused", [
    ({}, {"tokens": 128 * 24}, "tokens"),  # the checkpoint (step 8) is past the decay's start (step 6)
    ({}, {"tokens": 128 * 10}, "tokens"),  # a shorter run
    ({"warmup_steps": 2}, {}, "optimizer.warmup_steps"),
    ({"betas": (0.0, 0.999)}, {}, "optimizer.betas"),
])
def test_resume_refuses_what_changes_the_steps_already_trained(optimizer, fields, refused, tmp_path, corpus,
                                                               tiny_neox, tokenizer, monkeypatch):
    kill_at(monkeypatch, 10)
    with pytest.raises(Killed):
        train(make_recipe(corpus, optimizer={"decay_fraction": 0.5}), tmp_path, tiny_neox, tokenizer,
              checkpoint_every=4)
    monkeypatch.undo()
    other = make_recipe(corpus, optimizer={"decay_fraction": 0.5, **optimizer}, **fields)
    with pytest.raises(RecipeMismatchError) as info:
        train(other, tmp_path, tiny_neox, tokenizer, resume=True)
    assert [f for f, _, _ in info.value.differences] == [refused]
    assert (tmp_path / "checkpoint" / "latest").read_text() == "step-8"


# ---- finding 3: the curve file and kill -9 -------------------------------------------------------------
_CHILD = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from dictionaries.recipe import Recipe
from training import run
from training.presets import preset
from training.toymodel import build_model, build_tokenizer
from training.trainer import Trainer

recipe = Recipe.model_validate_json(sys.argv[1])
real, calls = Trainer.step, {"n": 0}

def step_or_kill(self, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == int(sys.argv[4]):
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill -9: no finally, no flush, no atexit
    return real(self, *args, **kwargs)

Trainer.step = step_or_kill
run.train(recipe, out=sys.argv[2], log_file=sys.argv[3], model=build_model(), tokenizer=build_tokenizer(),
          checkpoint_every=5, progress=False, eval_tokens=0)
"""


def test_the_curve_file_survives_kill_9_and_resume_appends(tmp_path, corpus, tiny_neox, tokenizer):
    recipe = make_recipe(corpus)
    log = tmp_path / "curve.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])}
    child = subprocess.run([sys.executable, "-c", _CHILD, recipe.model_dump_json(), str(tmp_path / "out"), str(log),
                            "11"], env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert (tmp_path / "out" / "checkpoint" / "latest").read_text() == "step-10"
    before = [json.loads(line)["step"] for line in log.read_text().splitlines()[:10]]
    assert before == list(range(1, 11))  # fsync'ed with the checkpoint, though the process never closed it
    train(recipe, tmp_path / "out", tiny_neox, tokenizer, resume=True, log_file=log)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(1, 13))
