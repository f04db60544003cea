"""Bad input to the real `dictctl`: one clear line on stderr, exit code 1, never a traceback, never a success.

Every case runs the installed console script in its own process (what a user runs, not typer's test
runner) on one malformed input built by tests/fuzz_inputs.py: card fields of the wrong type, out of range,
unknown or naming a bad path; weights files empty, truncated, garbage, of the wrong names, shapes or dtype,
or not finite; registries that do not parse or validate; and bad arguments to every command. The cases run
two at a time in a module fixture, each is its own test id, and `test_tally` prints the counts.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from fuzz_inputs import CARD_EDITS, build_world

_BIN = Path(sys.executable).parent / "dictctl"
DICTCTL = str(_BIN) if _BIN.is_file() else shutil.which("dictctl")
TIMEOUT = 300  # a case that trains or evaluates before noticing its bad input is itself a finding


@dataclass(frozen=True)
class Case:
    id: str
    args: str  # a shell-like line; {w} is the world folder
    env: dict = field(default_factory=dict)
    gpu_free: bool = False  # meaningful only where no CUDA device exists


def reg(name: str) -> dict:
    return {"DICTIONARIES_REGISTRY": f"{{w}}/reg-{name}/registry.yaml"}


WEIGHTS = ["w-empty", "w-truncated", "w-garbage", "w-huge-header", "w-names", "w-shapes", "w-int32", "w-int32-card",
           "w-float16", "w-nan", "w-inf", "w-missing", "w-wrong-hash", "w-wrong-size", "c-d_in-huge",
           "c-dtype-float128", "c-files-absolute", "only-weights", "f-saelens", "f-sparsify", "f-dl-garbage",
           "f-dl-truncated", "f-dl-config-latin1"]
REGISTRIES = ["bad-yaml", "duplicate", "unknown-entry-field", "unknown-top-field", "missing-card", "branch-revision",
              "latin1", "card-latin1", "card-bad-yaml", "card-mismatch", "empty", "list", "version", "bad-name",
              "absolute-card", "dotdot-card", "location-kind", "no-entries"]
TRAIN = ("train pythia70m/mlp0/8192 --model {w}/model --dataset {w}/corpus.txt --recipe {w}/small.yaml "
         "--tokens 1536 --device cpu --out {w}/train/")
EVAL = "eval {w}/good64 --model {w}/model --dataset {w}/corpus.txt --tokens 256 --no-sensitivity --out {w}/evaluated/"
INSPECT = "inspect {w}/good64 --feature 0 --texts {w}/texts.txt --model {w}/model"
PUBLISH = "publish --repo org/toy --dry-run --staging-dir {w}/staged/"

CASES = [
    *[Case(f"card-{name}", f"compare {{w}}/c-{name} {{w}}/good") for name in CARD_EDITS],
    *[Case(f"convert-{name}", f"convert {{w}}/{name} {{w}}/out/{name}") for name in WEIGHTS],
    *[Case(f"publish-{name}", f"{PUBLISH}{name} {{w}}/{name}") for name in
      ("w-garbage", "w-nan", "w-inf", "w-int32", "w-int32-card", "w-wrong-hash", "c-dtype-float128", "f-saelens")],
    *[Case(f"registry-{name}", "list", reg(name)) for name in REGISTRIES],
    Case("registry-folder", "list", {"DICTIONARIES_REGISTRY": "{w}/reg-good"}),
    Case("registry-missing", "list", {"DICTIONARIES_REGISTRY": "{w}/nowhere/registry.yaml"}),
    Case("registry-show-latin1-card", "show toy/mlp0/16", reg("card-latin1")),
    # list, show, schema, compare
    Case("list-layer-type", "list --layer three"), Case("list-size-type", "list --size big"),
    Case("list-site", "list --site tail"), Case("list-architecture", "list --architecture lstm"),
    Case("list-extra-arg", "list mlp"), Case("list-unknown-option", "list --colour"),
    Case("show-missing-arg", "show"), Case("show-unknown", "show pythia70m/mlp9/8192"),
    Case("show-two-args", "show pythia70m/mlp3/8192 pythia70m/mlp2/8192"),
    Case("schema-extra-arg", "schema card"), Case("schema-unknown-option", "schema --json"),
    Case("compare-one-arg", "compare pythia70m/mlp3/8192"),
    Case("compare-unknown", "compare pythia70m/mlp3/8192 x/y/z"),
    Case("compare-no-card", "compare {w}/only-weights {w}/good"),
    Case("compare-file", "compare {w}/a-file {w}/good"),
    # download
    Case("download-missing-arg", "download"), Case("download-unknown", "download pythia70m/mlp9/8192"),
    Case("download-glob-none", "download 'pythia70m/zzz*/1'"), Case("download-folder", "download {w}/good"),
    Case("download-hub-path", "download hf://org/toy/sub"), Case("download-bad-hub-path", "download hf://org"),
    Case("download-unreachable", "download toy/mlp0/16", reg("good")),
    # convert
    Case("convert-missing-src", "convert {w}/nowhere {w}/out/x"),
    Case("convert-src-file", "convert {w}/a-file {w}/out/y"),
    Case("convert-dst-file", "convert {w}/good {w}/a-file"),
    Case("convert-format-unknown", "convert {w}/good {w}/out/z -f onnx"),
    Case("convert-format-wrong", "convert {w}/good {w}/out/v --format saelens"),
    Case("convert-missing-dst", "convert {w}/good"),
    # hook points given by hand (issue 11): refused before any model loads
    Case("eval-site-without-layer", EVAL + "h --site mlp_out"), Case("eval-hook-and-site", EVAL + "i --hook a.b "
                                                                          "--site mlp_out --layer 0"),
    Case("inspect-hook-io", INSPECT + " --hook gpt_neox.layers.0:sideways"),
    Case("inspect-site-unknown", INSPECT + " --site tail --layer 0"), Case("inspect-layer-negative", INSPECT +
                                                                             " --site mlp_out --layer -1"),
    Case("convert-hook-empty", "convert {w}/f-saelens {w}/out/hook --hook ''"),
    # inspect
    Case("inspect-top-negative", INSPECT + " --top -1"), Case("inspect-top-zero", INSPECT + " --top 0"),
    Case("inspect-context-negative", INSPECT + " --context -5"),
    Case("inspect-feature-negative", "inspect {w}/good64 --feature -1 --texts {w}/texts.txt --model {w}/model"),
    Case("inspect-feature-large", "inspect {w}/good64 --feature 999999 --texts {w}/texts.txt --model {w}/model"),
    Case("inspect-feature-type", "inspect {w}/good64 --feature x --texts {w}/texts.txt"),
    Case("inspect-feature-missing", "inspect {w}/good64 --texts {w}/texts.txt"),
    Case("inspect-texts-missing", "inspect {w}/good64 --feature 0 --texts {w}/nowhere.txt --model {w}/model"),
    Case("inspect-texts-empty", "inspect {w}/good64 --feature 0 --texts {w}/empty.txt --model {w}/model"),
    Case("inspect-texts-latin1", "inspect {w}/good64 --feature 0 --texts {w}/latin1.txt --model {w}/model"),
    Case("inspect-texts-folder", "inspect {w}/good64 --feature 0 --texts {w}/good --model {w}/model"),
    Case("inspect-model-missing", "inspect {w}/good64 --feature 0 --texts {w}/texts.txt --model {w}/nowhere"),
    Case("inspect-unknown", "inspect x/y/z --feature 0 --texts {w}/texts.txt"),
    Case("inspect-garbage-weights", "inspect {w}/w-garbage --feature 0 --texts {w}/texts.txt --model {w}/model"),
    Case("inspect-nan-weights", "inspect {w}/w-nan --feature 0 --texts {w}/texts.txt --model {w}/model"),
    *[Case(f"inspect-hub-{name}", f"inspect '{path}' --feature 0 --texts {{w}}/texts.txt") for name, path in
      (("dotdot", "hf://org/a..b"), ("long", "hf://org/" + "a" * 100), ("revision", "hf://org/toy@bad rev"),
       ("no-repo", "hf://org"))],
    # train
    Case("train-checkpoint-every-zero", TRAIN + "ce0 --checkpoint-every 0"),
    Case("train-checkpoint-every-negative", TRAIN + "ce-1 --checkpoint-every -1"),
    Case("train-device-nonsense", TRAIN + "dev --device nonsense"),
    Case("train-autocast-nonsense", TRAIN + "ac --autocast int8"),
    Case("train-device-cuda", TRAIN + "cuda --device cuda", gpu_free=True),
    Case("train-model-missing", TRAIN + "m --model {w}/nowhere"),
    Case("train-dataset-missing", TRAIN + "d --dataset {w}/nowhere.txt"),
    Case("train-recipe-missing", TRAIN + "r --recipe {w}/nowhere.yaml"),
    Case("train-recipe-bad-yaml", TRAIN + "r --recipe {w}/recipe-bad.yaml"),
    Case("train-recipe-list", TRAIN + "r --recipe {w}/recipe-list.yaml"),
    Case("train-recipe-latin1", TRAIN + "r --recipe {w}/recipe-latin1.yaml"),
    Case("train-recipe-unknown-field", TRAIN + "r --recipe {w}/recipe-unknown.yaml"),
    Case("train-recipe-folder", TRAIN + "r --recipe {w}/good"),
    Case("train-tokens-zero", TRAIN + "t --tokens 0"), Case("train-tokens-negative", TRAIN + "t --tokens -5"),
    Case("train-tokens-type", TRAIN + "t --tokens many"),
    Case("train-tokens-below-batch", TRAIN + "t --tokens 100"),
    Case("train-resume-corrupt", "train pythia70m/mlp0/8192 --model {w}/model --dataset {w}/corpus.txt "
                                 "--recipe {w}/small.yaml --tokens 1536 --device cpu --out {w}/corrupt-run --resume"),
    Case("train-nothing", "train"), Case("train-unknown", "train x/y/z"),
    Case("train-folder", "train {w}/good --tokens 10"),
    # eval
    Case("eval-device-nonsense", EVAL + "a --device nonsense"), Case("eval-tokens-zero", EVAL + "b --tokens 0"),
    Case("eval-tokens-negative", EVAL + "c --tokens -1"), Case("eval-batch-zero", EVAL + "d --batch-size 0"),
    Case("eval-context-zero", EVAL + "e --context-length 0"), Case("eval-batch-type", EVAL + "f --batch-size 1.5"),
    Case("eval-dataset-missing", EVAL + "g --dataset {w}/nowhere.txt"),
    Case("eval-model-missing", EVAL + "h --model {w}/nowhere"), Case("eval-unknown", "eval x/y/z"),
    Case("eval-garbage-weights", "eval {w}/w-garbage --model {w}/model --dataset {w}/corpus.txt --tokens 256"),
    Case("eval-missing-arg", "eval"), Case("eval-glob-none", "eval '{w}/nothing*'"),
    Case("eval-hub-path", "eval hf://org/a..b --model {w}/model --dataset {w}/corpus.txt"),
    # publish
    Case("publish-no-repo", "publish {w}/good --dry-run"),
    Case("publish-repo-bad", "publish {w}/good --repo bad --dry-run"),
    Case("publish-repo-deep", "publish {w}/good --repo a/b/c --dry-run"),
    Case("publish-subfolder", "publish {w}/good --repo org/toy --subfolder ../x --dry-run"),
    Case("publish-branch", "publish {w}/good --repo org/toy --branch 'a b' --dry-run"),
    Case("publish-missing-folder", "publish {w}/nowhere --repo org/toy --dry-run"),
    # mirror, demo, the command itself
    Case("mirror-no-repo", "mirror pythia70m/mlp0/8192"),
    Case("mirror-repo-bad", "mirror pythia70m/mlp0/8192 --repo x"),
    Case("mirror-unknown", "mirror x/y/z --repo org/toy"),
    Case("mirror-tokens-type", "mirror x/y/z --repo o/t --tokens x"),
    Case("demo-tokens-zero", "demo --workdir {w}/demo --tokens 0"),
    Case("demo-tokens-negative", "demo --workdir {w}/demo --tokens -1"),
    Case("demo-workdir-file", "demo --workdir {w}/a-file"), Case("demo-tokens-type", "demo --tokens lots"),
    Case("unknown-command", "frobnicate"), Case("unknown-option", "--frobnicate"), Case("command-typo", "lsit"),
]


def run_case(case: Case, world: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICTIONARIES_")}
    env.update(HF_HOME=str(world / "hf"), HF_HUB_CACHE=str(world / "hf" / "hub"), HF_HUB_OFFLINE="1",
               HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    env.update({k: v.format(w=world) for k, v in case.env.items()})
    args = shlex.split(case.args.format(w=world))
    try:
        return subprocess.run([DICTCTL, *args], capture_output=True, text=True, env=env, timeout=TIMEOUT,
                              cwd=world, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(args, -9, e.stdout or "", f"timed out after {TIMEOUT} s")


def wanted(case: Case) -> bool:
    return not (case.gpu_free and torch.cuda.is_available())  # there `--device cuda` is good input


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_neox, tokenizer) -> dict[str, subprocess.CompletedProcess]:
    """Every case's finished process, run two at a time (the cases are independent; two cores)."""
    assert DICTCTL, "the dictctl console script is not installed (pip install -e .)"
    world = tmp_path_factory.mktemp("fuzz")
    build_world(world, tiny_neox, tokenizer)
    cases = [c for c in CASES if wanted(c)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip([c.id for c in cases], pool.map(lambda c: run_case(c, world), cases)))


def verdict(res: subprocess.CompletedProcess) -> str:
    """'clear', or what is wrong: traceback, silent success, multi-line, internal error, exit code N."""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    if "Traceback" in res.stderr + res.stdout:
        return "traceback"
    if res.returncode == 0:
        return "silent success"
    if len(lines) != 1 or len(res.stderr.strip().splitlines()) != 1:
        return "multi-line"
    if lines[0].startswith("internal error"):
        return "internal error"
    if res.returncode != 1:
        return f"exit code {res.returncode}"
    return "clear"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_clear_line(case, results):
    if not wanted(case):
        pytest.skip("a CUDA device exists here, so the case is valid input")
    res = results[case.id]
    assert verdict(res) == "clear", f"{case.args}\nexit {res.returncode}\nstderr: {res.stderr[-3000:]}\n" \
                                    f"stdout: {res.stdout[-1000:]}"


def test_tally(results):
    """The counts (printed with -s); every case is a clear one-line error."""
    counts: dict[str, int] = {}
    for res in results.values():
        counts[verdict(res)] = counts.get(verdict(res), 0) + 1
    print(f"\nfuzz tally: {len(results)} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    assert len(CASES) >= 130
    assert len({c.id for c in CASES}) == len(CASES)
