"""dictionaries/cli_models.py: `dictctl train --autocast`, through the installed entry point in a subprocess.

The model-running commands' other options are tested beside what they drive (test_run.py, test_evaluate.py,
test_placement.py); here the precision options of `train`, which only set recipe fields.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from training.toymodel import corpus_documents

ROOT = Path(__file__).resolve().parents[1]
_BIN = Path(sys.executable).parent / "dictctl"
DICTCTL = str(_BIN) if _BIN.is_file() else shutil.which("dictctl")


def dictctl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed `dictctl ARGS`, importing this checkout's package (PYTHONPATH), one thread (shared CPUs)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([DICTCTL, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.skipif(DICTCTL is None, reason="the dictctl entry point is not installed")
def test_train_autocast_and_model_dtype_bf16_are_recorded_in_the_card(tmp_path, toy_folder):
    """`--autocast bf16 --model-dtype bf16`: the harvest and the dictionary's forward both in bf16, and the card's
    recipe says so (the dictionary itself stays float32)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(corpus_documents()[:40]))
    (tmp_path / "r.yaml").write_text(
        f"preset: topk\nk: 4\ntokens: 256\nbatch_size: 64\nbuffer_contexts: 4\nharvest_batch_size: 4\n"
        f"context_length: 16\nd_dict: 32\nholdout_tokens: 0\noptimizer: {{warmup_steps: 1}}\n"
        f"model: {{id: {toy_folder}}}\ndataset: {{path: {corpus}}}\n"
        "hook: {module: gpt_neox.layers.0.mlp, site: mlp, layer: 0}\n")
    r = dictctl("train", "--recipe", "r.yaml", "--out", "out", "--device", "cpu", "--eval-tokens", "0",
                "--autocast", "BF16", "--model-dtype", "bf16", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (card_file,) = (tmp_path / "out").rglob("card.json")
    card = json.loads(card_file.read_text())
    assert (card["recipe"]["autocast"], card["recipe"]["model_dtype"], card["dtype"]) == ("bfloat16", "bfloat16",
                                                                                          "float32")


@pytest.mark.skipif(DICTCTL is None, reason="the dictctl entry point is not installed")
def test_a_bad_autocast_is_one_line_before_anything_trains(tmp_path):
    r = dictctl("train", "pythia70m/mlp3/8192", "--autocast", "int8", "--out", "out", cwd=tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("bad argument: autocast 'int8'") and "bf16, fp16 or none" in r.stderr
    assert not (tmp_path / "out").exists()
