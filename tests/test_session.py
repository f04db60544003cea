"""training/session.py: what a session releases at the end of a run."""

from __future__ import annotations

from training import run as run_module
from training.trainer import Trainer

from helpers import run_recipe, train


def test_optimizer_state_and_trainers_are_released_at_the_end(tmp_path, corpus, tiny_neox, tokenizer, monkeypatch):
    """Adam's moments and the gradients are gone before finish() copies the weights (its copies and the
    evaluation reuse their memory), and the trainers once the modules are finished."""
    seen, sessions = {}, []
    finish, build = Trainer.finish, run_module.build_session

    def spied_finish(self):
        seen["moments"] = len(self.optimizer.state)
        seen["grads"] = sum(p.grad is not None for g in self.optimizer.param_groups for p in g["params"])
        return finish(self)

    monkeypatch.setattr(Trainer, "finish", spied_finish)
    monkeypatch.setattr(run_module, "build_session", lambda *a, **k: sessions.append(build(*a, **k)) or sessions[-1])
    train([run_recipe(corpus)], tmp_path / "out", tiny_neox, tokenizer)
    assert seen == {"moments": 0, "grads": 0}
    assert [job.trainer for job in sessions[0].jobs] == [None]
