"""Writers: native -> SAELens / sparsify / dictionary_learning -> read back gives the same features and
reconstructions for every architecture the library can hold (with and without pre-encoder bias); the others
are a FormatError saying why. `dictctl convert --to` runs for real in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dictionaries.architectures import build_dictionary
from dictionaries.errors import FormatError, InvalidArgumentError
from dictionaries.foreign_writers import layout_files
from dictionaries.formats import convert, detect_format, read_folder, write_native

from helpers import dictctl, make_card

KINDS = ("relu", "topk", "batchtopk", "jumprelu", "gated")
CAN_HOLD = {"saelens": KINDS, "dictionary_learning": KINDS, "sparsify": ("topk",)}
X = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(7))


def native_folder(folder, kind: str, pre_encoder_bias: bool = True):
    """A native folder with seeded weights whose thresholds cut some features and keep others."""
    card = make_card(kind).model_copy(update={"pre_encoder_bias": pre_encoder_bias})
    d = build_dictionary(card)
    g = torch.Generator().manual_seed(11)
    d.load_native_state({k: torch.randn(v.shape, generator=g) * 0.4 for k, v in d.native_state().items()})
    if kind in ("jumprelu", "batchtopk"):
        with torch.no_grad():
            d.threshold.copy_(d.threshold.abs() * 0.5)
    write_native(d, folder, card=card)
    return d


@pytest.mark.parametrize("to", sorted(CAN_HOLD))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pre_encoder_bias", [True, False])
def test_round_trip_gives_the_same_outputs(tmp_path, to, kind, pre_encoder_bias):
    original = native_folder(tmp_path / "native", kind, pre_encoder_bias)
    if kind not in CAN_HOLD[to]:
        with pytest.raises(FormatError, match="selects its features another way"):
            convert(tmp_path / "native", tmp_path / to, to=to)
        assert not (tmp_path / to).exists()
        return
    card = convert(tmp_path / "native", tmp_path / to, to=to)
    assert detect_format(tmp_path / to) == to == card.files.format
    assert all(f.sha256 for f in card.files.items)
    back = read_folder(tmp_path / to)
    want, got = original(X), back(X)
    assert (want.features > 0).any() and (want.features == 0).any()
    torch.testing.assert_close(got.features, want.features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.reconstruction, want.reconstruction, rtol=1e-5, atol=1e-5)
    if to != "sparsify":  # sparsify keeps the model in its run's config.json, outside the folder
        assert (back.card.model.id, back.card.hook.module) == ("toy-org/tiny-neox", "gpt_neox.layers.0.mlp")


def test_saelens_config_carries_what_saelens_and_neuronpedia_read(tmp_path):
    d = native_folder(tmp_path / "n", "topk")
    d.card = d.card.model_copy(update={"links": d.card.links.model_copy(update={"neuronpedia": "toy/0-mlp"})})
    cfg = json.loads(layout_files(d, "saelens", d.card)["cfg.json"])
    assert (cfg["architecture"], cfg["k"], cfg["d_in"], cfg["d_sae"], cfg["apply_b_dec_to_input"]) == (
        "topk", 4, 8, 16, True)
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_mlp_out"
    assert (cfg["metadata"]["model_name"], cfg["metadata"]["neuronpedia_id"]) == ("toy-org/tiny-neox", "toy/0-mlp")


def test_convert_rejects_an_unknown_layout_before_reading(tmp_path):
    with pytest.raises(InvalidArgumentError, match="native, saelens, sparsify, dictionary_learning"):
        convert(tmp_path / "nowhere", tmp_path / "out", to="parquet")


def test_dictctl_convert_to_saelens_and_back(tmp_path, monkeypatch, capsys):
    native_folder(tmp_path / "native", "jumprelu")
    code, out, err = dictctl(monkeypatch, capsys, "convert", str(tmp_path / "native"), str(tmp_path / "sl"),
                             "--to", "saelens")
    assert code == 0, err
    assert "cfg.json" in out and "sae_weights.safetensors" in out
    code, out, err = dictctl(monkeypatch, capsys, "convert", str(tmp_path / "native"), str(tmp_path / "sp"),
                             "--to", "sparsify")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "sparsify holds TopK sparse coders only" in err


def test_real_dictctl_refuses_an_unknown_layout_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "dictionaries.cli", "convert", str(tmp_path), str(tmp_path / "o"),
                           "--to", "parquet"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert "native, saelens, sparsify, dictionary_learning" in done.stderr


@pytest.mark.parametrize("to", ["saelens", "sparsify", "dictionary_learning"])
def test_a_transcoder_is_refused_rather_than_written_as_an_sae(to):
    from helpers import make_transcoder

    d = make_transcoder(8, 8, 16, "gpt_neox.layers.0.mlp:input", "gpt_neox.layers.0.mlp", kind="topk", skip=True)
    with pytest.raises(FormatError, match="transcoder"):
        layout_files(d, to, d.card)
