"""The Hub down (dictionaries/hub.py) and a corrupted cached card (dictionaries/fetch.py), with real servers.

The Hub is the local olah server while files are cached; then HF_ENDPOINT points at a real loopback server
that is down in one of three ways: nothing listens (refused), a socket that accepts and never answers
(silent), an `http.server` answering 503 to everything. Each call is timed against a bound.
"""

from __future__ import annotations

import http.server
import logging
import re
import socket
import threading
import time

import pytest
import torch

from dictionaries.errors import HubUnreachableError
from dictionaries.fetch import fetch, fetch_hub_folder
from dictionaries.hub import parse_hub_path
from dictionaries.loader import load_dictionary
from dictionaries.registry import HubLocation

from helpers import make_folder

TIMEOUT = 1.0  # DICTIONARIES_HUB_TIMEOUT for these tests, in seconds
SLACK = 6.0  # what a loaded two-core machine may add to a call that makes no request or times out once


@pytest.fixture
def silent_endpoint():
    """A loopback socket that accepts connections and never answers; its endpoint URL."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:  # closed at teardown
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    # close() from this thread leaves accept() blocked (Linux): shutdown() wakes it, so the join is immediate
    server.shutdown(socket.SHUT_RDWR)
    server.close()
    for conn in held:
        conn.close()
    thread.join(5)


class _Unavailable(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def _answer(self):
        type(self).requests.append(f"{self.command} {self.path}")
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint_503():
    """An http.server on loopback answering 503 to every request: (endpoint URL, the requests it saw)."""
    _Unavailable.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Unavailable.requests
    server.shutdown()
    server.server_close()


@pytest.fixture
def published(hub_env, tmp_path, request):
    """A native dictionary committed to the local hub: (pinned hf:// path, module, the folder's files)."""
    card, module = make_folder(tmp_path / "native", seed=7)
    files = {p.name: p.read_bytes() for p in (tmp_path / "native").iterdir()}
    repo = "downtest/" + re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:60].strip("-")
    sha = hub_env.commit(repo, {f"sub/{k}": v for k, v in files.items()}, "add sub")
    return f"hf://{repo}/sub@{sha}", module, files


class Down:
    """A Hub down in one way (`kind`): `apply()` points HF_ENDPOINT at it; `requests` the 503 server saw."""

    def __init__(self, kind: str, endpoint: str, requests: list[str], monkeypatch):
        self.kind, self.endpoint, self.requests, self._monkeypatch = kind, endpoint, requests, monkeypatch

    def apply(self) -> None:
        self._monkeypatch.setenv("DICTIONARIES_HUB_TIMEOUT", str(TIMEOUT))
        self._monkeypatch.setenv("HF_ENDPOINT", self.endpoint)
        if self.kind == "offline":
            self._monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def down(request, monkeypatch, silent_endpoint, endpoint_503):
    """The Hub down in the way the test's parameter names (refused, silent, 503, offline), not yet applied."""
    kind = request.param
    endpoint = {"refused": "http://127.0.0.1:9", "silent": silent_endpoint, "503": endpoint_503[0],
                "offline": "http://127.0.0.1:9"}[kind]
    return Down(kind, endpoint, endpoint_503[1], monkeypatch)


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("down", ["refused", "silent", "503", "offline"], indirect=True)
def test_a_cached_pinned_path_loads_with_the_hub_down(published, down):
    path, module, _ = published
    load_dictionary(path)  # the Hub is up: this fills the cache
    down.apply()
    started = time.monotonic()
    loaded = load_dictionary(path)
    assert time.monotonic() - started < SLACK
    assert same(loaded, module)
    assert down.requests == []  # a pinned commit in the cache needs no request at all


@pytest.mark.parametrize("down", ["refused", "silent", "503"], indirect=True)
def test_a_cached_branch_falls_back_to_its_last_commit_when_the_hub_is_down(published, down):
    path, module, _ = published
    branch = path.split("@")[0]  # main
    load_dictionary(branch)
    down.apply()
    started = time.monotonic()
    assert same(load_dictionary(branch), module)
    assert time.monotonic() - started < TIMEOUT + SLACK


@pytest.mark.parametrize("down", ["refused", "silent", "503"], indirect=True)
def test_nothing_cached_fails_after_one_bounded_request_in_one_line(published, down, caplog):
    path, _, files = published
    down.apply()
    why = {"refused": "could not be reached", "silent": f"did not answer within {TIMEOUT:g} s",
           "503": "answered HTTP 503"}[down.kind]
    location = parse_hub_path(path)
    entries = _entries(files)
    for attempt in (lambda: load_dictionary(path), lambda: fetch(location, entries, progress=False)):
        started = time.monotonic()
        with caplog.at_level(logging.INFO), pytest.raises(HubUnreachableError, match=why) as info:
            attempt()
        assert time.monotonic() - started < TIMEOUT + SLACK
        assert "\n" not in str(info.value)
    assert not [r for r in caplog.records if "retry" in r.getMessage().lower()]
    if down.kind == "503":
        assert len(down.requests) == 2  # one per attempt: no retries


def _entries(files: dict[str, bytes]):
    import hashlib

    from dictionaries.card import FileEntry

    return [FileEntry(path=k, size=len(v), sha256=hashlib.sha256(v).hexdigest()) for k, v in sorted(files.items())]


# ---- a corrupted card.json in the cache ---------------------------------------------------------------
@pytest.mark.parametrize("garbage", [b"\xff\xfe not json", b'{"name": "toy/mlp0/16", "d_in":'],
                         ids=["binary", "cut-short"])
def test_a_corrupted_cached_card_is_fetched_again_and_only_it(published, garbage):
    path, module, files = published
    folder = fetch_hub_folder(path, progress=False)
    card_blob = (folder / "card.json").resolve()
    weights_blob = (folder / "weights.safetensors").resolve()
    assert card_blob != folder / "card.json"  # a snapshot link to a blob
    card_blob.write_bytes(garbage)
    weights_inode = weights_blob.stat().st_ino

    assert same(load_dictionary(path), module)
    assert (folder / "card.json").read_bytes() == files["card.json"]
    assert weights_blob.stat().st_ino == weights_inode  # the weights were not fetched again


def test_a_corrupted_cached_card_with_the_hub_down_names_the_hub(published, monkeypatch):
    path, _, _ = published
    folder = fetch_hub_folder(path, progress=False)
    (folder / "card.json").resolve().write_bytes(b"garbage")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(HubUnreachableError, match="card.json"):
        fetch_hub_folder(path, progress=False)


def test_a_pinned_location_in_the_cache_is_used_without_the_hub(published, monkeypatch):
    """What `fetch` does for a registry entry: every file at the commit, from the cache alone."""
    path, _, files = published
    location = parse_hub_path(path)
    assert isinstance(location, HubLocation)
    fetch(location, _entries(files), progress=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    folder = fetch(location, _entries(files), progress=False)
    assert (folder / "weights.safetensors").read_bytes() == files["weights.safetensors"]
