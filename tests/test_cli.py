"""The `dictctl` browsing commands: output, exit codes, one-line errors, and no torch import for `list`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dictionaries.registry import load_registry


def dictctl(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dictionaries.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_list_shows_every_entry_without_importing_torch():
    code = ("import sys, runpy; sys.argv=['dictctl','list']; "
            "import dictionaries.cli as c\n"
            "try: c.main()\nexcept SystemExit: pass\n"
            "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.strip().endswith("NO_TORCH")
    for name in load_registry().entries:
        assert name in out
    assert f"{len(load_registry().entries)} entries" in out


def test_list_filters():
    out = dictctl("list", "--site", "mlp", "--size", "8192").stdout
    assert "6 entries" in out
    assert "pythia70m/mlp5/8192" in out
    assert "32768" not in out


def test_show_json_is_the_card():
    res = dictctl("show", "pythia70m/mlp3/8192", "--json")
    assert res.returncode == 0
    data = json.loads(res.stdout)
    assert data["name"] == "pythia70m/mlp3/8192"
    assert data["stats"]["l0"] == 175.303
    assert data["location"]["kind"] == "url"


def test_schema_prints_json_schema():
    data = json.loads(dictctl("schema").stdout)
    assert data["title"] == "Card"
    assert "recipe" in data["properties"]


@pytest.mark.parametrize("args,words", [
    (("show", "pythia70m/mlp3/8129"), "Did you mean: pythia70m/mlp3/8192"),
    (("show", "nothing"), "no dictionary named 'nothing'"),
])
def test_errors_are_one_line_with_exit_code_1(args, words):
    res = dictctl(*args)
    assert res.returncode == 1
    assert words in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_debug_env_shows_traceback():
    res = dictctl("show", "nothing", env={"DICTIONARIES_DEBUG": "1"})
    assert res.returncode != 0
    assert "Traceback" in res.stderr


def test_bad_registry_env_is_a_clear_error(tmp_path):
    res = dictctl("list", env={"DICTIONARIES_REGISTRY": str(tmp_path / "none.yaml")})
    assert res.returncode == 1
    assert "DICTIONARIES_REGISTRY" in res.stderr
