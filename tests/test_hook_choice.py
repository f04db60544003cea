"""Hook points for unknown models (issue 11, item 3): `--hook` / `--site --layer` on convert, eval and inspect,
and a SAELens hook name placed by the loaded model's architecture when the card's model is unknown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dictionaries.errors import HookPointError, InvalidArgumentError
from dictionaries.formats import read_folder
from dictionaries.hook_choice import card_hook, hook_spec, model_hook

from helpers import gpt2_model

ROOT = Path(__file__).resolve().parents[1]
_BIN = Path(sys.executable).parent / "dictctl"
D, F = 32, 16  # helpers.gpt2_model's width; dictionary size


def dictctl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The real console script (PYTHONPATH points it at this checkout)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    exe = [str(_BIN)] if _BIN.is_file() else [sys.executable, "-m", "dictionaries.cli"]
    return subprocess.run([*exe, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture
def here(monkeypatch, capsys):
    """`dictctl ARGS` through cli.main in this process, as a CompletedProcess: for what a command computes,
    without 10 s of importing torch and transformers' model code again per call; each test below still runs the
    console script once, and tests/test_cli_fuzz.py runs it for every command."""
    from helpers import dictctl as in_process

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        code, out, err = in_process(monkeypatch, capsys, *args)
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def saelens_folder(root: Path, model_name: str = "my-private-model", hook: str = "blocks.1.hook_resid_post") -> Path:
    """A SAELens 6 standard SAE folder whose model the package does not know."""
    torch.manual_seed(0)
    folder = root / "sae"
    folder.mkdir()
    state = {"W_enc": torch.randn(D, F) * 0.1, "b_enc": torch.zeros(F), "W_dec": torch.randn(F, D) * 0.1,
             "b_dec": torch.zeros(D)}
    save_file(state, str(folder / "sae_weights.safetensors"))
    cfg = {"d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none", "architecture": "standard",
           "metadata": {"model_name": model_name, "hook_name": hook, "sae_lens_version": "6.5.0"}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """A local GPT-2-family model folder (save_pretrained + tokenizer), a text file and an unknown-model SAE."""
    root = tmp_path_factory.mktemp("unknown")
    gpt2_model().save_pretrained(root / "gpt2-local")
    tokenizer.save_pretrained(root / "gpt2-local")
    (root / "texts.txt").write_text("\n".join(["The for statement is used to iterate over a sequence.",
                                               "Python objects are abstractions for data."] * 20))
    saelens_folder(root)
    return root


def test_hook_spec_checks_the_combination():
    assert hook_spec() is None
    assert hook_spec("transformer.h.1.mlp:input") == "transformer.h.1.mlp:input"
    assert hook_spec(site="mlp_out", layer=2) == ("mlp_out", 2)
    with pytest.raises(InvalidArgumentError, match="not both"):
        hook_spec("a.b", "mlp_out", 1)
    with pytest.raises(InvalidArgumentError, match="go together"):
        hook_spec(site="mlp_out")
    with pytest.raises(HookPointError, match="sites are"):
        hook_spec(site="mlp_outt", layer=1)
    with pytest.raises(HookPointError, match="MODULE_PATH:input"):
        hook_spec("transformer.h.1:sideways")


def test_card_hook_without_a_model(world, tmp_path):
    card = read_folder(saelens_folder(tmp_path)).card
    assert card.hook is None and card.model.id == "my-private-model"
    hp = card_hook(card, "transformer.h.1.mlp")
    assert (hp.module, hp.io, hp.site, hp.layer) == ("transformer.h.1.mlp", "output", "mlp", 1)
    hp = card_hook(card, "transformer.h.1:input")  # a block's input is the previous block's resid, as resid_pre
    assert (hp.module, hp.io, hp.site, hp.layer) == ("transformer.h.1", "input", "resid", 0)
    assert card_hook(card, "encoder.layer.0.attention.output.dense").site == "attn"
    with pytest.raises(HookPointError, match="no family"):  # a site needs the model's family
        card_hook(card, ("resid_post", 1))
    known = card.model_copy(update={"model": card.model.model_copy(update={"id": "gpt2"})})
    hp = card_hook(known, ("mlp_out", 0))
    assert (hp.module, hp.site, hp.layer) == ("transformer.h.0.mlp", "mlp", 0)


def test_model_hook_places_the_foreign_name_by_the_loaded_architecture(tmp_path):
    model = gpt2_model()
    card = read_folder(saelens_folder(tmp_path)).card
    hp = model_hook(model, card)  # blocks.1.hook_resid_post, found through config.model_type == "gpt2"
    assert (hp.module, hp.io, hp.site, hp.layer) == ("transformer.h.1", "output", "resid", 1)
    hp = model_hook(model, card, ("attn_z", 0))
    assert (hp.module, hp.io) == ("transformer.h.0.attn.c_proj", "input")
    with pytest.raises(HookPointError, match="transformer.h.1.mlp"):  # close names suggested
        model_hook(model, card, "transformer.h.1.mpl")
    (tmp_path / "odd").mkdir()
    odd = saelens_folder(tmp_path / "odd", hook="blocks.1.hook_something_else")
    with pytest.raises(HookPointError, match="--site SITE --layer L"):
        model_hook(model, read_folder(odd).card)


def test_cli_convert_records_the_hook(world, tmp_path, here):
    r = dictctl("convert", str(world / "sae"), str(tmp_path / "out"), "--hook", "transformer.h.1:output", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    hook = json.loads((tmp_path / "out" / "card.json").read_text())["hook"]
    assert hook == {"module": "transformer.h.1", "io": "output", "site": "resid", "layer": 1}
    r = here("convert", str(world / "sae"), str(tmp_path / "out2"), "--site", "resid_post", "--layer", "1",
                cwd=tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("unknown hook point:") and "--hook MODULE_PATH" in r.stderr
    r = here("convert", str(world / "sae"), str(tmp_path / "out3"), "--hook", "x:sideways", cwd=tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_eval_and_inspect_resolve_against_the_loaded_model(world, tmp_path, here):
    common = ["--model", str(world / "gpt2-local")]
    r = dictctl("eval", str(world / "sae"), *common, "--dataset", str(world / "texts.txt"), "--tokens", "256",
                "--context-length", "32", "--no-sensitivity", "--out", str(tmp_path / "ev"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    card = json.loads((tmp_path / "ev" / "sae" / "card.json").read_text())
    assert card["hook"]["module"] == "transformer.h.1" and card["stats"]["fvu"] is not None
    r = here("inspect", str(world / "sae"), "--feature", "3", "--texts", str(world / "texts.txt"), *common,
                "--site", "mlp_out", "--layer", "0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "feature 3" in r.stdout
    r = here("inspect", str(world / "sae"), "--feature", "3", "--texts", str(world / "texts.txt"), *common,
                "--hook", "transformer.h.9", cwd=tmp_path)
    last = r.stderr.strip().splitlines()[-1]  # after transformers' own loading bar
    assert r.returncode == 1 and last.startswith("unknown hook point:") and "transformer.h.1" in last, r.stderr


def test_cli_eval_of_an_encoder_without_lm_head(world, tmp_path, tokenizer, here):
    """A BERT-family encoder loaded as BertModel: reconstruction stats, the final hidden state's relative change
    (spliced, zero-ablated) standing in for the downstream effect, and no loss recovered."""
    _bert_folder(tmp_path / "bert-local", tokenizer)
    (tmp_path / "src").mkdir()
    sae = saelens_folder(tmp_path / "src", model_name="my-bert", hook="blocks.0.hook_resid_post")
    r = here("eval", str(sae), "--model", str(tmp_path / "bert-local"), "--dataset", str(world / "texts.txt"),
                "--tokens", "256", "--context-length", "32", "--out", str(tmp_path / "ev"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "loss recovered does not apply" in r.stdout
    card = json.loads((tmp_path / "ev" / "sae" / "card.json").read_text())
    assert card["hook"] == {"module": "encoder.layer.0", "io": "output", "site": "resid", "layer": 0}
    s = card["stats"]
    assert s.get("frac_loss_recovered") is None and s.get("ce_spliced") is None and s.get("kl") is None
    assert s["fvu"] > 0 and s["l0"] > 0 and 0 < s["hidden_change_spliced"] < 10 and s["hidden_change_zero"] > 0


def dictionary_learning_folder(root: Path, submodule: str, io: str = "out") -> Path:
    """A dictionary_learning AutoEncoder folder (ae.pt + config.json) whose `lm_name` the package does not know."""
    torch.manual_seed(0)
    folder = root / "dl"
    folder.mkdir()
    torch.save({"encoder.weight": torch.randn(F, D) * 0.1, "encoder.bias": torch.zeros(F),
                "decoder.weight": torch.randn(D, F) * 0.1, "bias": torch.zeros(D)}, folder / "ae.pt")
    trainer = {"dict_class": "AutoEncoder", "activation_dim": D, "dict_size": F, "lm_name": "my-private-model",
               "submodule_name": submodule, "layer": 1}
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"io": io}}))
    return folder


@pytest.mark.parametrize("submodule, io, module, want_io, site, layer", [
    ("mlp_out_layer0", "out", "transformer.h.0.mlp", "output", "mlp", 0),
    ("resid_post_layer1", "out", "transformer.h.1", "output", "resid", 1),
    ("attn_out_layer1", "out", "transformer.h.1.attn", "output", "attn", 1)])
def test_model_hook_places_a_dictionary_learning_name_by_the_loaded_architecture(tmp_path, submodule, io, module,
                                                                                  want_io, site, layer):
    card = read_folder(dictionary_learning_folder(tmp_path, submodule, io)).card
    assert card.hook is None and card.model.id == "my-private-model"  # unknown model: no family, no hook
    hp = model_hook(gpt2_model(), card)  # submodule_name placed through config.model_type == "gpt2"
    assert (hp.module, hp.io, hp.site, hp.layer) == (module, want_io, site, layer)


def test_model_hook_of_a_dictionary_learning_name_it_cannot_place(tmp_path):
    card = read_folder(dictionary_learning_folder(tmp_path, "decoder_block_7")).card
    with pytest.raises(HookPointError, match="--site SITE --layer L"):
        model_hook(gpt2_model(), card)


def test_cli_inspect_of_an_encoder_without_lm_head(world, tmp_path, tokenizer, here):
    """`dictctl inspect` on a BertModel: contexts and frequency, and in place of the logit lens a line saying the
    model has no unembedding."""
    _bert_folder(tmp_path / "bert-local", tokenizer)
    (tmp_path / "src").mkdir()
    sae = saelens_folder(tmp_path / "src", model_name="my-bert", hook="blocks.0.hook_resid_post")
    r = here("inspect", str(sae), "--feature", "3", "--texts", str(world / "texts.txt"), "--top", "3",
                "--model", str(tmp_path / "bert-local"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("sae feature 3: fires on") and "%" in lines[0], r.stdout
    assert len([line for line in lines if " pos " in line]) == 3  # the top contexts
    assert lines[-1] == "logit lens: none; the model (BertModel) has no unembedding (no LM head), so no logit lens"
    assert "promotes" not in r.stdout


def _bert_folder(folder: Path, tokenizer) -> Path:
    """A tiny random BERT encoder saved as a BertModel (no LM head) with the toy tokenizer."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=1024, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, pad_token_id=1, architectures=["BertModel"])
    BertModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
