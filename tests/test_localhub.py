"""The local Hub server (dictionaries/localhub.py): real olah, real git, real huggingface_hub client."""

from __future__ import annotations

import os
import subprocess
import urllib.request
from pathlib import Path

import pytest

from dictionaries.errors import LocalHubError
from dictionaries.localhub import LocalHub, free_port


def test_endpoint_answers_and_serves_repo_metadata(local_hub):
    sha = local_hub.commit("lh/meta", {"README.md": b"---\nlicense: mit\n---\nhello\n"}, "readme")
    with urllib.request.urlopen(f"{local_hub.endpoint}/api/models/lh/meta/revision/{sha}") as r:
        info = r.read().decode()
    assert sha in info
    assert "README.md" in info


def test_commit_returns_sha_and_history(local_hub):
    first = local_hub.commit("lh/history", {"a.txt": b"one"}, "first")
    second = local_hub.commit("lh/history", {"b/c.txt": b"two"}, "second", delete=["a.txt"])
    assert len(first) == 40
    assert len(second) == 40
    assert first != second
    path = local_hub.repo_path("lh/history")
    assert local_hub.head("lh/history") == second
    assert not (path / "a.txt").exists()
    assert (path / "b" / "c.txt").read_bytes() == b"two"
    branch = subprocess.run(["git", "branch", "--show-current"], cwd=path, capture_output=True, text=True)
    assert branch.stdout.strip() == "main"


def test_commit_from_a_local_path(local_hub, tmp_path):
    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(300))
    local_hub.commit("lh/frompath", {"sub/w.bin": src}, "copy")
    assert (local_hub.repo_path("lh/frompath") / "sub" / "w.bin").read_bytes() == src.read_bytes()


def test_hf_hub_download_sees_each_commit_and_pins(hub_env):
    from huggingface_hub import hf_hub_download

    old = hub_env.commit("lh/pins", {"sub/x.bin": b"A" * 500}, "a")
    new = hub_env.commit("lh/pins", {"sub/x.bin": b"B" * 500}, "b")
    kw = {"endpoint": hub_env.endpoint, "cache_dir": os.environ["HF_HUB_CACHE"]}
    assert Path(hf_hub_download("lh/pins", "x.bin", subfolder="sub", **kw)).read_bytes() == b"B" * 500
    pinned = hf_hub_download("lh/pins", "x.bin", subfolder="sub", revision=old, **kw)
    assert Path(pinned).read_bytes() == b"A" * 500
    assert old in pinned
    newest = hub_env.commit("lh/pins", {"sub/x.bin": b"C" * 500}, "c")  # no stale view of main
    latest = hf_hub_download("lh/pins", "x.bin", subfolder="sub", **kw)
    assert Path(latest).read_bytes() == b"C" * 500
    assert newest in latest
    assert new != newest


def test_snapshot_download_of_a_subfolder(hub_env):
    from huggingface_hub import snapshot_download

    sha = hub_env.commit("lh/snap", {"d/one.txt": b"1", "d/two.txt": b"2", "other/three.txt": b"3"}, "x")
    folder = Path(snapshot_download("lh/snap", revision=sha, allow_patterns=["d/*"], endpoint=hub_env.endpoint,
                                    cache_dir=os.environ["HF_HUB_CACHE"]))
    got = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert got == ["d/one.txt", "d/two.txt"]


@pytest.mark.parametrize("bad", ["noslash", "a/b/c", "../x", "a/.."])
def test_bad_repo_ids_are_refused(local_hub, bad):
    with pytest.raises(LocalHubError, match="org/name"):
        local_hub.repo_path(bad)


@pytest.mark.parametrize("bad", ["../escape.txt", "/abs.txt", ".git/config"])
def test_paths_outside_the_repo_are_refused(local_hub, bad):
    with pytest.raises(LocalHubError, match="relative"):
        local_hub.commit("lh/paths", {bad: b"x"}, "bad")


def test_binary_file_olah_cannot_serve_is_refused(local_hub):
    with pytest.raises(LocalHubError, match="121..149"):
        local_hub.commit("lh/lfs", {"w.bin": bytes(range(256))[128:258]}, "binary 128 bytes")


def test_deleting_a_missing_file_is_an_error(local_hub):
    with pytest.raises(LocalHubError, match="no such file"):
        local_hub.commit("lh/del", {}, "nothing", delete=["ghost.txt"])


def test_a_busy_port_is_refused(tmp_path):
    busy = LocalHub(tmp_path / "a").start()
    try:
        clash = LocalHub(tmp_path / "b", port=busy.port)
        with pytest.raises(LocalHubError, match=f"port {busy.port} .* in use"):
            clash.start(timeout=30)
        assert clash.process is None
    finally:
        busy.stop()


def test_context_manager_stops_the_server(tmp_path):
    with LocalHub(tmp_path, port=free_port()) as hub:
        proc = hub.process
        assert proc.poll() is None
    assert proc.poll() is not None


def test_a_server_that_exits_at_once_names_its_log(tmp_path, monkeypatch):
    hub = LocalHub(tmp_path)
    monkeypatch.setattr(hub, "_config_text", lambda: "[basic\nnot toml")  # olah cannot parse it and exits
    with pytest.raises(LocalHubError, match="olah.log"):
        hub.start(timeout=30)
    hub.stop()
