"""Foreign readers: folders written exactly as dictionary_learning, SAELens and sparsify write them read into
modules whose outputs equal the original implementations' (tests/original_impls.py, float32, 1e-5)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import original_impls as original
import pytest
import torch
from safetensors.torch import save_file

from dictionaries.errors import FormatError, MissingFileError, ShapeMismatchError
from dictionaries.formats import read_folder

D, F, K = 12, 40, 4
X = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(1))


def rand(*shape, seed=[0], scale=0.5):  # noqa: B006 - a counter shared by the calls of one test session
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0])) * scale


def assert_matches_reference(module, reference):
    out = module(X)
    torch.testing.assert_close(out.reconstruction, reference[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.features, reference[1], rtol=1e-5, atol=1e-5)
    assert (reference[1] > 0).any()  # the comparison saw active features


# ---- dictionary_learning: ae.pt = torch.save(state_dict); config.json = {"trainer": ..., "buffer": ...} ------
def dl_state(cls: str) -> dict:
    linear = {"encoder.weight": rand(F, D), "encoder.bias": rand(F), "decoder.weight": rand(D, F)}
    native = {"W_enc": rand(D, F), "b_enc": rand(F), "W_dec": rand(F, D), "b_dec": rand(D)}
    k, threshold = torch.tensor(K, dtype=torch.int), torch.tensor(0.2)
    return {
        "AutoEncoder": {"bias": rand(D), **linear},
        "AutoEncoderNew": {**linear, "decoder.bias": rand(D)},
        "GatedAutoEncoder": {"decoder_bias": rand(D), "encoder.weight": rand(F, D), "r_mag": rand(F),
                             "gate_bias": rand(F), "mag_bias": rand(F), "decoder.weight": rand(D, F)},
        "JumpReluAutoEncoder": {**native, "threshold": rand(F).abs() * 0.3},
        "AutoEncoderTopK": {"k": k, "threshold": torch.tensor(-1.0), **linear, "b_dec": rand(D)},
        "BatchTopKSAE": {"k": k, "threshold": threshold, **linear, "b_dec": rand(D)},
        "MatryoshkaBatchTopKSAE": {"k": k, "threshold": threshold, "group_sizes": torch.tensor([10, 30]), **native},
    }[cls]


def write_dl(folder: Path, state: dict, trainer: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "ae.pt")
    if trainer is not None:
        buffer = {"d_submodule": D, "io": "out", "n_ctxs": 3000, "ctx_len": 128}
        (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": buffer}, indent=4))
    return folder


@pytest.mark.parametrize("cls", sorted(original.DICTIONARY_LEARNING))
def test_dictionary_learning_every_class(tmp_path, cls):
    state = dl_state(cls)
    trainer = {"dict_class": cls, "trainer_class": "SomeTrainer", "activation_dim": D, "dict_size": F, "lr": 1e-4,
               "layer": 3, "lm_name": "EleutherAI/pythia-70m-deduped", "submodule_name": "resid_post_layer_3",
               **({"k": K} if "k" in state else {})}
    module = read_folder(write_dl(tmp_path / "trainer_0", state, trainer))
    assert_matches_reference(module, original.DICTIONARY_LEARNING[cls](state, X))
    card = module.card
    assert card.files.format == "dictionary_learning"
    assert {f.path for f in card.files.items} == {"ae.pt", "config.json"}
    assert all(f.sha256 and f.size for f in card.files.items)
    assert card.model.id == "EleutherAI/pythia-70m-deduped"
    assert (card.hook.module, card.hook.site, card.hook.layer) == ("gpt_neox.layers.3", "resid", 3)
    assert card.provenance.original == str((tmp_path / "trainer_0").resolve())
    assert (card.d_in, card.d_dict) == (D, F)


@pytest.mark.parametrize("config", ["absent", "legacy"])
def test_dictionary_learning_legacy_pythia_folders(tmp_path, config):
    """The early pythia sets: config.json absent or in a pre-`trainer` layout; the class is inferred from the
    state dict, model and hook point from the folder path `<model>/<submodule>/<set>/`."""
    state = dl_state("AutoEncoder")
    folder = tmp_path / "pythia-70m-deduped" / "mlp_out_layer2" / "0_8192"
    write_dl(folder, state, None)
    if config == "legacy":
        (folder / "config.json").write_text(json.dumps({"dictionary": {"activation_dim": D, "dict_size": F},
                                                        "training": {"lr": 1e-3, "l1_penalty": 1e-3}}))
    module = read_folder(folder)
    assert_matches_reference(module, original.dl_autoencoder(state, X))
    assert module.card.architecture == "relu"
    assert module.card.pre_encoder_bias
    assert module.card.model.id == "EleutherAI/pythia-70m-deduped"
    assert module.card.hook.module == "gpt_neox.layers.2.mlp"
    assert module.card.hook.site == "mlp"
    assert any("inferred" in n for n in module.card.provenance.notes)


def test_dictionary_learning_unit_norm_decoder_is_left_alone(tmp_path):
    state = dl_state("AutoEncoder")
    state["decoder.weight"] = state["decoder.weight"] / state["decoder.weight"].norm(dim=0)
    module = read_folder(write_dl(tmp_path / "ae", state, None))
    torch.testing.assert_close(module.W_enc, state["encoder.weight"].T)  # no normalisation was needed
    assert_matches_reference(module, original.dl_autoencoder(state, X))


def test_dictionary_learning_topk_and_batchtopk_need_the_config_or_card(tmp_path):
    state = dl_state("BatchTopKSAE")
    folder = write_dl(tmp_path / "b", state, None)
    with pytest.raises(FormatError, match="several dictionary_learning classes"):
        read_folder(folder)


@pytest.mark.parametrize("problem", ["unknown class", "crosscoder", "wrong shape", "missing key", "config sizes",
                                     "k disagrees", "pickle", "no ae.pt", "in_to_out"])
def test_dictionary_learning_bad_input(tmp_path, problem):
    state, trainer = dl_state("AutoEncoder"), {"dict_class": "AutoEncoder", "activation_dim": D, "dict_size": F}
    if problem == "unknown class":
        trainer["dict_class"] = "AutoEncoderr"
    elif problem == "crosscoder":
        trainer["dict_class"] = "CrossCoder"
    elif problem == "wrong shape":
        state["encoder.bias"] = rand(F + 1)
    elif problem == "missing key":
        del state["bias"]
    elif problem == "config sizes":
        trainer["dict_size"] = F * 2
    elif problem == "k disagrees":
        state, trainer = dl_state("AutoEncoderTopK"), {"dict_class": "AutoEncoderTopK", "k": K + 1}
    folder = write_dl(tmp_path / "ae", state, trainer)
    if problem == "in_to_out":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "buffer": {**config["buffer"], "io": "in_to_out"}}))
    if problem == "pickle":
        (folder / "ae.pt").write_bytes(pickle.dumps({"weights": object()}))
    if problem == "no ae.pt":
        (folder / "ae.pt").unlink()
    expected = {"unknown class": (FormatError, "unknown dictionary_learning class 'AutoEncoderr'.*AutoEncoder"),
                "crosscoder": (FormatError, "CrossCoder.*several layers"),
                "wrong shape": (ShapeMismatchError, f"ae.pt: tensor 'encoder.bias': expected shape \\({F},\\), "
                                                    f"found \\({F + 1},\\)"),
                "missing key": (FormatError, "ae.pt.*missing \\['bias'\\]"),
                "config sizes": (ShapeMismatchError, f"'encoder.weight'.*\\({F * 2}, {D}\\), found \\({F}, {D}\\)"
                                                     ".*config.json"),
                "k disagrees": (FormatError, f"k={K + 1}.*k={K}"),
                "pickle": (FormatError, "weights_only=True"),
                "no ae.pt": (FormatError, "no supported dictionary format.*ae.pt"),
                "in_to_out": (FormatError, "in_to_out")}[problem]
    with pytest.raises(expected[0], match=expected[1]):
        read_folder(folder)
    if problem == "no ae.pt":
        with pytest.raises(MissingFileError, match="ae.pt"):
            read_folder(folder, format="dictionary_learning")


# ---- SAELens: sae_weights.safetensors + cfg.json (SAEConfig.to_dict(); pre-6.0 flat configs) -------------
def sl_folder(tmp_path: Path, arch: str, *, version6: bool = True, extra_cfg: dict | None = None,
              extra_state: dict | None = None, name: str = "sae") -> tuple[Path, dict, dict]:
    base = {"W_enc": rand(D, F), "W_dec": rand(F, D), "b_dec": rand(D)}
    state = {**base, **({"b_gate": rand(F), "b_mag": rand(F), "r_mag": rand(F)} if arch == "gated"
                        else {"b_enc": rand(F)})}
    if arch == "jumprelu":
        state["threshold"] = rand(F).abs() * 0.3
    if arch == "batchtopk":
        state["topk_threshold"] = torch.tensor(0.4)
    state.update(extra_state or {})
    meta = {"model_name": "gpt2-small", "hook_name": "blocks.2.hook_resid_post", "sae_lens_version": "6.5.0"}
    cfg = {"d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none", "architecture": arch,
           **({"k": K, "rescale_acts_by_decoder_norm": False} if arch in ("topk", "batchtopk") else {})}
    cfg = {**cfg, "metadata": meta} if version6 else {**cfg, **meta, "sae_lens_version": "4.0.0"}
    cfg.update(extra_cfg or {})
    folder = tmp_path / name
    folder.mkdir()
    save_file(state, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder, cfg, state


SAELENS_CASES = {
    "standard": ("standard", {}, {}),
    "standard, no b_dec on input": ("standard", {"apply_b_dec_to_input": False}, {}),
    "topk": ("topk", {}, {}),
    "topk, rescaled by decoder norm": ("topk", {"rescale_acts_by_decoder_norm": True}, {}),
    "jumprelu": ("jumprelu", {}, {}),
    "gated": ("gated", {}, {}),
    "batchtopk checkpoint": ("batchtopk", {}, {}),
    "batchtopk checkpoint, rescaled": ("batchtopk", {"rescale_acts_by_decoder_norm": True}, {}),
    "finetuning scaling factor (pre-6.0)": ("standard", {}, {"scaling_factor": torch.rand(F) + 0.5}),
}


@pytest.mark.parametrize("case", sorted(SAELENS_CASES))
def test_saelens(tmp_path, case):
    arch, extra_cfg, extra_state = SAELENS_CASES[case]
    folder, cfg, state = sl_folder(tmp_path, arch, extra_cfg=extra_cfg, extra_state=extra_state)
    module = read_folder(folder)
    assert_matches_reference(module, original.saelens(cfg, state, X))
    assert module.card.pre_encoder_bias == cfg["apply_b_dec_to_input"]
    assert module.card.model.id == "gpt2"
    assert module.card.hook.module == "transformer.h.2"
    assert module.card.files.format == "saelens"
    assert module.card.k == (K if "k" in cfg else None)


def test_saelens_pre_6_topk_config(tmp_path):
    folder, cfg, state = sl_folder(tmp_path, "standard", version6=False,
                                   extra_cfg={"activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
                                              "hook_point": "blocks.2.hook_mlp_out", "normalize_activations": False})
    del cfg["hook_name"]
    (folder / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "hook_name"}))
    module = read_folder(folder)
    assert module.card.architecture == "topk"
    assert module.card.k == K
    assert module.card.hook.module == "transformer.h.2.mlp"
    assert_matches_reference(module, original.saelens(cfg, state, X))


def test_saelens_activation_norm_scaling_folded(tmp_path):
    """A training checkpoint with expected_average_only_in and its activation_scaler.json: the SAE saw x * s."""
    folder, cfg, state = sl_folder(tmp_path, "topk", extra_cfg={"normalize_activations": "expected_average_only_in"})
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 2.5}))
    module = read_folder(folder)
    assert_matches_reference(module, original.saelens(cfg, state, X, scaling_factor=2.5))
    assert any("2.5" in n for n in module.card.provenance.notes)


@pytest.mark.parametrize("problem", ["abstopk", "transcoder", "layer_norm", "head index", "wrong shape",
                                     "no weights"])
def test_saelens_bad_input(tmp_path, problem):
    arch = problem if problem in ("abstopk", "transcoder") else "standard"
    extra = {"layer_norm": {"normalize_activations": "layer_norm"}, "head index": {"hook_head_index": 3}}
    folder, _, state = sl_folder(tmp_path, arch, extra_cfg=extra.get(problem))
    if problem == "wrong shape":
        save_file({**state, "W_dec": rand(F, D + 1)}, str(folder / "sae_weights.safetensors"))
    if problem == "no weights":
        (folder / "sae_weights.safetensors").unlink()
        with pytest.raises(MissingFileError, match="sae_weights.safetensors"):
            read_folder(folder, format="saelens")
        return
    match = {"abstopk": "abstopk.*sign", "transcoder": "transcoder", "layer_norm": "layer_norm",
             "head index": "one attention head",
             "wrong shape": f"sae_weights.safetensors: tensor 'W_dec': expected shape \\({F}, {D}\\), "
                            f"found \\({F}, {D + 1}\\)"}[problem]
    with pytest.raises((FormatError, ShapeMismatchError), match=match):
        read_folder(folder)


# ---- sparsify: <run>/<hookpoint>/{cfg.json, sae.safetensors} (SparseCoder.save_to_disk), <run>/config.json
def sp_folder(tmp_path: Path, extra_cfg: dict | None = None,
              hookpoint: str = "layers.1.mlp") -> tuple[Path, dict, dict]:
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": F, "k": K,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D, **(extra_cfg or {})}
    state = {"encoder.weight": rand(F, D), "encoder.bias": rand(F), "W_dec": rand(F, D), "b_dec": rand(D)}
    folder = tmp_path / "run" / hookpoint
    folder.mkdir(parents=True)
    save_file(state, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m", "batch_size": 8}))
    return folder, cfg, state


@pytest.mark.parametrize("hookpoint, module, site", [("layers.1.mlp", "gpt_neox.layers.1.mlp", "mlp"),
                                                     ("layers.1", "gpt_neox.layers.1", "resid"),
                                                     ("embed_in", "gpt_neox.embed_in", "embed")])
def test_sparsify(tmp_path, hookpoint, module, site):
    folder, cfg, state = sp_folder(tmp_path, hookpoint=hookpoint)
    read = read_folder(folder)
    assert_matches_reference(read, original.sparsify(cfg, state, X))
    assert (read.card.architecture, read.card.k, read.card.model.id) == ("topk", K, "EleutherAI/pythia-70m")
    assert (read.card.hook.module, read.card.hook.site) == (module, site)


@pytest.mark.parametrize("problem, match", [({"skip_connection": True}, "missing \\['W_skip'\\]"),
                                            ({"activation": "groupmax"}, "groupmax"),
                                            ({"signed": True}, "signed"),
                                            ({"num_latents": F + 8}, "'encoder.weight'.*found")])
def test_sparsify_bad_input(tmp_path, problem, match):
    folder, _, _ = sp_folder(tmp_path, extra_cfg=problem)
    with pytest.raises((FormatError, ShapeMismatchError), match=match):
        read_folder(folder)
