"""Every call in every state: a call the state forbids fails at once with a state error
and touches nothing; a call it allows gets past the guard. For both sandbox handles
(local and HTTP; their VM and their server are tripwires here) and the agent channel."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from agent_vm.communication.channel import AgentChannel, ChannelState
from agent_vm.communication.transport import Transport
from agent_vm.errors import (
    AgentVMError,
    ChannelClosedError,
    ChannelError,
    NotFoundError,
    SandboxStateError,
)
from agent_vm.network.policy import EgressPolicy
from agent_vm.protocol.files import FileRequest
from agent_vm.protocol.messages import Execute
from agent_vm.sandbox.base import ALLOWED, CommandSpec, SandboxHandle, SandboxSpec, SandboxState
from agent_vm.sandbox.http import HttpSandbox
from agent_vm.sandbox.local import LocalSandbox
from agent_vm.sandbox.wire import sandbox_from


class Touched(Exception):
    """The guard let the call through to the machinery."""


class Tripwire:
    """Any attribute is a callable (or awaitable) that raises ``Touched``."""

    def __getattr__(self, name: str) -> Any:
        def touched(*args: object, **kwargs: object) -> Any:
            raise Touched(name)

        return touched


async def _call(value: object) -> object:
    return await value if isinstance(value, Awaitable) else value


CALLS: dict[str, Callable[[SandboxHandle], object]] = {
    "run": lambda h: h.run(CommandSpec("true")),
    "files": lambda h: h.files,
    "set_policy": lambda h: h.set_policy(EgressPolicy()),
    "command": lambda h: h.command("ex-1"),
    "commands": lambda h: h.commands(),
    "policy": lambda h: h.policy(),
    "blocked": lambda h: h.blocked(),
    "blocked_count": lambda h: h.blocked_count(),
    "stats": lambda h: h.stats(),
    "pause": lambda h: h.pause(),
    "resume": lambda h: h.resume(),
    "snapshot": lambda h: h.snapshot("s1"),
    "expose": lambda h: h.expose(8000),
    "fork": lambda h: h.fork(2),
    "close": lambda h: h.close(),
}


def local() -> SandboxHandle:
    async def release(vm: object) -> None:
        raise Touched("release")

    return LocalSandbox(Tripwire(), SandboxSpec(), release, Tripwire())  # type: ignore[arg-type]


def remote() -> SandboxHandle:
    info = sandbox_from({"id": "sb-1", "state": "running", "image": None, "profile": "light",
                         "network": "nat", "created_at": "2026-12-06T12:00:00-05:00"})  # fmt: skip
    return HttpSandbox(Tripwire(), info)  # type: ignore[arg-type]


def test_the_table_names_every_call() -> None:
    assert set(CALLS) == set(ALLOWED)


@pytest.mark.parametrize("make", [local, remote], ids=["local", "http"])
@pytest.mark.parametrize("state", list(SandboxState), ids=lambda s: s.value)
@pytest.mark.parametrize("call", sorted(CALLS))
async def test_every_call_in_every_state(
    make: Callable[[], SandboxHandle], state: SandboxState, call: str
) -> None:
    handle = make()
    handle.state = state
    if state not in ALLOWED[call]:
        with pytest.raises(SandboxStateError) as refused:
            await asyncio.wait_for(_call(CALLS[call](handle)), 1)
        assert refused.value.state == state.value and state.value in refused.value.message
        assert refused.value.hint  # what to do
        return
    try:
        await asyncio.wait_for(_call(CALLS[call](handle)), 1)
    except (Touched, NotFoundError, AttributeError, TypeError):
        pass  # past the guard: the machinery (a tripwire here) was reached
    except SandboxStateError as exc:
        raise AssertionError(f"{call} refused in {state.value}") from exc


# ---------------------------------------------------------------- the agent channel


class NoTransport(Transport):
    async def open(self) -> Any:
        raise OSError("no transport in this test")

    def describe(self) -> str:
        return "nothing"


class Writer:
    def __init__(self) -> None:
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        return None

    async def wait_closed(self) -> None:
        return None


CHANNEL_CALLS: dict[str, Callable[[AgentChannel], Awaitable[object]]] = {
    "start": lambda c: c.start(Execute(shell="true"), on_stdout=None),
    "send_input": lambda c: c.send_input(1, b"x"),
    "signal": lambda c: c.signal(1, 15),
    "resize": lambda c: c.resize(1, 80, 24),
    "file_request": lambda c: c.file_request(FileRequest("stat", "/")),
    "request_shutdown": lambda c: c.request_shutdown(),
}


@pytest.mark.parametrize("state", list(ChannelState), ids=lambda s: s.value)
@pytest.mark.parametrize("call", sorted(CHANNEL_CALLS))
async def test_every_channel_call_in_every_state(state: ChannelState, call: str) -> None:
    channel = AgentChannel(NoTransport(), name="t")
    writer = Writer()
    channel._writer = writer  # type: ignore[assignment]
    channel.state = state
    if state is ChannelState.CLOSED:
        channel._failure = ChannelClosedError("channel to t was closed by the host")
    if state is ChannelState.READY:
        await asyncio.wait_for(CHANNEL_CALLS[call](channel), 1)
        assert writer.written  # a frame went out
        return
    expected = ChannelClosedError if state is ChannelState.CLOSED else ChannelError
    with pytest.raises(expected, match="closed" if expected is ChannelClosedError else "not ready"):
        await asyncio.wait_for(CHANNEL_CALLS[call](channel), 1)
    assert writer.written == b""


@pytest.mark.parametrize("state", [s for s in ChannelState if s is not ChannelState.NEW])
async def test_a_channel_connects_once(state: ChannelState) -> None:
    channel = AgentChannel(NoTransport(), name="t")
    channel.state = state
    with pytest.raises(ChannelError, match="connect\\(\\) runs once"):
        await channel.connect(timeout=0.1)
    assert channel.state is state  # nothing changed


async def test_a_channel_that_cannot_connect_is_closed_with_the_reason() -> None:
    channel = AgentChannel(NoTransport(), name="t")
    with pytest.raises(AgentVMError, match="cannot open nothing"):
        await channel.connect(timeout=0.05)
    assert channel.state is ChannelState.CLOSED
