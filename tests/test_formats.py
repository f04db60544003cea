"""Native folders (write -> read round trips for every kind), format detection, cards given for folders,
every registry entry read from a folder faked in its declared format, and `dictctl convert`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dictionaries.architectures import ARCHITECTURES
from dictionaries.card import Card, Files, read_card
from dictionaries.errors import (
    ArchitectureMismatchError,
    CardFilesMismatchError,
    FormatError,
    InvalidArgumentError,
    MissingFileError,
    NonFiniteWeightsError,
    ShapeMismatchError,
)
from dictionaries.files import check_weight_values, sha256_of
from dictionaries.formats import convert, detect_format, file_entry, read_folder, write_native
from dictionaries.recipe import HookPoint, ModelRef
from dictionaries.registry import load_registry

D, F, K = 10, 24, 3
REGISTRY = load_registry()


def card_for(kind: str, **kw) -> Card:
    return Card(name=f"toy/mlp1/{F}", architecture=kind, d_in=D, d_dict=F,
                k=K if kind in ("topk", "batchtopk") else None, model=ModelRef(id="toy/neox"),
                hook=HookPoint(module="gpt_neox.layers.1.mlp", site="mlp", layer=1), files=Files(items=[]), **kw)


def random_module(kind: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    module = ARCHITECTURES[kind](D, F, card=card_for(kind), **({"k": K} if kind in ("topk", "batchtopk") else {}), **kw)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p).abs() * 0.2 if name == "threshold" else torch.randn_like(p))
    return module


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_native_round_trip(tmp_path, kind):
    module = random_module(kind)
    written = write_native(module, tmp_path / "d")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["card.json", "weights.safetensors"]
    assert read_card(tmp_path / "d" / "card.json") == written
    [entry] = written.files.items
    weights = tmp_path / "d" / entry.path
    assert (entry.path, entry.size, entry.sha256) == ("weights.safetensors", weights.stat().st_size, sha256_of(weights))
    assert written.files.format == "native"
    assert written.architecture == kind
    assert written.dtype == "float32"
    assert set(load_file(tmp_path / "d" / "weights.safetensors")) == set(dict(module.named_parameters()))
    back = read_folder(tmp_path / "d")
    assert back.card == written
    assert type(back) is type(module)
    for name, p in module.named_parameters():
        assert torch.equal(p, getattr(back, name)), name
    x = torch.randn(2, 5, D)
    assert torch.equal(back(x).features, module(x).features)
    assert torch.equal(back(x).reconstruction, module(x).reconstruction)


def test_native_read_moves_dtype_and_device(tmp_path):
    write_native(random_module("gated"), tmp_path / "d")
    module = read_folder(tmp_path / "d", dtype=torch.float64)
    assert module.W_enc.dtype == torch.float64
    assert module.b_mag.dtype == torch.float64
    assert read_folder(tmp_path / "d", dtype="bfloat16", device="cpu").r_mag.dtype == torch.bfloat16
    on_meta = read_folder(tmp_path / "d", device="meta")
    assert on_meta.W_dec.device.type == "meta"


def test_write_native_without_any_card(tmp_path):
    module = ARCHITECTURES["relu"](D, F, pre_encoder_bias=False)
    card = write_native(module, tmp_path / "bare")
    described = (card.name, card.architecture, card.d_in, card.d_dict, card.pre_encoder_bias)
    assert described == ("bare", "relu", D, F, False)
    assert read_folder(tmp_path / "bare").card == card


def test_write_native_refuses_a_card_of_another_dictionary(tmp_path):
    with pytest.raises(ArchitectureMismatchError, match="architecture='relu'.*architecture='topk'"):
        write_native(random_module("topk"), tmp_path / "d", card=card_for("relu"))
    wide = card_for("relu").model_copy(update={"d_dict": 2 * F})
    with pytest.raises(ShapeMismatchError, match=f"\\({D}, {2 * F}\\).*\\({D}, {F}\\)"):
        write_native(random_module("relu"), tmp_path / "d", card=wide)


@pytest.mark.parametrize("files, fmt", [(["card.json", "weights.safetensors"], "native"),
                                        (["cfg.json", "sae_weights.safetensors"], "saelens"),
                                        (["cfg.json", "sae.safetensors"], "sparsify"),
                                        (["ae.pt", "config.json"], "dictionary_learning"),
                                        (["ae.pt"], "dictionary_learning")])
def test_detect_format(tmp_path, files, fmt):
    for name in files:
        (tmp_path / name).write_bytes(b"x")
    assert detect_format(tmp_path) == fmt


def test_detect_format_lists_what_it_looked_for(tmp_path):
    (tmp_path / "cfg.json").write_text("{}")
    with pytest.raises(FormatError) as info:
        detect_format(tmp_path)
    message = str(info.value)
    for name in ("card.json", "weights.safetensors", "sae_weights.safetensors", "sae.safetensors", "ae.pt"):
        assert name in message
    assert "holds: cfg.json" in message
    with pytest.raises(MissingFileError, match="nowhere"):
        detect_format(tmp_path / "nowhere")


def test_native_missing_weights_and_unknown_format(tmp_path):
    write_native(random_module("relu"), tmp_path / "d")
    (tmp_path / "d" / "weights.safetensors").unlink()
    with pytest.raises(MissingFileError, match="weights.safetensors"):
        read_folder(tmp_path / "d", format="native")
    with pytest.raises(FormatError, match="unknown format 'onnx'.*native, dictionary_learning, saelens, sparsify"):
        read_folder(tmp_path / "d", format="onnx")


def test_given_card_must_match_the_files(tmp_path):
    write_native(random_module("jumprelu"), tmp_path / "d")
    with pytest.raises(ArchitectureMismatchError) as info:
        read_folder(tmp_path / "d", card=card_for("relu"))
    assert (info.value.field, info.value.card_value, info.value.found) == ("architecture", "relu", "jumprelu")
    assert isinstance(info.value, ValueError)
    other = card_for("jumprelu").model_copy(update={"d_in": D + 2})
    with pytest.raises(ShapeMismatchError) as shape:
        read_folder(tmp_path / "d", card=other)
    assert shape.value.expected == (D + 2, F)
    assert shape.value.found == (D, F)
    renamed = card_for("jumprelu").model_copy(update={"name": "toy/mlp1/24-renamed"})
    assert read_folder(tmp_path / "d", card=renamed).card is renamed


def _replace_weights(folder, state: dict, **card_changes) -> None:
    """New weights in a native folder, its card hashing them (so only what the test breaks is wrong)."""
    from safetensors.torch import save_file

    save_file(state, str(folder / "weights.safetensors"))
    card = json.loads((folder / "card.json").read_text())
    card["files"]["items"] = [file_entry(folder / "weights.safetensors", folder).model_dump(exclude_none=True)]
    card.update(card_changes)
    (folder / "card.json").write_text(json.dumps(card))


@pytest.mark.parametrize("edit, what", [
    (lambda item, card: item.update(sha256="0" * 64), "sha256"),
    (lambda item, card: item.update(size=item["size"] + 1), "size"),
    (lambda item, card: card.update(dtype="float16"), "the dtype of"),
])
def test_a_native_folder_is_held_to_its_own_card(tmp_path, edit, what):
    """convert and load_dictionary refuse a folder whose card.json does not describe its weights."""
    write_native(random_module("relu"), tmp_path / "d")
    card = json.loads((tmp_path / "d" / "card.json").read_text())
    edit(card["files"]["items"][0], card)
    (tmp_path / "d" / "card.json").write_text(json.dumps(card))
    with pytest.raises(CardFilesMismatchError) as info:
        convert(tmp_path / "d", tmp_path / "out")
    assert info.value.what.startswith(what)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_when_read_and_written(tmp_path, value):
    module = random_module("relu")
    state = {k: v.clone() for k, v in module.native_state().items()}
    state["W_dec"][3, 1] = value
    write_native(module, tmp_path / "d")
    _replace_weights(tmp_path / "d", state)
    with pytest.raises(NonFiniteWeightsError) as info:
        read_folder(tmp_path / "d")
    assert info.value.tensors == {"W_dec": 1}
    with torch.no_grad():
        module.W_dec[3, 1] = value
    with pytest.raises(NonFiniteWeightsError):
        write_native(module, tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_integer_weights_are_refused_with_the_tensor_named(tmp_path):
    module = random_module("relu")
    ints = {k: v.to(torch.int32) for k, v in module.native_state().items()}
    write_native(module, tmp_path / "d")
    _replace_weights(tmp_path / "d", ints)
    with pytest.raises(CardFilesMismatchError, match="int32"):  # the card says float32
        read_folder(tmp_path / "d")
    with pytest.raises(FormatError, match="'W_enc' is int32"):  # what any reader's tensors are checked with
        check_weight_values(ints, "x.safetensors")


def test_convert_onto_a_file_and_bad_load_arguments_are_refused(tmp_path):
    write_native(random_module("relu"), tmp_path / "d")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(InvalidArgumentError, match="a file is there"):
        convert(tmp_path / "d", tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"
    with pytest.raises(InvalidArgumentError, match="dtype 'int8'"):
        read_folder(tmp_path / "d", dtype="int8")
    with pytest.raises(InvalidArgumentError, match="device 'nonsense'"):
        read_folder(tmp_path / "d", device="nonsense")


def test_foreign_card_mismatch(tmp_path):
    """A registry card naming a topk dictionary, given a dictionary_learning AutoEncoder folder."""
    folder = tmp_path / "ae"
    folder.mkdir()
    torch.save({"bias": torch.zeros(D), "encoder.weight": torch.zeros(F, D), "encoder.bias": torch.zeros(F),
                "decoder.weight": torch.zeros(D, F)}, folder / "ae.pt")
    card = card_for("topk").model_copy(update={"files": Files(format="dictionary_learning", items=[])})
    with pytest.raises(ArchitectureMismatchError, match="architecture='topk'.*architecture='relu'"):
        read_folder(folder, card=card)


# The registry's files cannot be downloaded here (no network): each entry is read from a folder faked in its
# declared format and sizes. The two distinct state dicts are made once; zeros except the decoder, which is
# unit-norm like the originals' (dictionary_learning's loader would otherwise normalise it).
@pytest.fixture(scope="module")
def fake_ae_files(tmp_path_factory):
    files = {}
    for entry in REGISTRY.entries.values():
        c = entry.card
        if c.files.format == "dictionary_learning" and (c.d_in, c.d_dict) not in files:
            decoder = torch.zeros(c.d_in, c.d_dict)
            decoder[torch.arange(c.d_dict) % c.d_in, torch.arange(c.d_dict)] = 1.0
            path = tmp_path_factory.mktemp("ae") / "ae.pt"
            torch.save({"bias": torch.zeros(c.d_in), "encoder.weight": decoder.T.clone(),
                        "encoder.bias": torch.zeros(c.d_dict), "decoder.weight": decoder}, path)
            files[(c.d_in, c.d_dict)] = path
    return files


@pytest.mark.parametrize("name", sorted(n for n, e in REGISTRY.entries.items()
                                         if e.card.files.format == "dictionary_learning"))
def test_registry_entry_reads_from_a_faked_folder(tmp_path, fake_ae_files, name):
    card = REGISTRY.get(name).card
    assert card.files.format == "dictionary_learning"
    assert card.architecture == "relu"  # all entries so far
    folder = tmp_path / name.replace("/", "_")
    folder.mkdir()
    (folder / "ae.pt").symlink_to(fake_ae_files[(card.d_in, card.d_dict)])
    if any(f.path == "config.json" for f in card.files.items):  # the legacy set's config (layout guessed)
        (folder / "config.json").write_text(json.dumps({"dictionary": {"activation_dim": card.d_in,
                                                                       "dict_size": card.d_dict}}))
    module = read_folder(folder, card=card)
    assert module.card is card
    assert (module.d_in, module.d_dict) == (card.d_in, card.d_dict)
    assert type(module).architecture == card.architecture
    assert module.pre_encoder_bias == card.pre_encoder_bias
    assert {k: tuple(v.shape) for k, v in module.named_parameters()} == {
        "W_enc": (card.d_in, card.d_dict), "b_enc": (card.d_dict,), "W_dec": (card.d_dict, card.d_in),
        "b_dec": (card.d_in,)}
    # a few features through the real weights (a full forward would read 128 MB per entry)
    assert torch.equal(module.W_enc[:, :4], torch.eye(card.d_in, 4))
    assert torch.equal(module.W_dec[:4, :4], torch.eye(4))


def test_convert_then_cli(tmp_path, capsys):
    from typer.testing import CliRunner

    from dictionaries.cli import app

    src = tmp_path / "pythia-70m-deduped" / "attn_out_layer1" / "10_32768"
    src.mkdir(parents=True)
    torch.save({"bias": torch.randn(D), "encoder.weight": torch.randn(F, D), "encoder.bias": torch.randn(F),
                "decoder.weight": torch.randn(D, F)}, src / "ae.pt")
    card = convert(src, tmp_path / "native")
    assert card.files.format == "native"
    assert card.files.source == str(src.resolve())
    assert card.hook.module == "gpt_neox.layers.1.attention"
    assert card.provenance.original == str(src.resolve())
    x = torch.randn(4, D)
    torch.testing.assert_close(read_folder(tmp_path / "native")(x).reconstruction, read_folder(src)(x).reconstruction)
    result = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "cli"), "--format", "dictionary_learning"])
    assert result.exit_code == 0, result.output
    assert "relu dictionary, d_in=10, d_dict=24" in result.output
    assert "gpt_neox.layers.1.attention" in result.output
    assert read_card(tmp_path / "cli" / "card.json").files.items[0].sha256 in result.output.replace("\n", "")


def test_cli_convert_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from dictionaries.cli import main

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("nothing here")
    monkeypatch.setattr("sys.argv", ["dictctl", "convert", str(tmp_path / "src"), str(tmp_path / "dst")])
    monkeypatch.delenv("DICTIONARIES_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("bad format:")
    assert "ae.pt" in err
    assert "notes.txt" in err
    assert "Traceback" not in err
    assert not (tmp_path / "dst").exists()
