"""The server's pure logic: tokens (hashed, revocable), pool specs, the per-execution
event log that lets a client re-attach (order, no gaps, bounded memory)."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import pytest

from agent_vm.api import service
from agent_vm.api.local import local_token_path, read_local_token, write_local_token
from agent_vm.api.service import Execution, PoolSpec, resolve_workspace
from agent_vm.api.systemd import render_unit
from agent_vm.api.tokens import TokenStore
from agent_vm.errors import ConfigError


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


async def test_an_execution_replays_from_any_point_and_follows_live() -> None:
    execution = Execution("ex-1", "sb-1", "tok")
    for i in range(3):
        execution.add({"type": "stdout", "text": f"{i}\n"}, 2)

    async def collect(after: int) -> list[int]:
        return [e["seq"] async for e in execution.follow(after)]

    late = asyncio.create_task(collect(1))
    await asyncio.sleep(0)
    execution.add({"type": "stdout", "text": "3\n"}, 2)
    execution.add({"type": "result", "exit_code": 0})
    execution.done = True
    execution.changed.set()
    assert await late == [2, 3, 4]
    assert await collect(-1) == [0, 1, 2, 3, 4]


def test_an_execution_keeps_bounded_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "MAX_EVENT_BYTES", 10)
    execution = Execution("ex-1", "sb-1", "tok")
    for _ in range(10):
        execution.add({"type": "stdout", "text": "abcd"}, 4)
    assert execution.size <= 10 and execution.dropped == 8
    assert [e["seq"] for e in execution.events] == [8, 9]  # numbering survives dropping


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

    def no_service() -> service.SandboxService:
        raise AssertionError("the schema needs no service")

    schema = create_app(no_service, TokenStore(tmp_path / "tokens.json")).openapi()
    paths = set(schema["paths"])
    assert {
        "/v1/sandboxes",
        "/v1/sandboxes/{sandbox_id}",
        "/v1/sandboxes/{sandbox_id}/keepalive",
        "/v1/sandboxes/{sandbox_id}/resume",
        "/v1/sandboxes/{sandbox_id}/executions",
        "/v1/executions/{execution_id}/events",
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
