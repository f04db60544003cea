"""Tests of the conformance benchmark's own plumbing (benchmarks/conformance.py, peer_steps.py, peers.py),
without any peer installed: weight layouts both ways, batches through files, the verdict, the peer venv lookup
and the child-process error path. The comparisons themselves run in `python -m benchmarks conformance`.
"""

from __future__ import annotations

import io
import sys

import pytest
import torch
from torch import nn

from benchmarks import conformance, peer_steps, peers
from benchmarks.conformance import Side, over_tolerance, verdict
from benchmarks.peer_steps import LAYOUTS, from_peer, load_into, read_batches, to_peer, write_batches

D, F = 3, 5
# the shape each peer gives its tensors (read from the peers' module definitions, as the layouts are)
PEER_SHAPES = {"encoder.weight": (F, D), "decoder.weight": (D, F), "W_enc": (D, F), "W_dec": (F, D),
               "encoder.bias": (F,), "bias": (D,), "b_dec": (D,), "b_enc": (F,), "gate_bias": (F,),
               "decoder_bias": (D,), "r_mag": (F,), "mag_bias": (F,), "threshold": (F,)}


def _native(names) -> dict[str, torch.Tensor]:
    shapes = {"W_enc": (D, F), "W_dec": (F, D), "b_enc": (F,), "b_dec": (D,), "threshold": (F,), "r_mag": (F,),
              "b_mag": (F,)}
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(shapes[n], generator=g, dtype=torch.float64) for n in names}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layouts_map_both_ways(layout):
    native = _native(LAYOUTS[layout])
    peer = to_peer(native, layout)
    assert {k: tuple(v.shape) for k, v in peer.items()} == {k: PEER_SHAPES[k] for k in peer}
    back = from_peer(peer, layout)
    assert all(torch.equal(back[k], native[k]) for k in native)
    assert all(torch.equal(to_peer(back, layout)[k], peer[k]) for k in peer)


def test_dictionary_learning_autoencoder_names():
    native = _native(("W_enc", "b_enc", "W_dec", "b_dec"))
    peer = to_peer(native, "dl_autoencoder")
    assert torch.equal(peer["bias"], native["b_dec"])          # the pre-encoder/decoder bias is `bias`
    assert torch.equal(peer["encoder.weight"], native["W_enc"].T)
    assert torch.equal(peer["decoder.weight"], native["W_dec"].T)


def test_load_into_keeps_the_parameter_objects():
    """The optimiser already holds the peer's parameters: values are copied in, objects kept."""
    module = nn.Module()
    module.encoder, module.decoder = nn.Linear(D, F), nn.Linear(F, D, bias=False)
    module.bias = nn.Parameter(torch.zeros(D))
    before = [id(p) for p in module.parameters()]
    native = _native(("W_enc", "b_enc", "W_dec", "b_dec"))
    load_into(module, native, "dl_autoencoder")
    assert [id(p) for p in module.parameters()] == before
    assert torch.allclose(module.encoder.weight.double(), native["W_enc"].T)
    assert torch.allclose(module.bias.double(), native["b_dec"])


def test_batches_are_written_and_read_back_identical(tmp_path):
    batches = conformance.make_batches(3, 16, D)
    write_batches(tmp_path, batches)
    again = read_batches(tmp_path)
    assert again.dtype == torch.float64
    assert torch.equal(again, batches)


def test_batches_are_deterministic_with_equal_total_variance():
    """Equal variance per batch makes sparsify's FVU the element-mean MSE."""
    batches = conformance.make_batches(3, 16, D)
    assert torch.equal(batches, conformance.make_batches(3, 16, D))
    variance = (batches - batches.mean(1, keepdim=True)).pow(2).sum((1, 2))
    assert torch.allclose(variance, torch.full((3,), 16.0 * D, dtype=torch.float64))


def test_make_init_starts_the_asked_features_dead():
    init = conformance.make_init("relu", D, F, dead=2)
    assert torch.allclose(init["W_dec"].norm(dim=-1), torch.ones(F, dtype=torch.float64))
    assert init["b_enc"][:2].tolist() == [-10.0, -10.0]
    small = conformance.make_init("jumprelu", D, F, dead=2, dead_by="small")
    assert torch.allclose(small["W_enc"][:, :2], 0.02 * small["W_dec"][:2].T)
    assert small["threshold"].shape == (F,)


def test_tolerance_is_relative_and_nan_counts_as_over():
    scale = {"W_enc": 1.0, "b_dec": 100.0, "loss": 1.0, "threshold": 1.0}
    assert over_tolerance({"W_enc": 5e-10, "b_dec": 5e-8}, scale) == []
    assert over_tolerance({"W_enc": 5e-8, "b_dec": float("nan")}, scale) == ["W_enc", "b_dec"]
    assert over_tolerance({"loss": 5e-7, "threshold": 5e-7}, scale, float32=("threshold",)) == []
    assert over_tolerance({"threshold": 5e-7}, scale) == ["threshold"]


def test_verdicts():
    assert verdict([], [], []) == "equal"
    assert verdict([], ["a", "b"], []) == "equal after: a; b"
    assert verdict(["W_enc"], ["a"], ["k"]) == "differs (W_enc): k"
    assert verdict(["loss"], ["a"], []) == "differs, unexplained (loss) after: a"
    assert "expected to differ by k" in verdict([], [], ["k"])


def test_every_phrase_of_a_verdict_is_explained():
    from benchmarks.bench_conformance import GLOSSARY, comparisons

    used = {p for c in comparisons() for p in (*c.aligned, *c.known, *filter(None, c.precision.split("; ")))}
    assert used - set(GLOSSARY) == set()
    assert set(GLOSSARY) - used == set()


def test_differences_per_tensor_and_loss():
    ours = Side({"W_enc": torch.zeros(2, 2), "b_dec": torch.zeros(2)}, [1.0, 2.0])
    peer = Side({"W_enc": torch.full((2, 2), 0.5), "threshold": torch.zeros(2)}, [1.0, 2.25, 9.0])
    assert conformance.differences(ours, peer) == {"W_enc": 0.5, "loss": 0.25}


def test_a_peer_that_is_not_installed_says_how(tmp_path, monkeypatch):
    monkeypatch.setenv(peers.VENVS_ENV, str(tmp_path))
    monkeypatch.delenv("SAELENS_PYTHON", raising=False)
    python, why = peers.python_for("saelens", build=False)
    assert python is None
    assert "python -m benchmarks.peers build saelens" in why
    monkeypatch.setenv("SAELENS_PYTHON", sys.executable)
    assert peers.python_for("saelens", build=False)[0] == sys.executable


def test_a_failed_peer_build_is_recorded_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(peers.VENVS_ENV, str(tmp_path))
    monkeypatch.delenv("SPARSIFY_PYTHON", raising=False)
    monkeypatch.setattr(peers, "_install", lambda peer, folder: "pip install x: no matching distribution")
    monkeypatch.setattr(peers.subprocess, "run", lambda *a, **k: None)   # the `rm -rf` of the old venv
    (tmp_path / "sparsify" / "bin").mkdir(parents=True)
    (tmp_path / "sparsify" / "bin" / "python").touch()
    assert peers.build_venv("sparsify", log=io.StringIO()) == "pip install x: no matching distribution"
    assert peers.python_for("sparsify", build=False) == (None, "not installed: pip install x: no matching distribution")


def _fake_interpreter(tmp_path, body: str) -> str:
    """A stand-in for a peer's python: a shell script run as `python peer_steps.py FOLDER...`."""
    path = tmp_path / "python"
    path.write_text("#!/bin/sh\nshift\n" + body)
    path.chmod(0o755)
    return str(path)


def test_each_job_folder_reports_its_own_failure(tmp_path):
    python = _fake_interpreter(tmp_path, 'for f in "$@"; do test -f "$f/job.json" && '
                                         'echo "KeyError: \'no-such-peer\'" > "$f/error.txt"; done\n')
    init, batches = conformance.make_init("relu", D, F), conformance.make_batches(1, 4, D)
    results = conformance.run_peer(python, [({"peer": "a"}, init, batches), ({"peer": "b"}, init, batches)])
    assert results == ["KeyError: 'no-such-peer'"] * 2


def test_a_crashed_child_gives_its_last_error_line(tmp_path):
    python = _fake_interpreter(tmp_path, 'echo "Traceback ..." >&2; echo "ImportError: no sparsify" >&2; exit 1\n')
    init, batches = conformance.make_init("relu", D, F), conformance.make_batches(1, 4, D)
    assert conformance.run_peer(python, [({"peer": "x"}, init, batches)]) == ["ImportError: no sparsify"]


def test_peer_steps_imports_no_peer_at_module_level():
    names = {line.split()[1] for line in open(peer_steps.__file__) if line.startswith(("import ", "from "))}
    assert names <= {"__future__", "json", "sys", "pathlib", "torch", "safetensors.torch"}
