"""The service, the routes, the wire and the HTTP backend, end to end in one process over
a real HTTP server (uvicorn on a Unix socket) and a fake backend: no VM. Every check
the service owns (owners, quotas, state, audit) and every error on the wire is shown
here; the same calls against real VMs are in tests/integration/test_sandbox.py."""

from __future__ import annotations

import asyncio
import json
import resource
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import uvicorn

from agent_vm.api.app import create_app
from agent_vm.api.service import SandboxService
from agent_vm.api.tokens import TokenStore
from agent_vm.api.watch import Watch
from agent_vm.config import Settings
from agent_vm.errors import (
    ConfigError,
    NotFoundError,
    QuotaError,
    SandboxFileNotFoundError,
    SandboxIsADirectoryError,
    SandboxStateError,
    ServerUnavailableError,
)
from agent_vm.monitoring.audit import AuditLogger
from agent_vm.sandbox import AsyncSandbox, SandboxState
from agent_vm.sandbox.base import CommandSpec, SandboxSpec
from agent_vm.sandbox.http import HttpBackend
from tests.unit.fakebackend import FakeBackend

NON_UTF8 = b"\303\050\377\000end"  # invalid UTF-8, a NUL: must arrive as it left


@dataclass
class Served:
    socket: str
    token: str
    other: str  # a second tenant
    backend: FakeBackend
    service: SandboxService
    server: uvicorn.Server
    thread: threading.Thread
    audit: Path

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve(tmp_path: Path, max_sandboxes: int = 4, max_executions: int = 3) -> Served:
    tokens = TokenStore(tmp_path / "tokens.json")
    _, token = tokens.create("alice", max_sandboxes=max_sandboxes, max_executions=max_executions)
    _, other = tokens.create("bob")
    backend = FakeBackend()
    audit = tmp_path / "audit.log"
    holder: dict[str, SandboxService] = {}
    settings = Settings(state_dir=tmp_path / "state", monitor_interval=0.2)

    app = create_app(lambda: holder["service"], tokens)

    async def lifespan(_: object) -> AsyncIterator[None]:
        service = SandboxService(backend, Watch(settings, audit=AuditLogger(audit)))
        service.start()
        holder["service"] = service
        yield
        await service.close()

    from contextlib import asynccontextmanager

    app.router.lifespan_context = asynccontextmanager(lifespan)
    socket = str(tmp_path / "api.sock")
    server = uvicorn.Server(uvicorn.Config(app, uds=socket, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    return Served(socket, token, other, backend, holder["service"], server, thread, audit)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    running = serve(tmp_path)
    yield running
    running.stop()


@pytest_asyncio.fixture
async def sb(served: Served) -> AsyncIterator[AsyncSandbox]:
    async with AsyncSandbox(server=served.socket, token=served.token, labels={"k": "v"}) as box:
        yield box


async def test_output_and_stdin_are_byte_exact(sb: AsyncSandbox) -> None:
    result = await sb.commands.run(f"bytes {NON_UTF8.hex()}")
    assert result.stdout_bytes == NON_UTF8 and result.exit_code == 0
    echoed = await sb.commands.run("cat", stdin=NON_UTF8)
    assert echoed.stdout_bytes == NON_UTF8
    seen: list[bytes] = []
    await sb.commands.run(f"bytes {NON_UTF8.hex()}", on_stdout_bytes=seen.append)
    assert b"".join(seen) == NON_UTF8
    failed = await sb.commands.run("fail 3")
    assert (failed.exit_code, failed.stderr) == (3, "failed\n")


async def test_background_commands_stream_stdin_and_reattach(
    sb: AsyncSandbox, served: Served
) -> None:
    handle = await sb.commands.run("cat", background=True, stdin=True)
    await handle.send_stdin(b"one ")
    await handle.send_stdin("two")
    listed = await sb.commands.list()
    assert [c.id for c in listed if not c.done] == [handle.id]
    # another client (same token) comes back to it by id, with everything so far
    again = await AsyncSandbox.connect(sb.sandbox_id, server=served.socket, token=served.token)
    other = await again.commands.connect(handle.id)
    await again.commands.close_stdin(handle.id)
    assert (await other.wait(10)).stdout == "one two"
    assert (await handle.wait(10)).stdout_bytes == b"one two"
    await again._backend.close()


async def test_signals_and_kill(sb: AsyncSandbox) -> None:
    waiting = await sb.commands.run("wait", background=True)
    await waiting.send_signal("TERM")
    assert (await waiting.wait(10)).exit_code == 128 + 15
    killed = await sb.commands.run("wait", background=True)
    await sb.commands.kill(killed.id)
    result = await killed.wait(10)
    assert result.exit_code == 137 and result.signal == 9
    with pytest.raises(ConfigError, match="no signal"):
        await killed.send_signal("NOPE")
    with pytest.raises(NotFoundError):
        await sb.commands.connect("ex-unknown")


async def test_a_terminal_is_a_command(sb: AsyncSandbox) -> None:
    seen = bytearray()
    pty = await sb.pty.create(100, 30, seen.extend, cmd="cat")
    await sb.pty.resize(pty, 120, 40)
    await sb.pty.send_input(pty, "keys")
    await sb.pty.send_input(pty, b"\x04")
    assert await sb.pty.wait(pty, 10) == 0
    assert bytes(seen) == b"keys"


async def test_a_paused_sandbox_refuses_at_once_until_resumed(sb: AsyncSandbox) -> None:
    await sb.pause()
    assert sb.state is SandboxState.PAUSED
    started = time.monotonic()
    with pytest.raises(SandboxStateError, match="paused") as refused:
        await sb.commands.run("echo no")
    assert refused.value.state == "paused" and time.monotonic() - started < 2
    with pytest.raises(SandboxStateError):
        await sb.files.read("/x")
    await sb.resume()
    assert (await sb.commands.run("echo yes")).stdout == "yes\n"


async def test_file_errors_name_the_path(sb: AsyncSandbox) -> None:
    assert await sb.files.write("/d/blob", NON_UTF8) == len(NON_UTF8)
    assert await sb.files.read("/d/blob", format="bytes") == NON_UTF8
    with pytest.raises(SandboxIsADirectoryError) as directory:
        await sb.files.read("/d")
    assert directory.value.path == "/d" and isinstance(directory.value, IsADirectoryError)
    with pytest.raises(SandboxFileNotFoundError) as missing:
        await sb.files.read("/nope")
    assert missing.value.path == "/nope" and isinstance(missing.value, FileNotFoundError)
    assert [e.name for e in await sb.files.list("/d")] == ["blob"]
    assert await sb.files.exists("/d/blob") and not await sb.files.exists("/e")


async def test_quotas_and_tenancy(served: Served) -> None:
    boxes = [await AsyncSandbox.create(server=served.socket, token=served.token) for _ in range(4)]
    with pytest.raises(QuotaError, match="its limit") as over:
        await AsyncSandbox.create(server=served.socket, token=served.token)
    assert over.value.hint and "delete one" in over.value.hint
    running = [await boxes[0].commands.run("wait", background=True) for _ in range(3)]
    with pytest.raises(QuotaError, match="executions running"):
        await boxes[0].commands.run("echo one too many")
    await running[0].kill()
    await running[0].wait(10)
    for _ in range(50):  # the service counts the end when its follower sees it
        try:
            await boxes[0].commands.run("echo fits again")
            break
        except QuotaError:
            await asyncio.sleep(0.05)
    else:
        raise AssertionError("the quota did not come back after a command ended")
    with pytest.raises(NotFoundError):  # another token sees nothing of alice's
        await AsyncSandbox.connect(boxes[0].sandbox_id, server=served.socket, token=served.other)
    for box in boxes:
        await box.kill()


async def test_labels_list_and_a_refused_body(served: Served, sb: AsyncSandbox) -> None:
    backend = HttpBackend(served.socket, served.token)
    try:
        assert [h.id for h in await backend.list()] == [sb.sandbox_id]
        data = await backend.client.json("GET", "/v1/sandboxes", params={"label": "k=v"})
        assert [item["id"] for item in data] == [sb.sandbox_id]
        answer = await backend.client.http.post(
            f"/v1/sandboxes/{sb.sandbox_id}/executions", json={"cmd": "x", "nope": 1}
        )
        body = answer.json()
        assert answer.status_code == 422 and body["error"] == "ConfigError"
        assert isinstance(body["detail"], str) and "nope" in body["detail"]
        assert "\n" not in body["detail"]
        with pytest.raises(ConfigError, match="invalid request: timeout"):
            await backend.client.call(
                "POST", f"/v1/sandboxes/{sb.sandbox_id}/executions",
                json={"cmd": "x", "timeout": -1},
            )  # fmt: skip
        assert [p.min_size for p in await backend.pools()] == [1]
    finally:
        await backend.close()


async def test_the_audit_hears_everything_once(served: Served) -> None:
    async with AsyncSandbox(server=served.socket, token=served.token) as box:
        await box.commands.run("echo hi")
        await box.files.write("/a", b"x")
        await box.pause()
        await box.resume()
    for _ in range(50):
        events = [json.loads(line)["event"] for line in served.audit.read_text().splitlines()]
        if "sandbox_deleted" in events and "execution_finished" in events:
            break
        await asyncio.sleep(0.05)
    assert events[:2] == ["sandbox_created", "execution_started"]
    assert {"execution_finished", "file_transfer", "sandbox_paused", "sandbox_resumed",
            "sandbox_deleted"} <= set(events), events  # fmt: skip


async def test_a_server_that_dies_mid_command_ends_the_wait(tmp_path: Path) -> None:
    """No spin (the old client looped at 100 % CPU forever): it reconnects with backoff
    and gives up after its budget with one clear error."""
    running = serve(tmp_path)
    backend = HttpBackend(running.socket, running.token, reconnect_seconds=2.0)
    handle = await backend.acquire(SandboxSpec())
    source = await handle.run(CommandSpec("wait"))
    events = source.follow()
    waiter = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0.3)
    running.server.force_exit = True  # the server goes away under the open stream
    running.stop()
    Path(running.socket).unlink(missing_ok=True)
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    began = time.monotonic()
    with pytest.raises(ServerUnavailableError, match="no answer for 2 s"):
        await asyncio.wait_for(waiter, 20)
    spent = time.monotonic() - began
    after = resource.getrusage(resource.RUSAGE_SELF)
    busy = (after.ru_utime + after.ru_stime) - (cpu.ru_utime + cpu.ru_stime)
    assert 1.5 < spent < 10, spent
    assert busy < 0.5 * spent, (busy, spent)  # backing off, not spinning
    await backend.close()


async def test_unreachable_server_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ServerUnavailableError, match="cannot reach the agent-vm server"):
        await AsyncSandbox.create(server=str(tmp_path / "none.sock"), token="avm_x_y")
