"""Peers' transcoders read into native ones: SAELens' transcoder, skip_transcoder, jumprelu_transcoder and
jumprelu_skip_transcoder folders, and sparsify's `transcode` / `skip_connection` sparse coders, written in the
layout those libraries save (learned from SAELens 6.54 and sparsify's own save code) and checked against a
reference forward written from their source (tests/original_impls.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import original_impls as original
import pytest
import torch
from safetensors.torch import save_file

from dictionaries.errors import FormatError
from dictionaries.formats import convert, read_folder, summarize

D, D_OUT, F, K = 12, 20, 40, 4
X = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(5))


def rand(*shape, seed=[100], scale=0.5):  # noqa: B006 - a counter shared by the calls of one session
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0])) * scale


def check(module, reference, x=X):
    out = module(x)
    torch.testing.assert_close(out.reconstruction, reference[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.features, reference[1], rtol=1e-5, atol=1e-5)
    assert (reference[1] > 0).any()


# ---- SAELens: cfg.json (metadata holds hook_name, hook_name_out) + sae_weights.safetensors ---------------
def sl_transcoder(tmp_path: Path, arch: str, **metadata) -> tuple[Path, dict, dict]:
    state = {"W_enc": rand(D, F), "b_enc": rand(F), "W_dec": rand(F, D_OUT), "b_dec": rand(D_OUT)}
    if "skip" in arch:
        state["W_skip"] = rand(D_OUT, D)
    if arch.startswith("jumprelu"):
        state["threshold"] = rand(F).abs() * 0.2
    meta = {"hook_name": "blocks.2.ln2.hook_normalized", "hook_name_out": "blocks.2.hook_mlp_out",
            "model_name": "gpt2", **metadata}
    cfg = {"d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
           "normalize_activations": "none", "reshape_activations": "none", "metadata": meta, "d_out": D_OUT,
           "architecture": arch}
    folder = tmp_path / arch
    folder.mkdir()
    save_file(state, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder, cfg, state


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"])
def test_saelens_transcoders(tmp_path, arch):
    folder, cfg, state = sl_transcoder(tmp_path, arch)
    read = read_folder(folder)
    check(read, original.saelens_transcoder(cfg, state, X))
    card = read.card
    assert (card.architecture, card.d_in, card.d_out, card.skip) == (
        "jumprelu" if arch.startswith("jumprelu") else "relu", D, D_OUT, "skip" in arch)
    assert (card.hook.module, card.hook.io) == ("transformer.h.2.mlp", "input")            # mlp_in of GPT-2
    assert (card.output_hook.module, card.output_hook.io) == ("transformer.h.2.mlp", "output")
    assert card.pre_encoder_bias is False
    native = convert(folder, tmp_path / "native")                  # and on to a native folder, unchanged
    assert f"-> transformer.h.2.mlp (output), {'skip-' if 'skip' in arch else ''}transcoder, d_out={D_OUT}" \
        in summarize(native)                                       # what `dictctl convert` prints
    check(read_folder(tmp_path / "native"), original.saelens_transcoder(cfg, state, X))
    assert native.output_hook == card.output_hook


@pytest.mark.parametrize("problem, match", [({"apply_b_dec_to_input": True}, "apply_b_dec_to_input"),
                                            ({"model_name": "mystery-model"}, "no known module path"),
                                            ({"d_out": D_OUT + 1}, "'W_dec'.*found")])
def test_saelens_transcoder_bad_input(tmp_path, problem, match):
    folder, cfg, _ = sl_transcoder(tmp_path, "skip_transcoder")
    meta = {k: v for k, v in problem.items() if k in ("hook_name_out", "model_name")}
    top = {k: v for k, v in problem.items() if k not in meta}
    (folder / "cfg.json").write_text(json.dumps({**cfg, **top, "metadata": {**cfg["metadata"], **meta}}))
    with pytest.raises(Exception, match=match) as e:
        read_folder(folder)
    assert isinstance(e.value, (FormatError, ValueError))


def test_without_hook_name_out_the_prediction_is_written_where_it_reads_as_in_saelens(tmp_path):
    folder, cfg, state = sl_transcoder(tmp_path, "transcoder", hook_name_out=None)
    read = read_folder(folder)
    check(read, original.saelens_transcoder(cfg, state, X))
    assert read.card.output_hook == read.card.hook                 # SAELens splices at hook_name_out or hook_name
    assert any("hook_name_out" in n for n in read.card.provenance.notes)


def test_dictctl_convert_says_what_is_wrong_in_one_line(tmp_path):
    folder, cfg, _ = sl_transcoder(tmp_path, "transcoder")
    (folder / "cfg.json").write_text(json.dumps({**cfg, "apply_b_dec_to_input": True}))
    run = subprocess.run([sys.executable, "-m", "dictionaries.cli", "convert", str(folder), str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert run.returncode == 1
    lines = [line for line in run.stderr.splitlines() + run.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and "apply_b_dec_to_input" in lines[0], lines


# ---- sparsify: <run>/<hookpoint>/{cfg.json, sae.safetensors}, W_skip [d_in, d_in] ------------------------
def sp_folder(tmp_path: Path, **extra) -> tuple[Path, dict, dict]:
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": False, "num_latents": F, "k": K,
           "multi_topk": False, "skip_connection": True, "transcode": True, "d_in": D, **extra}
    state = {"encoder.weight": rand(F, D), "encoder.bias": rand(F), "W_dec": rand(F, D), "b_dec": rand(D)}
    if cfg["skip_connection"]:
        state["W_skip"] = rand(D, D)
    folder = tmp_path / "run" / "layers.1.mlp"
    folder.mkdir(parents=True)
    save_file(state, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m"}))
    return folder, cfg, state


@pytest.mark.parametrize(("transcode", "skip"), [(True, True), (True, False), (False, True)])
def test_sparsify_transcoders_and_skip_connections(tmp_path, transcode, skip):
    folder, cfg, state = sp_folder(tmp_path, transcode=transcode, skip_connection=skip)
    read = read_folder(folder)
    check(read, original.sparsify(cfg, state, X))
    card = read.card
    assert card.skip is skip and card.pre_encoder_bias is not transcode
    assert (card.hook.module, card.hook.io) == ("gpt_neox.layers.1.mlp", "input" if transcode else "output")
    if transcode:
        assert (card.output_hook.module, card.output_hook.io) == ("gpt_neox.layers.1.mlp", "output")
    else:
        assert card.output_hook is None


def test_a_sparsify_transcoder_of_an_unknown_model_is_refused(tmp_path):
    folder, _, _ = sp_folder(tmp_path)
    (folder.parent / "config.json").write_text(json.dumps({"model": "someone/unknown"}))
    with pytest.raises(FormatError, match="cannot be placed"):
        read_folder(folder)
