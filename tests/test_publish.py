"""Publishing: validate, stage, one commit to a local hub (real olah + real huggingface_hub client), the
registry entry, and the bad inputs of issue 6 (the real-Hub boundary is in test_publish_hub.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from dictionaries.architectures import ARCHITECTURES
from dictionaries.card import FileEntry, read_card
from dictionaries.errors import (
    CardFilesMismatchError,
    FormatError,
    MissingFileError,
    NonFiniteWeightsError,
    PublishError,
    RepoNameError,
    TargetOccupiedError,
)
from dictionaries.files import sha256_of
from dictionaries.registry import HubLocation, load_registry

from helpers import D_DICT, D_IN, dictctl, make_folder, snapshot

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---- helpers -----------------------------------------------------------------------------------
def commit_count(hub, repo: str) -> int:
    path = hub.repo_path(repo)
    if not (path / ".git").exists():
        return 0
    return int(subprocess.run(["git", "rev-list", "--count", "HEAD"], cwd=path, capture_output=True,
                              text=True, check=True).stdout)


# ---- publish -> load by name, through olah and the real huggingface_hub client -----------------
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_publish_then_load_by_name_gives_identical_outputs(arch, tmp_path, hub_env, registry):
    from dictionaries.loader import load_dictionary
    from dictionaries.publish import publish

    card, original = make_folder(tmp_path / "native", arch)
    repo = f"org/toy-{arch}"
    result = publish(tmp_path / "native", repo, subfolder="layer0", register=True, local_hub=hub_env)
    assert result.location == HubLocation(repo=repo, revision=hub_env.head(repo), subfolder="layer0")
    assert result.registered == registry
    entry = load_registry().get(card.name)
    assert entry.location == result.location
    native = tmp_path / "native" / "card.json"  # the registry pins card.json too: the loader reads it
    assert entry.card.files.items == [FileEntry(path="card.json", size=native.stat().st_size,
                                                sha256=sha256_of(native)), *card.files.items]
    loaded = load_dictionary(card.name)
    x = torch.randn(3, 5, D_IN)
    with torch.no_grad():
        assert torch.equal(loaded(x).reconstruction, original(x).reconstruction)
        assert torch.equal(loaded(x).features, original(x).features)
    for item in card.files.items:  # the printed entry names every file with its hash
        assert item.sha256 in result.card.files.model_dump_json()
    assert f"revision: {result.location.revision}" in result.entry_yaml()


def test_staged_model_card_parses_as_hub_front_matter(tmp_path, local_hub):
    from dictionaries.hub import model_card_metadata
    from dictionaries.publish import publish

    card, _ = make_folder(tmp_path / "native")
    (tmp_path / "native" / "density.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300))
    result = publish(tmp_path / "native", "org/card", subfolder="s", dry_run=True, local_hub=local_hub,
                     staging_dir=tmp_path / "stage")
    text = (tmp_path / "stage" / "s" / "README.md").read_text()
    meta = model_card_metadata(text)
    assert meta["library_name"] == "dictionaries"
    assert meta["base_model"] == card.model.id
    assert meta["license"] == "mit"
    assert {"sparse-autoencoder", "sae", "tiny-neox", "mlp", "relu"} <= set(meta["tags"])
    assert yaml.safe_load(text.split("---\n")[1]) == meta
    assert "| l0 | 3.5 |" in text
    assert "| mse | 0.0123 |" in text
    assert "| frac_loss_recovered | 0.9 |" in text
    assert "![density](density.png)" in text
    assert 'load_dictionary("hf://org/card/s")' in text
    assert sorted(result.uploaded) == ["s/README.md", "s/card.json", "s/density.png", "s/weights.safetensors"]


def test_a_card_listing_a_file_outside_its_folder_is_refused(tmp_path):
    """`publish --dry-run` once copied `../secret` into the staging folder; the card is now refused first."""
    from dictionaries.errors import CardError
    from dictionaries.publish import publish

    make_folder(tmp_path / "native")
    (tmp_path / "secret").write_text("not for the Hub")
    card = json.loads((tmp_path / "native" / "card.json").read_text())
    card["files"]["items"].append({"path": "../secret", "size": 15, "sha256": sha256_of(tmp_path / "secret")})
    (tmp_path / "native" / "card.json").write_text(json.dumps(card))
    with pytest.raises(CardError, match="files.items.1.path"):
        publish(tmp_path / "native", "org/dry", dry_run=True, staging_dir=tmp_path / "stage")
    assert not (tmp_path / "stage").exists()


def test_dry_run_uploads_nothing(tmp_path, local_hub, registry):
    from dictionaries.publish import publish

    make_folder(tmp_path / "native")
    local_hub.create_repo("org/dry")
    before, reg_before = commit_count(local_hub, "org/dry"), snapshot(registry)
    result = publish(tmp_path / "native", "org/dry", dry_run=True, register=True, local_hub=local_hub)
    assert commit_count(local_hub, "org/dry") == before
    assert snapshot(registry) == reg_before
    assert result.dry_run
    assert result.location is None
    assert result.entry_yaml() == ""
    staged = sorted(p.relative_to(result.staged).as_posix() for p in result.staged.rglob("*") if p.is_file())
    assert staged == result.uploaded == ["README.md", "card.json", "weights.safetensors"]
    shutil.rmtree(result.staged)


def test_local_hub_chosen_by_environment_variable(tmp_path, local_hub, monkeypatch):
    from dictionaries.publish import publish

    make_folder(tmp_path / "native")
    monkeypatch.setenv("DICTIONARIES_LOCAL_HUB", str(local_hub.root))
    result = publish(tmp_path / "native", "org/by-env", private=True)
    assert result.location.revision == local_hub.head("org/by-env")
    assert result.notes == ["--private has no meaning on a local hub (it serves every repo)"]


# ---- bad input -------------------------------------------------------------------------------
def _flip_byte(folder: Path):
    p = folder / "weights.safetensors"
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF
    p.write_bytes(bytes(data))


def _append_byte(folder: Path):
    with open(folder / "weights.safetensors", "ab") as fh:
        fh.write(b"\0")


def _claim_other_shape(folder: Path):
    data = json.loads((folder / "card.json").read_text())
    data["d_dict"] = 2 * D_DICT
    (folder / "card.json").write_text(json.dumps(data))


def _claim_other_kind(folder: Path):
    data = json.loads((folder / "card.json").read_text())
    data["architecture"] = "jumprelu"
    (folder / "card.json").write_text(json.dumps(data))


@pytest.mark.parametrize("spoil,words", [
    (_flip_byte, "sha256 is"), (_append_byte, "size is"),
    (_claim_other_shape, "the shape of 'W_enc'"), (_claim_other_kind, "the tensor names")])
def test_card_that_does_not_match_its_files_is_refused_naming_the_file(spoil, words, tmp_path, local_hub):
    from dictionaries.publish import publish

    make_folder(tmp_path / "native")
    spoil(tmp_path / "native")
    before = commit_count(local_hub, "org/spoilt")
    with pytest.raises(CardFilesMismatchError, match=words) as info:
        publish(tmp_path / "native", "org/spoilt", local_hub=local_hub)
    assert info.value.path == str(tmp_path / "native" / "weights.safetensors")
    assert commit_count(local_hub, "org/spoilt") == before


def _rewrite_weights(folder: Path, content: bytes) -> None:
    """Other weights bytes, with card.json hashing them (so the card matches and only the content is bad)."""
    (folder / "weights.safetensors").write_bytes(content)
    data = json.loads((folder / "card.json").read_text())
    data["files"]["items"] = [{"path": "weights.safetensors", "size": len(content),
                               "sha256": sha256_of(folder / "weights.safetensors")}]
    (folder / "card.json").write_text(json.dumps(data))


def test_weights_that_are_not_finite_or_not_safetensors_are_refused(tmp_path):
    from safetensors.torch import load_file, save

    from dictionaries.publish import publish

    make_folder(tmp_path / "native")
    state = load_file(str(tmp_path / "native" / "weights.safetensors"))
    state["b_enc"][0] = float("nan")
    _rewrite_weights(tmp_path / "native", save(state))
    with pytest.raises(NonFiniteWeightsError, match="'b_enc' \\(1 values\\)"):
        publish(tmp_path / "native", "org/nan", dry_run=True, staging_dir=tmp_path / "staged")
    _rewrite_weights(tmp_path / "native", bytes(range(256)) * 4)
    with pytest.raises(FormatError, match="not a readable safetensors file"):
        publish(tmp_path / "native", "org/garbage", dry_run=True, staging_dir=tmp_path / "staged")
    assert not (tmp_path / "staged").exists()


def test_missing_file_or_card_is_refused(tmp_path, local_hub):
    from dictionaries.publish import publish

    make_folder(tmp_path / "native")
    (tmp_path / "native" / "weights.safetensors").unlink()
    with pytest.raises(MissingFileError, match="weights.safetensors"):
        publish(tmp_path / "native", "org/missing", local_hub=local_hub)
    (tmp_path / "native" / "card.json").unlink()
    with pytest.raises(MissingFileError, match="card.json"):
        publish(tmp_path / "native", "org/missing", local_hub=local_hub)


def test_different_dictionary_at_target_needs_force(tmp_path, hub_env):
    from dictionaries.loader import load_dictionary
    from dictionaries.publish import publish

    _, first = make_folder(tmp_path / "a", seed=1)
    _, second = make_folder(tmp_path / "b", seed=2)
    publish(tmp_path / "a", "org/occupied", subfolder="x", local_hub=hub_env)
    again = publish(tmp_path / "a", "org/occupied", subfolder="x", local_hub=hub_env)  # same dictionary: fine
    count = commit_count(hub_env, "org/occupied")
    with pytest.raises(TargetOccupiedError, match="--force") as info:
        publish(tmp_path / "b", "org/occupied", subfolder="x", local_hub=hub_env)
    assert info.value.existing == "toy/mlp0/16"
    assert info.value.existing_sha256 != info.value.new_sha256
    assert commit_count(hub_env, "org/occupied") == count
    forced = publish(tmp_path / "b", "org/occupied", subfolder="x", force=True, local_hub=hub_env)
    assert forced.location.revision != again.location.revision
    x = torch.randn(4, D_IN)
    with torch.no_grad():
        got = load_dictionary(f"hf://org/occupied/x@{forced.location.revision}")(x).reconstruction
        assert torch.equal(got, second(x).reconstruction)
        assert not torch.equal(got, first(x).reconstruction)


@pytest.mark.parametrize("repo", ["noslash", "a/b/c", "org/na me", "org/-bad", "org/a--b", "org/x.git", "/name",
                                  "org/", "org/" + "n" * 97, "org/ünïcode"])
def test_invalid_repo_name_is_refused(repo, tmp_path, local_hub):
    from dictionaries.publish import publish

    make_folder(tmp_path / "native")
    with pytest.raises(RepoNameError, match="not a valid Hub repo"):
        publish(tmp_path / "native", repo, local_hub=local_hub)


@pytest.mark.parametrize("subfolder,branch", [("../up", "main"), ("a/./b", "main"), ("", "bad..branch")])
def test_invalid_subfolder_or_branch_is_refused(subfolder, branch, tmp_path, local_hub):
    from dictionaries.publish import publish

    make_folder(tmp_path / "native")
    with pytest.raises(RepoNameError):
        publish(tmp_path / "native", "org/fine", subfolder=subfolder, branch=branch, local_hub=local_hub)


def test_interrupted_local_commit_registers_nothing(tmp_path, local_hub, registry):
    from dictionaries.publish import publish

    make_folder(tmp_path / "native")
    path = local_hub.create_repo("org/interrupted")
    head, before = local_hub.head("org/interrupted"), snapshot(registry)
    # Another git process holds main's ref lock: `update-ref` fails. (A held index.lock no longer matters:
    # commits are built in a private index.)
    lock = path / ".git" / "refs" / "heads" / "main.lock"
    lock.write_text("")
    try:
        with pytest.raises(PublishError, match="nothing was registered|No commit was made"):
            publish(tmp_path / "native", "org/interrupted", register=True, local_hub=local_hub)
    finally:
        lock.unlink()
    assert local_hub.head("org/interrupted") == head
    assert snapshot(registry) == before
    status = subprocess.run(["git", "status", "--porcelain"], cwd=path, capture_output=True, text=True, check=True)
    assert status.stdout == ""  # nothing left staged for the next commit to pick up


def test_register_replaces_an_entry_and_keeps_the_rest(tmp_path, local_hub, registry):
    from dictionaries.publish import publish

    make_folder(tmp_path / "native", name="pythia70m/mlp3/8192-toy")
    publish(tmp_path / "native", "org/twice", register=True, local_hub=local_hub)
    second = publish(tmp_path / "native", "org/twice", subfolder="again", register=True, local_hub=local_hub)
    text = registry.read_text()
    assert text.startswith("# The registry index")
    assert text.count("pythia70m/mlp3/8192-toy:") == 1
    reg = load_registry(registry)
    assert reg.get("pythia70m/mlp3/8192-toy").location == second.location
    assert set(reg.entries) - {"pythia70m/mlp3/8192-toy"} == set(load_registry(REPO_ROOT / "registry.yaml").entries)
    assert read_card(registry.parent / "cards" / "pythia70m/mlp3/8192-toy.yaml") == second.card


# ---- the commands ----------------------------------------------------------------------------
def test_cli_publish_dry_run_and_bad_repo(tmp_path, local_hub, monkeypatch, capsys):
    make_folder(tmp_path / "native")
    code, out, err = dictctl(monkeypatch, capsys, "publish", str(tmp_path / "native"), "--repo", "org/cli",
                             "--dry-run", "--local-hub", str(local_hub.root), "--staging-dir", str(tmp_path / "stage"))
    assert code == 0, err
    assert "nothing uploaded" in out
    assert "weights.safetensors" in out
    assert commit_count(local_hub, "org/cli") == 0
    code, out, err = dictctl(monkeypatch, capsys, "publish", str(tmp_path / "native"), "--repo", "not a repo",
                             "--local-hub", str(local_hub.root))
    assert code == 1
    assert err.startswith("invalid repo name:")
    assert len(err.strip().splitlines()) == 1


def test_cli_publish_prints_the_entry_and_registers(tmp_path, local_hub, registry, monkeypatch, capsys):
    card, _ = make_folder(tmp_path / "native")
    monkeypatch.setenv("DICTIONARIES_LOCAL_HUB", str(local_hub.root))
    code, out, err = dictctl(monkeypatch, capsys, "publish", str(tmp_path / "native"), "--repo", "org/cli-reg",
                             "--register")
    assert code == 0, err
    head = local_hub.head("org/cli-reg")
    assert f"revision: {head}" in out
    assert card.files.items[0].sha256 in out
    assert sha256_of(tmp_path / "native" / "card.json") in out
    assert load_registry(registry).get(card.name).location.revision == head
