"""The server's pure logic: tokens (hashed, revocable), pool specs, the per-command
journal that lets a client re-attach (order, no gaps, bounded memory), errors on the
wire (the class the server raised comes back, with its fields)."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import pytest

from agent_vm import errors
from agent_vm.api.admission import PoolSpec, resolve_workspace
from agent_vm.api.local import local_token_path, read_local_token, write_local_token
from agent_vm.api.systemd import render_unit
from agent_vm.api.tokens import TokenStore
from agent_vm.errors import (
    AgentVMError,
    ConfigError,
    NotFoundError,
    QuotaError,
    SandboxIsADirectoryError,
    SandboxStateError,
    ServerError,
    VMDiedError,
    from_wire,
    status_of,
    to_wire,
)
from agent_vm.sandbox import journal
from agent_vm.sandbox.base import Exit, Output
from agent_vm.sandbox.journal import Journal, prune


def test_tokens_are_stored_hashed_and_checked(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    record, token = store.create("ci", max_sandboxes=2)
    assert token.startswith("avm_") and store.verify(token) == record
    on_disk = (tmp_path / "tokens.json").read_text()
    assert token.split("_", 2)[2] not in on_disk  # the secret is not in the file
    assert stat.S_IMODE((tmp_path / "tokens.json").stat().st_mode) == 0o600
    assert "digest" not in json.dumps(record.public())
    for forged in ("", "avm_", token[:-1] + ("A" if token[-1] != "A" else "B"),
                   f"avm_{record.id}_", "Bearer " + token):  # fmt: skip
        assert store.verify(forged) is None
    with pytest.raises(ConfigError, match="exists"):
        store.create("ci")
    store.revoke("ci")
    assert store.verify(token) is None
    with pytest.raises(ConfigError, match="no active token"):
        store.revoke("ci")


@pytest.mark.parametrize(
    ("text", "says"),
    [("light:nat:2", "IMAGE:PROFILE"), (":light:nat:x:2", "numbers"), (":light:nat:3:2", "MIN")],
)
def test_pool_specs(text: str, says: str) -> None:
    assert PoolSpec.parse(":standard:isolated:1:3") == PoolSpec(None, "standard", "isolated", 1, 3)
    with pytest.raises(ConfigError, match=says):
        PoolSpec.parse(text)


async def test_a_journal_replays_from_any_point_and_follows_live() -> None:
    log = Journal()
    for i in range(3):
        log.output("stdout", f"{i}\n".encode())

    async def collect(after: int) -> list[int]:
        return [e.seq async for e in log.follow(after)]

    late = asyncio.create_task(collect(1))
    await asyncio.sleep(0)
    log.output("stderr", b"\xff\x00")  # bytes stay bytes
    log.end(0)
    assert await late == [2, 3, 4]
    assert await collect(-1) == [0, 1, 2, 3, 4]
    events = [e async for e in log.follow()]
    assert events[3] == Output(3, "stderr", b"\xff\x00") and isinstance(events[-1], Exit)
    log.output("stdout", b"late")  # after the end: nothing
    assert log.end(7).exit_code == 0  # the first end stays


def test_a_journal_keeps_bounded_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal, "MAX_KEPT_BYTES", 10)
    log = Journal()
    for _ in range(10):
        log.output("stdout", b"abcd")
    assert log.size <= 10 and log.total == 40

    async def seqs() -> list[int]:
        log.end(0)
        return [e.seq async for e in log.follow()]

    assert asyncio.run(seqs()) == [8, 9, 10]  # numbering survives dropping


def test_ended_journals_are_pruned_oldest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal, "ENDED_KEEP", 2)
    logs = [Journal() for _ in range(4)]
    for log in logs[:3]:
        log.end(0)
    assert prune(logs) == [0]  # three ended, two kept; the running one is never pruned


@pytest.mark.parametrize(
    "error",
    [
        SandboxIsADirectoryError("/etc is a directory", code="is_a_directory", path="/etc"),
        SandboxStateError("paused", state="paused", hint="resume() it first"),
        QuotaError("too many", hint="delete one"),
        NotFoundError("no sandbox"),
        VMDiedError("VM stopped"),
        ConfigError("bad"),
    ],
)
def test_errors_cross_the_wire_as_their_class(error: AgentVMError) -> None:
    body = json.loads(json.dumps(to_wire(error)))
    back = from_wire(status_of(error), body)
    assert type(back) is type(error) and back.message == error.message
    assert back.hint == error.hint
    for field in ("code", "path", "state"):
        assert getattr(back, field, None) == getattr(error, field, None)


def test_status_table() -> None:
    assert status_of(QuotaError("x")) == 429
    assert status_of(SandboxStateError("x", state="paused")) == 409
    assert status_of(NotFoundError("x")) == 404
    assert status_of(SandboxIsADirectoryError("x", code="is_a_directory", path="/")) == 409
    assert status_of(ConfigError("x")) == 400
    assert status_of(errors.PoolExhaustedError("x")) == 503
    assert isinstance(from_wire(500, {"detail": "boom"}), ServerError)
    assert isinstance(from_wire(429, {"error": "NoSuchClass", "detail": "x"}), QuotaError)
    assert from_wire(502, "not json").message == "not json"


def test_the_systemd_unit_runs_serve() -> None:
    unit = render_unit(Path("/opt/agent vm/agent-vm"), ["--pool", ":light:nat:2:4"])
    assert "ExecStart='/opt/agent vm/agent-vm' serve --pool :light:nat:2:4" in unit
    assert "KillSignal=SIGTERM" in unit


def test_workspaces_stay_below_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    assert resolve_workspace(root, "a/b") == (root / "a" / "b").resolve()
    assert resolve_workspace(root, "/a") == (root / "a").resolve()  # rooted at the root
    for bad, says in (("..", "outside"), ("link", "outside"), ("a/../..", "outside"),
                      ("missing", "not a directory")):  # fmt: skip
        with pytest.raises(ConfigError, match=says):
            resolve_workspace(root, bad)
    with pytest.raises(ConfigError, match="shares no host directories"):
        resolve_workspace(None, "a")


def test_a_workspace_may_be_named_by_its_absolute_path_below_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    assert resolve_workspace(root, str(root / "a")) == (root / "a").resolve()
    with pytest.raises(ConfigError, match="not a directory"):  # read as below the root
        resolve_workspace(root, str(tmp_path / "elsewhere"))
    # the local token (root on this host) may share any absolute directory
    assert (
        resolve_workspace(None, str(tmp_path / "elsewhere"), anywhere=True)
        == (tmp_path / "elsewhere").resolve()
    )
    with pytest.raises(ConfigError, match="absolute"):
        resolve_workspace(None, "relative", anywhere=True)


def test_the_local_token_lives_in_memory_and_beside_the_socket(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    token = store.issue_local()
    record = store.verify(token)
    assert record is not None and record.any_workspace and record.metrics
    assert record.name == "local"
    assert not (tmp_path / "tokens.json").exists()  # never written to the token file
    assert TokenStore(tmp_path / "tokens.json").verify(token) is None  # another process
    socket = tmp_path / "api.sock"
    path = write_local_token(socket, token)
    assert path == local_token_path(socket) == tmp_path / "api.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_local_token(f"unix://{socket}") == token
    assert read_local_token(tmp_path / "other.sock") is None
    assert store.verify(token[:-1] + "x") is None


def test_the_openapi_document_names_every_route(tmp_path: Path) -> None:
    from agent_vm.api.app import create_app
    from agent_vm.api.service import SandboxService

    def no_service() -> SandboxService:
        raise AssertionError("the schema needs no service")

    schema = create_app(no_service, TokenStore(tmp_path / "tokens.json")).openapi()
    paths = set(schema["paths"])
    assert {
        "/v1/sandboxes",
        "/v1/sandboxes/{sandbox_id}",
        "/v1/sandboxes/{sandbox_id}/keepalive",
        "/v1/sandboxes/{sandbox_id}/resume",
        "/v1/sandboxes/{sandbox_id}/pause",
        "/v1/sandboxes/{sandbox_id}/stats",
        "/v1/sandboxes/{sandbox_id}/executions",
        "/v1/executions/{execution_id}",
        "/v1/executions/{execution_id}/events",
        "/v1/executions/{execution_id}/stdin",
        "/v1/executions/{execution_id}/resize",
        "/v1/executions/{execution_id}/kill",
        "/v1/executions/{execution_id}/signal",
        "/v1/sandboxes/{sandbox_id}/files",
        "/v1/sandboxes/{sandbox_id}/files/content",
        "/v1/sandboxes/{sandbox_id}/files/tar",
        "/v1/sandboxes/{sandbox_id}/files/watch",
        "/v1/sandboxes/{sandbox_id}/policy",
        "/v1/sandboxes/{sandbox_id}/blocked",
        "/v1/pools",
        "/healthz",
        "/metrics",
    } <= paths, paths
    create = schema["components"]["schemas"]["CreateSandbox"]["properties"]
    assert {"labels", "lifetime_seconds", "policy", "workspace", "anomaly_action"} <= set(create)
    for path, methods in schema["paths"].items():  # every answer is described
        for method, operation in methods.items():
            ok = {code: r for code, r in operation["responses"].items() if code.startswith("2")}
            assert ok, (method, path)
            if path not in ("/metrics", "/healthz") and "204" not in ok:
                assert any("content" in r for r in ok.values()), (method, path)
            assert "404" in operation["responses"] and "409" in operation["responses"], path
