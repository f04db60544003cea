"""load_dictionary (dictionaries/loader.py): registry names through a real olah server, folders, hf:// paths.

Registries here are real registry.yaml + cards/ folders written to tmp_path, pointing at repos committed
to the local hub; weights are real safetensors files written by `formats.write_native`.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from dictionaries.architectures import ARCHITECTURES, build_dictionary
from dictionaries.card import Card, Files
from dictionaries.errors import (
    HashMismatchError,
    HubUnreachableError,
    MissingFileError,
    UnknownNameError,
    UnverifiedFilesWarning,
)
from dictionaries.formats import write_native
from dictionaries.loader import download, load_dictionary
from dictionaries.registry import Registry, load_registry

D_IN, D_DICT = 8, 16


def small_dictionary(kind: str, name: str = "toy/mlp0/16", seed: int = 0):
    """A dictionary of `kind` with seeded random parameters (thresholds positive)."""
    card = Card(name=name, architecture=kind, d_in=D_IN, d_dict=D_DICT, k=4 if kind in ("topk", "batchtopk") else None,
                files=Files(items=[]))
    d = build_dictionary(card)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.1)
    return d


def native_files(d, tmp_path: Path) -> tuple[Card, dict[str, bytes]]:
    folder = tmp_path / f"native-{d.card.name.replace('/', '_')}-{id(d)}"
    card = write_native(d, folder)
    return card, {p.name: p.read_bytes() for p in folder.iterdir()}


def make_registry(root: Path, entries: dict[str, tuple[Card, dict]]) -> Registry:
    """registry.yaml + cards/ under `root` for (card, location) pairs."""
    index = {"version": 1, "entries": {}}
    for name, (card, location) in entries.items():
        path = root / "cards" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(card.model_dump(mode="json", exclude_none=True), sort_keys=False))
        index["entries"][name] = {"card": f"{name}.yaml", "location": location}
    (root / "registry.yaml").write_text(yaml.safe_dump(index, sort_keys=False))
    return Registry(root / "registry.yaml")


def publish(hub, repo: str, files: dict[str, bytes], sub: str = "d") -> str:
    return hub.commit(repo, {f"{sub}/{k}": v for k, v in files.items()}, f"add {sub}")


def assert_same_weights(a, b):
    assert type(a) is type(b)
    assert a.card.name == b.card.name
    for (ka, va), (kb, vb) in zip(a.native_state().items(), b.native_state().items()):
        assert ka == kb
        assert torch.equal(va, vb.to(va.dtype))


@pytest.fixture
def entry(hub_env, tmp_path, request):
    """A relu entry `toy/mlp0/16` committed to the local hub and registered: (registry, dictionary, sha)."""
    d = small_dictionary("relu")
    card, files = native_files(d, tmp_path)
    repo = "loadtest/" + request.node.name.replace("[", "-").replace("]", "")[:60]
    sha = publish(hub_env, repo, files)
    location = {"kind": "hub", "repo": repo, "revision": sha, "subfolder": "d"}
    reg = make_registry(tmp_path / "reg", {card.name: (card.model_copy(update={"aliases": ["toy/alias"]}), location)})
    return reg, d, sha, repo


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_load_by_registry_name_for_every_architecture(kind, hub_env, tmp_path):
    d = small_dictionary(kind, seed=1)
    card, files = native_files(d, tmp_path)
    sha = publish(hub_env, f"loadtest/kind-{kind}", files)
    reg = make_registry(tmp_path / "reg", {card.name: (card, {"kind": "hub", "repo": f"loadtest/kind-{kind}",
                                                              "revision": sha, "subfolder": "d"})})
    loaded = load_dictionary(card.name, registry=reg)
    assert_same_weights(d, loaded)
    assert loaded.card == reg.get(card.name).card
    x = torch.rand(3, D_IN)
    assert torch.allclose(loaded(x).reconstruction, d(x).reconstruction)


def test_alias_and_registry_from_environment(entry, monkeypatch):
    reg, d, _, _ = entry
    monkeypatch.setenv("DICTIONARIES_REGISTRY", str(reg.path))
    assert_same_weights(d, load_dictionary("toy/alias"))
    assert set(download(["toy/*"])) == {"toy/mlp0/16"}


def test_unknown_name_suggests_close_names(entry):
    reg = entry[0]
    with pytest.raises(UnknownNameError, match="toy/mlp0/16"):
        load_dictionary("toy/mlp0/61", registry=reg)


def test_pinned_revision_ignores_later_commits(entry, hub_env, tmp_path):
    reg, d, _, repo = entry
    _, other = native_files(small_dictionary("relu", seed=9), tmp_path)
    publish(hub_env, repo, other)  # main moves on; the entry stays pinned
    assert_same_weights(d, load_dictionary("toy/mlp0/16", registry=reg))


def test_warm_cache_loads_offline(entry, monkeypatch):
    reg, d, _, _ = entry
    load_dictionary("toy/mlp0/16", registry=reg)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert_same_weights(d, load_dictionary("toy/mlp0/16", registry=reg))


def test_corrupted_cache_is_fetched_again_and_loads(entry):
    reg, d, _, _ = entry
    folder = download(["toy/mlp0/16"], registry=reg, progress=False)["toy/mlp0/16"]
    blob = (folder / "weights.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-8:] = b"\x7f" * 8  # flip the last weights' bytes
    blob.write_bytes(bytes(data))
    assert_same_weights(d, load_dictionary("toy/mlp0/16", registry=reg))


def test_corrupted_on_the_server_raises(entry, hub_env):
    reg, d, _, repo = entry
    card = reg.get("toy/mlp0/16").card
    bad = hub_env.commit(repo, {"d/weights.safetensors": b"{}" * 200}, "broken upload")
    reg2 = make_registry(reg.path.parent.parent / "reg2", {card.name: (card, {"kind": "hub", "repo": repo,
                                                                              "revision": bad, "subfolder": "d"})})
    with pytest.raises(HashMismatchError, match="fetched twice"):
        load_dictionary("toy/mlp0/16", registry=reg2)


def test_unreachable_hub_with_nothing_cached(entry, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(HubUnreachableError, match="HF_ENDPOINT"):
        load_dictionary("toy/mlp0/16", registry=entry[0])


def test_missing_file(entry, tmp_path):
    reg, _, sha, repo = entry
    card = reg.get("toy/mlp0/16").card
    card = card.model_copy(update={"files": Files(items=[*card.files.items, {"path": "extra.bin"}])})
    reg2 = make_registry(tmp_path / "reg2", {card.name: (card, {"kind": "hub", "repo": repo, "revision": sha,
                                                                "subfolder": "d"})})
    with pytest.raises(MissingFileError, match="extra.bin"):
        load_dictionary("toy/mlp0/16", registry=reg2)


def test_unverified_entry_warns_with_hashes(hub_env, tmp_path):
    d = small_dictionary("relu", seed=3)
    card, files = native_files(d, tmp_path)
    sha = publish(hub_env, "loadtest/unverified", files)
    bare = card.model_copy(update={"files": Files(items=[{"path": "weights.safetensors"}])})
    reg = make_registry(tmp_path / "reg", {card.name: (bare, {"kind": "hub", "repo": "loadtest/unverified",
                                                              "revision": sha, "subfolder": "d"})})
    with pytest.warns(UnverifiedFilesWarning, match=hashlib.sha256(files["weights.safetensors"]).hexdigest()):
        assert_same_weights(d, load_dictionary(card.name, registry=reg))


def test_hf_path(hub_env, tmp_path):
    d = small_dictionary("jumprelu", seed=4)
    _, files = native_files(d, tmp_path)
    sha = publish(hub_env, "loadtest/free", files, sub="some/folder")
    for path in (f"hf://loadtest/free/some/folder@{sha}", "hf://loadtest/free/some/folder"):
        loaded = load_dictionary(path)
        assert_same_weights(d, loaded)


def test_local_folder(tmp_path):
    d = small_dictionary("gated", seed=5)
    write_native(d, tmp_path / "mine")
    assert_same_weights(d, load_dictionary(tmp_path / "mine"))
    assert_same_weights(d, load_dictionary(str(tmp_path / "mine")))
    with pytest.raises(MissingFileError, match="No such folder"):
        load_dictionary(str(tmp_path / "absent"))


def test_dtype_and_device_are_applied_at_load(entry):
    loaded = load_dictionary("toy/mlp0/16", registry=entry[0], dtype=torch.float64, device="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert loaded(torch.rand(2, D_IN, dtype=torch.float64)).features.dtype == torch.float64
    half = load_dictionary("toy/mlp0/16", registry=entry[0], dtype="bfloat16")
    assert half.W_enc.dtype == torch.bfloat16


@pytest.mark.gpu
def test_load_straight_onto_the_gpu(entry):
    loaded = load_dictionary("toy/mlp0/16", registry=entry[0], device="cuda", dtype=torch.float16)
    assert {p.device.type for p in loaded.parameters()} == {"cuda"}
    assert loaded(torch.rand(2, D_IN, device="cuda", dtype=torch.float16)).reconstruction.is_cuda


def test_zip_entry_loads_its_member(hub_env, tmp_path):
    d = small_dictionary("topk", seed=6)
    card, files = native_files(d, tmp_path)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(f"all/topk/{name}", data)
        archive.writestr("all/other/weights.safetensors", b"unrelated")
    sha = hub_env.commit("loadtest/zip", {"all.zip": buffer.getvalue()}, "zip")
    location = {"kind": "hub_zip", "repo": "loadtest/zip", "revision": sha, "filename": "all.zip",
                "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(), "member": "all/topk/"}
    reg = make_registry(tmp_path / "reg", {card.name: (card, location)})
    assert_same_weights(d, load_dictionary(card.name, registry=reg))


def test_shipped_registry_names_resolve_to_their_cards():
    reg = load_registry()
    for name, e in reg.entries.items():
        assert reg.get(name) is e
        assert e.card.files.items


# ---- dictctl download ---------------------------------------------------------------------------
def run_dictctl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import os
    import subprocess

    return subprocess.run(["dictctl", *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=120)


def test_dictctl_download_fetches_and_verifies(hub_env, tmp_path):
    d = small_dictionary("relu", seed=7)
    card, files = native_files(d, tmp_path)
    sha = publish(hub_env, "loadtest/cli", files)
    bare = card.model_copy(update={"name": "toy/mlp1/16",
                                   "files": Files(items=[{"path": "weights.safetensors"}])})
    loc = {"kind": "hub", "repo": "loadtest/cli", "revision": sha, "subfolder": "d"}
    reg = make_registry(tmp_path / "reg", {card.name: (card, loc), bare.name: (bare, loc)})
    env = {"DICTIONARIES_REGISTRY": str(reg.path)}
    done = run_dictctl("download", "toy/*", "--quiet", env=env)
    assert done.returncode == 0, done.stderr
    assert "ok toy/mlp0/16" in done.stdout
    assert "ok toy/mlp1/16" in done.stdout
    assert "unverified" in done.stderr
    assert hashlib.sha256(files["weights.safetensors"]).hexdigest() in done.stderr
    cached = Path(done.stdout.split("ok toy/mlp0/16")[1].split()[0])
    assert (cached / "weights.safetensors").read_bytes() == files["weights.safetensors"]

    offline = run_dictctl("download", "toy/mlp0/16", env={**env, "HF_HUB_OFFLINE": "1"})  # warm: works offline
    assert offline.returncode == 0, offline.stderr


def test_dictctl_download_errors_are_one_line(entry, tmp_path):
    env = {"DICTIONARIES_REGISTRY": str(entry[0].path), "HF_ENDPOINT": "http://127.0.0.1:9"}
    down = run_dictctl("download", "toy/mlp0/16", env=env)
    assert down.returncode == 1
    assert down.stderr.startswith("hub unreachable:")
    assert "Traceback" not in down.stderr
    unknown = run_dictctl("download", "toy/mlp9/16", env=env)
    assert unknown.returncode == 1
    assert "unknown name" in unknown.stderr
    assert "toy/mlp0/16" in unknown.stderr


def test_dictctl_download_rehashes_and_repairs_bit_rot(entry):
    """A byte flipped in place (same size, inode and mtime) fools the load path's stat record by design;
    `dictctl download` re-hashes every file, so it sees the flip, drops the copy and fetches it again."""
    reg, d, sha, repo = entry
    env = {"DICTIONARIES_REGISTRY": str(reg.path)}
    first = run_dictctl("download", "toy/mlp0/16", "--quiet", env=env)
    assert first.returncode == 0, first.stderr
    weights = Path(first.stdout.split("ok toy/mlp0/16")[1].split()[0]) / "weights.safetensors"
    blob = weights.resolve()
    good, stat = blob.read_bytes(), blob.stat()
    with open(blob, "r+b") as fh:  # flip one byte of the tensor data, past the header
        fh.seek(len(good) - 3)
        fh.write(bytes([good[-3] ^ 0xFF]))
    os.utime(blob, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert blob.stat().st_mtime_ns == stat.st_mtime_ns
    assert blob.stat().st_size == stat.st_size
    again = run_dictctl("download", "toy/mlp0/16", "--quiet", env=env)
    assert again.returncode == 0, again.stderr
    assert weights.resolve().read_bytes() == good


def test_a_card_path_leaving_its_folder_is_refused_before_any_download(tmp_path):
    """A registry card at a plain URL naming `../` would have made download write outside the cache."""
    d = small_dictionary("relu")
    card = d.card.model_copy(update={"files": Files(items=[{"path": "weights.safetensors"}])})
    reg = make_registry(tmp_path / "reg", {card.name: (card, {"kind": "url", "url": "http://127.0.0.1:9/x/"})})
    cards = tmp_path / "reg" / "cards" / "toy" / "mlp0" / "16.yaml"
    cards.write_text(cards.read_text().replace("path: weights.safetensors", "path: ../../escaped.bin"))
    done = run_dictctl("download", "toy/mlp0/16", env={"DICTIONARIES_REGISTRY": str(reg.path)})
    assert done.returncode == 1
    assert "invalid card" in done.stderr
    assert "files.items.0.path" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("escaped.bin"))
