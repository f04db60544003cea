"""Downloading and verifying (dictionaries/hub.py) through a real olah server and the real huggingface_hub client.

Plain-HTTPS originals are served by a real `http.server` on loopback; nothing here is faked.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import threading
import zipfile
from pathlib import Path

import pytest
import yaml

from dictionaries.card import FileEntry
from dictionaries.errors import (
    HashMismatchError,
    HubPathError,
    HubUnreachableError,
    MissingFileError,
    UnverifiedFilesWarning,
)
from dictionaries.fetch import fetch, fetch_hub_folder, plan_fetch
from dictionaries.files import sha256_of
from dictionaries.hub import parse_hub_path
from dictionaries.registry import HubLocation, HubZipLocation, UrlLocation, load_registry


def entry_for(name: str, data: bytes, *, hashed: bool = True) -> FileEntry:
    return FileEntry(path=name, size=len(data), sha256=hashlib.sha256(data).hexdigest() if hashed else None)


def blob(seed: int, n: int = 2048) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (n // 32)


@pytest.fixture
def hub_repo(hub_env, request):
    """A repo with two files in `d/`, committed to the local hub: (location, entries, contents)."""
    repo = "hubtest/" + request.node.name.replace("[", "-").replace("]", "")[:60]
    files = {"weights.bin": blob(1), "config.json": b'{"a": 1}\n'}
    sha = hub_env.commit(repo, {f"d/{k}": v for k, v in files.items()}, "add d")
    loc = HubLocation(repo=repo, revision=sha, subfolder="d")
    return loc, [entry_for(k, v) for k, v in files.items()], files


# ---- hf:// paths --------------------------------------------------------------------------------
@pytest.mark.parametrize("path, repo, sub, rev, kind", [
    ("hf://org/repo", "org/repo", "", "main", "model"),
    ("hf://org/repo/a/b@" + "c" * 40, "org/repo", "a/b", "c" * 40, "model"),
    ("hf://org/repo/folder/@v1.0", "org/repo", "folder", "v1.0", "model"),
    ("hf://datasets/org/data.set/x", "org/data.set", "x", "main", "dataset"),
])
def test_parse_hub_path(path, repo, sub, rev, kind):
    loc = parse_hub_path(path)
    assert (loc.repo, loc.subfolder, loc.revision, loc.repo_type) == (repo, sub, rev, kind)


@pytest.mark.parametrize("bad", ["org/repo", "hf://", "hf://org", "hf://org/", "hf://org/repo/../x",
                                 "hf://org/repo@", "hf://org/re po", "https://org/repo",
                                 # names and revisions the Hub refuses (huggingface_hub's errors passed through)
                                 "hf://org/a..b", "hf://org/a--b", "hf://org/" + "a" * 97, "hf://org/repo.",
                                 "hf://org/repo@bad rev", "hf://org/repo@..", "hf://org/repo@a:b"])
def test_malformed_hub_paths_are_rejected(bad):
    with pytest.raises(HubPathError, match="hf://org/repo/sub/folder@revision"):
        parse_hub_path(bad)


# ---- every registry entry: what fetch would ask for --------------------------------------------
@pytest.mark.parametrize("name", sorted(load_registry().entries))
def test_every_entry_plans_exactly_its_card_files(name):
    entry = load_registry().get(name)
    loc, files = entry.location, entry.card.files.items
    urls = plan_fetch(loc, files)
    assert len(urls) == len(files)
    assert len(set(urls)) == len(files)
    for url, f in zip(urls, files):
        assert url.endswith(f.path)
        if isinstance(loc, UrlLocation):
            assert loc.url.startswith("https://")
            assert url == loc.url.rstrip("/") + "/" + f.path
        elif isinstance(loc, HubZipLocation):
            assert loc.member.endswith("/")
            assert loc.filename.endswith(".zip")
            assert f"/{loc.repo}/resolve/{loc.revision}/{loc.filename}#{loc.member}{f.path}" in url
        else:
            sub = loc.subfolder.strip("/")
            rev = loc.revision or "main"  # an unpinned entry is resolved from its main branch
            assert f"/{loc.repo}/resolve/{rev}/{sub + '/' if sub else ''}{f.path}" in url


# ---- Hub locations ------------------------------------------------------------------------------
def test_fetch_downloads_into_the_hf_cache_and_verifies(hub_repo):
    loc, entries, files = hub_repo
    folder = fetch(loc, entries, progress=False)
    assert folder.is_relative_to(Path(os.environ["HF_HUB_CACHE"]))
    assert loc.revision in folder.as_posix()
    assert folder.name == "d"
    for name, data in files.items():
        assert (folder / name).read_bytes() == data


def test_pinned_revision_ignores_later_commits(hub_repo, hub_env):
    loc, entries, files = hub_repo
    hub_env.commit(loc.repo, {"d/weights.bin": blob(2)}, "replace weights on main")
    folder = fetch(loc, entries, progress=False)
    assert (folder / "weights.bin").read_bytes() == files["weights.bin"]


def test_warm_cache_loads_offline(hub_repo, monkeypatch):
    loc, entries, files = hub_repo
    fetch(loc, entries, progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    folder = fetch(loc, entries, progress=False)
    assert (folder / "weights.bin").read_bytes() == files["weights.bin"]


@pytest.mark.parametrize("repo", ["org/a..b", "a/b/c", "org/-x"])
def test_a_registry_location_the_hub_would_refuse_is_a_card_error(tmp_path, repo):
    """Refused when the registry loads, not passed on to huggingface_hub (which raises its own error class)."""
    from dictionaries.errors import CardError
    from dictionaries.registry import Registry

    loc = {"kind": "hub", "repo": repo, "revision": "0" * 40}
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump({"entries": {"toy/mlp0/16": {"card": "c.yaml",
                                                                                      "location": loc}}}))
    with pytest.raises(CardError, match="entries.toy/mlp0/16.location"):
        Registry(tmp_path / "registry.yaml")


def test_huggingface_hubs_own_validation_error_becomes_ours():
    from huggingface_hub.errors import HFValidationError

    from dictionaries.hub import _hub_error

    err = _hub_error(HFValidationError("Cannot have -- or .. in repo_id"), "org/a..b", "card.json", "main", "model")
    assert isinstance(err, HubPathError)
    assert "Cannot have -- or .." in str(err)


def test_offline_with_nothing_cached_names_hf_hub_offline(hub_repo, monkeypatch):
    loc, entries, _ = hub_repo
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE") as info:
        fetch(loc, entries, progress=False)
    assert info.value.offline


def test_unreachable_hub_with_nothing_cached_names_hf_endpoint(hub_repo, monkeypatch):
    loc, entries, _ = hub_repo
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(HubUnreachableError, match="HF_ENDPOINT") as info:
        fetch(loc, entries, progress=False)
    assert info.value.endpoint == "http://127.0.0.1:9"
    assert not info.value.offline


def test_corrupted_cache_blob_is_fetched_again(hub_repo):
    loc, entries, files = hub_repo
    folder = fetch(loc, entries, progress=False)
    blob_path = (folder / "weights.bin").resolve()
    assert blob_path != folder / "weights.bin"  # a snapshot link to a blob
    blob_path.write_bytes(b"\0" * len(files["weights.bin"]))  # same size, other bytes
    folder = fetch(loc, entries, progress=False)
    assert (folder / "weights.bin").read_bytes() == files["weights.bin"]


def test_file_corrupted_on_the_server_raises_hash_mismatch(hub_env):
    good = blob(3)
    sha = hub_env.commit("hubtest/served-bad", {"w.bin": blob(4)}, "wrong bytes")
    with pytest.raises(HashMismatchError) as info:
        fetch(HubLocation(repo="hubtest/served-bad", revision=sha), [entry_for("w.bin", good)], progress=False)
    assert info.value.expected == hashlib.sha256(good).hexdigest()
    assert info.value.found == hashlib.sha256(blob(4)).hexdigest()
    assert "fetched twice" in str(info.value)


def test_missing_file_in_the_repo(hub_repo):
    loc, entries, _ = hub_repo
    with pytest.raises(MissingFileError, match="no such file") as info:
        fetch(loc, [*entries, FileEntry(path="absent.bin")], progress=False)
    assert "absent.bin" in info.value.path


def test_missing_repo(hub_env):
    with pytest.raises(MissingFileError, match="No repo hubtest/none"):
        fetch(HubLocation(repo="hubtest/none", revision="a" * 40), [FileEntry(path="x")], progress=False)


def test_unverified_files_warn_with_their_hashes(hub_repo):
    loc, entries, files = hub_repo
    bare = [FileEntry(path=e.path) for e in entries]
    with pytest.warns(UnverifiedFilesWarning) as record:
        fetch(loc, bare, progress=False)
    warning = record[0].message
    for name, data in files.items():
        assert warning.files[name] == (hashlib.sha256(data).hexdigest(), len(data))
        assert hashlib.sha256(data).hexdigest() in str(warning)


def test_force_downloads_again(hub_repo):
    loc, entries, _ = hub_repo
    first = (fetch(loc, entries, progress=False) / "weights.bin").resolve()
    before = first.stat().st_mtime_ns
    second = (fetch(loc, entries, force=True, progress=False) / "weights.bin").resolve()
    assert second.stat().st_mtime_ns != before or second.stat().st_ino != first.stat().st_ino


# ---- unregistered Hub folders -------------------------------------------------------------------
def test_fetch_hub_folder_downloads_only_the_folder(hub_env):
    sha = hub_env.commit("hubtest/folder", {"a/x.txt": b"x", "a/deep/y.txt": b"y", "b/z.txt": b"z"}, "x")
    folder = fetch_hub_folder((f"hf://hubtest/folder/a@{sha}"), progress=False)
    got = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert got == ["deep/y.txt", "x.txt"]
    assert not (folder.parent / "b").exists()


def test_fetch_hub_folder_verifies_what_the_card_lists(hub_env):
    import json

    from dictionaries.card import Card, Files

    card = Card(name="free", architecture="relu", d_in=2, d_dict=4,
                files=Files(items=[entry_for("w.bin", blob(5))]))
    hub_env.commit("hubtest/carded", {"f/card.json": card.to_json().encode(), "f/w.bin": blob(6)}, "bad w")
    with pytest.raises(HashMismatchError):
        fetch_hub_folder(("hf://hubtest/carded/f"), progress=False)
    hub_env.commit("hubtest/carded", {"f/w.bin": blob(5)}, "good w")
    folder = fetch_hub_folder("hf://hubtest/carded/f@main", progress=False)
    assert (folder / "w.bin").read_bytes() == blob(5)
    assert json.loads((folder / "card.json").read_text())


def test_fetch_hub_folder_of_a_missing_folder(hub_env):
    hub_env.commit("hubtest/nofolder", {"a/x.txt": b"x"}, "x")
    with pytest.raises(MissingFileError, match="no folder 'zzz'"):
        fetch_hub_folder(("hf://hubtest/nofolder/zzz"), progress=False)


# ---- plain HTTPS originals ----------------------------------------------------------------------
@pytest.fixture
def web_root(tmp_path):
    """A real http.server on loopback serving `tmp_path/www`: (root folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_location_downloads_verifies_and_caches(web_root, monkeypatch):
    root, base = web_root
    (root / "set" / "layer3").mkdir(parents=True)
    (root / "set" / "layer3" / "ae.pt").write_bytes(blob(7))
    loc, entries = UrlLocation(url=f"{base}/set/layer3/"), [entry_for("ae.pt", blob(7))]
    folder = fetch(loc, entries, progress=False)
    assert folder.is_relative_to(Path(os.environ["HF_HOME"]) / "dictionaries" / "url")
    assert (folder / "ae.pt").read_bytes() == blob(7)
    assert not list(folder.glob(".*incomplete"))
    (root / "set" / "layer3" / "ae.pt").unlink()  # cached: no request needed, even offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (fetch(loc, entries, progress=False) / "ae.pt").read_bytes() == blob(7)


def test_url_location_errors(web_root, monkeypatch):
    root, base = web_root
    (root / "bad.pt").write_bytes(blob(8))
    with pytest.raises(MissingFileError, match="404"):
        fetch(UrlLocation(url=base), [entry_for("nothere.pt", b"x")], progress=False)
    with pytest.raises(HashMismatchError):
        fetch(UrlLocation(url=base), [entry_for("bad.pt", blob(9))], progress=False)
    with pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE"):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        fetch(UrlLocation(url=base + "/other/"), [entry_for("bad.pt", blob(8))], progress=False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(HubUnreachableError, match="could not be reached"):
        fetch(UrlLocation(url="http://127.0.0.1:9/x/"), [entry_for("a.pt", b"a")], progress=False)


# ---- zip archives on the Hub --------------------------------------------------------------------
def make_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture
def zip_repo(hub_env):
    members = {"dicts/site_a/10/ae.pt": blob(10), "dicts/site_a/10/config.json": b"{}",
               "dicts/site_b/10/ae.pt": blob(11)}
    data = make_zip(members)
    sha = hub_env.commit("hubtest/zipped", {"all.zip": data}, "zip")
    loc = HubZipLocation(repo="hubtest/zipped", revision=sha, filename="all.zip", size=len(data),
                         sha256=hashlib.sha256(data).hexdigest(), member="dicts/site_a/10/")
    return loc, members


def test_zip_location_extracts_only_the_member(zip_repo):
    loc, members = zip_repo
    folder = fetch(loc, [entry_for("ae.pt", members["dicts/site_a/10/ae.pt"])], progress=False)
    assert folder == Path(os.environ["HF_HOME"]) / "dictionaries" / "zip" / loc.sha256 / loc.member
    assert (folder / "ae.pt").read_bytes() == members["dicts/site_a/10/ae.pt"]
    assert (folder / "config.json").exists()
    assert not (folder.parent.parent / "site_b").exists()
    (folder / "ae.pt").write_bytes(b"corrupt")  # a damaged extraction is redone from the cached zip
    again = fetch(loc, [entry_for("ae.pt", members["dicts/site_a/10/ae.pt"])], progress=False)
    assert (again / "ae.pt").read_bytes() == members["dicts/site_a/10/ae.pt"]


def test_zip_location_errors(zip_repo):
    loc, members = zip_repo
    with pytest.raises(HashMismatchError):
        fetch(loc.model_copy(update={"sha256": "0" * 64}), [FileEntry(path="ae.pt")], progress=False)
    with pytest.raises(MissingFileError, match="no such folder"):
        fetch(loc.model_copy(update={"member": "dicts/site_c/"}), [FileEntry(path="ae.pt")], progress=False)
    with pytest.raises(MissingFileError, match="no such member"):
        fetch(loc, [FileEntry(path="nothere.pt")], progress=False)


def test_zip_without_recorded_hash_warns(zip_repo):
    loc, members = zip_repo
    with pytest.warns(UnverifiedFilesWarning) as record:
        fetch(loc.model_copy(update={"sha256": None}), [FileEntry(path="ae.pt")], progress=False)
    listed = {k: v for w in record for k, v in w.message.files.items()}
    assert listed["all.zip"][0] == loc.sha256
    assert listed["ae.pt"] == (hashlib.sha256(members["dicts/site_a/10/ae.pt"]).hexdigest(), len(blob(10)))


def test_sha256_of_matches_hashlib(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(blob(12))
    assert sha256_of(p) == hashlib.sha256(blob(12)).hexdigest()
