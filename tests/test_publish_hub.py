"""Publishing to the real Hub, tested at the boundary no machine here can reach: `FakeHfApi` stands in for
huggingface_hub's HfApi and records what it is asked; a wrong token is also tried with the real client
against a loopback server that refuses it as the Hub does. Nothing is uploaded without a good token, the
commit holds exactly the staged files, and an interrupted commit registers nothing."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading

import pytest

from dictionaries.errors import HubAuthError, PublishError
from dictionaries.files import sha256_of
from dictionaries.registry import HubLocation, load_registry

from helpers import make_folder, snapshot


class FakeHfApi:
    """FAKE at the boundary no machine here can reach (the real Hub): records what huggingface_hub's
    HfApi is asked to do. A token other than GOOD_TOKEN is answered like the Hub answers a wrong one."""

    GOOD_TOKEN = "hf_test_good_token"
    calls: list = []
    fail_commit: Exception | None = None

    def __init__(self, endpoint=None, token=None, **kw):
        self.endpoint, self.token = endpoint, token

    def _check(self, what):
        FakeHfApi.calls.append((what, self.endpoint))
        if self.token != self.GOOD_TOKEN:
            import httpx2
            from huggingface_hub.errors import HfHubHTTPError

            response = httpx2.Response(401, request=httpx2.Request("POST", f"{self.endpoint}/api/x"))
            raise HfHubHTTPError("401 Client Error: Invalid credentials in Authorization header", response=response)

    def file_exists(self, repo_id, filename, *, revision=None, **kw):
        self._check("file_exists")
        return False

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kw):
        self._check(("create_repo", repo_id, private))

    def create_branch(self, repo_id, *, branch, exist_ok=False, **kw):
        self._check(("create_branch", repo_id, branch))

    def create_commit(self, repo_id, operations, *, commit_message, revision=None, **kw):
        self._check("create_commit")
        if FakeHfApi.fail_commit is not None:
            raise FakeHfApi.fail_commit
        ops = [(op.path_in_repo, hashlib.sha256(op.path_or_fileobj).hexdigest() if isinstance(op.path_or_fileobj, bytes)
                else sha256_of(op.path_or_fileobj)) for op in operations]
        FakeHfApi.calls.append(("committed", repo_id, revision, commit_message, ops))
        return type("CommitInfo", (), {"oid": "ab" * 20})()


class _NotFound(http.server.BaseHTTPRequestHandler):
    """Answers 404 to every request: a server that is up (the reachability check's one request passes)."""

    def do_GET(self):
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hf(monkeypatch):
    """FakeHfApi in place of huggingface_hub.HfApi, HF_TOKEN set to its good token, and HF_ENDPOINT at a
    loopback http.server that answers (the reachability check passes; FakeHfApi answers the rest)."""
    FakeHfApi.calls = []
    FakeHfApi.fail_commit = None
    monkeypatch.setattr("huggingface_hub.HfApi", FakeHfApi)
    monkeypatch.setenv("HF_TOKEN", FakeHfApi.GOOD_TOKEN)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield FakeHfApi
    server.shutdown()
    server.server_close()



def test_real_hub_create_commit_gets_exactly_the_staged_files(tmp_path, fake_hf, registry):
    from dictionaries.publish import publish

    card, _ = make_folder(tmp_path / "native")
    endpoint = os.environ["HF_ENDPOINT"]
    result = publish(tmp_path / "native", "org/real", subfolder="a/b", branch="dev", private=True, register=True)
    commits = [c for c in fake_hf.calls if c[0] == "committed"]
    assert len(commits) == 1
    _, repo, revision, message, ops = commits[0]
    assert (repo, revision) == ("org/real", "dev")
    assert card.name in message
    weights = next(i for i in card.files.items if i.path == "weights.safetensors")
    expected = {"a/b/card.json": sha256_of(tmp_path / "native" / "card.json"),
                "a/b/weights.safetensors": weights.sha256}
    got = dict(ops)
    assert set(got) == {*expected, "a/b/README.md"}
    assert all(got[k] == v for k, v in expected.items())
    assert (("create_repo", "org/real", True), endpoint) in fake_hf.calls
    assert (("create_branch", "org/real", "dev"), endpoint) in fake_hf.calls
    assert result.location == HubLocation(repo="org/real", revision="ab" * 20, subfolder="a/b")
    assert load_registry().get(card.name).location == result.location


def test_no_token_is_refused_before_any_request(tmp_path, fake_hf, monkeypatch, registry):
    from dictionaries.publish import publish

    make_folder(tmp_path / "native")
    monkeypatch.delenv("HF_TOKEN")
    before = snapshot(registry)
    with pytest.raises(HubAuthError, match="no Hub token") as info:
        publish(tmp_path / "native", "org/real", register=True)
    assert fake_hf.calls == []
    assert snapshot(registry) == before
    assert "Nothing was uploaded" in str(info.value)


def test_wrong_token_is_refused_and_never_shown(tmp_path, fake_hf, monkeypatch, registry):
    from dictionaries.publish import publish

    make_folder(tmp_path / "native")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_secret_123")
    before = snapshot(registry)
    with pytest.raises(HubAuthError, match="refused the token") as info:
        publish(tmp_path / "native", "org/real", register=True)
    assert "hf_wrong_secret_123" not in str(info.value)
    assert not [c for c in fake_hf.calls if c[0] == "committed"]
    assert snapshot(registry) == before


class _Refuse401(http.server.BaseHTTPRequestHandler):
    """Answers every request the way the Hub answers a wrong token (401, Invalid credentials)."""

    seen: list = []

    def _answer(self):
        _Refuse401.seen.append((self.command, self.path, self.headers.get("authorization")))
        body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Message", "Invalid credentials in Authorization header")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = _answer

    def log_message(self, *args):
        pass


def test_wrong_token_through_the_real_client(tmp_path, monkeypatch, registry):
    """The real huggingface_hub client against a loopback server that refuses the token as the Hub does."""
    from dictionaries.publish import publish

    make_folder(tmp_path / "native")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuse401)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Refuse401.seen = []
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_secret_456")
    try:
        with pytest.raises(HubAuthError, match="HTTP 401") as info:
            publish(tmp_path / "native", "org/real", endpoint=f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
    assert "hf_wrong_secret_456" not in str(info.value)
    assert _Refuse401.seen
    assert not any("commit" in path or "preupload" in path for _, path, _ in _Refuse401.seen)


@pytest.mark.parametrize("interruption,raised", [
    (ConnectionResetError("connection reset by peer while uploading"), PublishError),
    (KeyboardInterrupt(), KeyboardInterrupt)])
def test_interrupted_hub_commit_registers_nothing(interruption, raised, tmp_path, fake_hf, registry):
    from dictionaries.publish import publish

    make_folder(tmp_path / "native")
    fake_hf.fail_commit = interruption
    before = snapshot(registry)
    with pytest.raises(raised):
        publish(tmp_path / "native", "org/real", register=True)
    assert snapshot(registry) == before
    assert not [c for c in fake_hf.calls if c[0] == "committed"]
