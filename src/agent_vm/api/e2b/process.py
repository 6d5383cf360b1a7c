"""envd's ``process.Process`` over the service: E2B's commands and terminals are the
service's commands, named by a pid the door hands out (``door.new_pid``).

Start runs ``cmd`` with ``args`` exec'd (the SDK sends ``/bin/bash -l -c CMD``) as the
request's user, in its home unless ``cwd`` says otherwise, with the sandbox's env vars
under the request's; the deadline the SDK sets on the stream is the command's timeout.
Connect follows a command from its start (everything it wrote so far is kept, so a
client that comes back misses nothing). A stream ends with E2B's EndEvent: the exit
code, ``exited``, and a status line like Go's (``exit status 1``, ``signal: killed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal as signals
import time
from collections.abc import AsyncIterator
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from e2b.envd.process import process_pb as pb
from protobuf import Oneof

from agent_vm.api.e2b import door
from agent_vm.api.e2b.errors import rpc_errors, translated
from agent_vm.errors import AgentVMError
from agent_vm.sandbox.base import CommandSource, CommandSpec, Exit, Output, SandboxState

KEEPALIVE_SECONDS = 50.0
# a Start's deadline kills the command here (``_events``); the guest's own timeout is
# this much later, a backstop should the server not get to it
TIMEOUT_GRACE = 2.0
_ALIVE = frozenset({SandboxState.RUNNING, SandboxState.PAUSED})


def _event(field: str, value: Any) -> pb.ProcessEvent:
    """A ProcessEvent of one kind (the generated types want a literal field name)."""
    return pb.ProcessEvent(event=Oneof(field, value))  # type: ignore[arg-type]


def _status(exit: Exit) -> str:
    if exit.signal is not None:
        name = signals.Signals(exit.signal).name[3:].lower() if exit.signal > 0 else "?"
        return f"signal: {'killed' if name == 'kill' else name}"
    if exit.timed_out:
        return "signal: killed (timeout)"
    return f"exit status {exit.exit_code}"


def _end(exit: Exit) -> pb.ProcessEvent:
    code = exit.exit_code if exit.exit_code is not None else -1
    end = pb.ProcessEvent.EndEvent(
        exit_code=code, exited=exit.exit_code is not None, status=_status(exit),
        error=exit.error or None,
    )  # fmt: skip
    return _event("end", end)


def _data(output: Output, pty: bool) -> pb.ProcessEvent:
    field = "pty" if pty else output.stream
    data = pb.ProcessEvent.DataEvent(output=Oneof(field, output.data))  # type: ignore[arg-type]
    return _event("data", data)


async def _events(
    source: CommandSource, pid: int, pty: bool, deadline: float | None = None
) -> AsyncIterator[pb.ProcessEvent]:
    """Start, data and end events; a keepalive when nothing happened for a while. At
    ``deadline`` (monotonic: a Start's timeout) the command is killed and the stream
    ends with deadline_exceeded, as envd's does (the SDK's TimeoutException)."""
    yield _event("start", pb.ProcessEvent.StartEvent(pid=pid))
    stream = aiter(source.follow())
    pending: asyncio.Task[Any] | None = None
    try:
        while True:
            pending = pending or asyncio.ensure_future(anext(stream))
            wait = KEEPALIVE_SECONDS
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    with contextlib.suppress(AgentVMError):
                        await source.kill()
                    raise ConnectError(Code.DEADLINE_EXCEEDED, "the command's timeout ran out")
            done, _ = await asyncio.wait({pending}, timeout=wait)
            if not done:
                if deadline is None or time.monotonic() < deadline:
                    yield _event("keepalive", pb.ProcessEvent.KeepAlive())
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            if isinstance(event, Output):
                yield _data(event, pty)
            elif _gone(door.current.get()):
                door.dropped.get([]).append(True)  # the connection drops: no end event
                return
            else:
                yield _end(event)
                return
    finally:
        if pending is not None:
            pending.cancel()


def _gone(target: door.Target) -> bool:
    """The sandbox went away under the command (killed, expired, its VM died)."""
    held = target.service.sandboxes.get(target.id)
    return held is not target.hosted or held.handle.state not in _ALIVE


def _selected(target: door.Target, selector: pb.ProcessSelector | None) -> int:
    match selector.selector if selector is not None else None:
        case Oneof(field="pid", value=pid):
            return int(pid)
        case Oneof(field="tag", value=tag):
            for pid, config in target.hosted.door.get("configs", {}).items():
                if config.get("tag") == tag:
                    return int(pid)
            raise ConnectError(Code.NOT_FOUND, f"no process with tag {tag!r}")
    raise ConnectError(Code.INVALID_ARGUMENT, "the request selects no process (pid or tag)")


async def _source(selector: pb.ProcessSelector | None) -> tuple[int, CommandSource]:
    target = door.current.get()
    pid = _selected(target, selector)
    command_id = door.pids(target.hosted).get(pid)
    if command_id is None:
        raise ConnectError(Code.NOT_FOUND, f"process with pid {pid} not found")
    return pid, await target.service.command(target.owner, command_id)


class ProcessService:
    """``process.Process`` (``ProcessASGIApplication`` serves it)."""

    @rpc_errors
    async def list(self, request: pb.ListRequest, ctx: RequestContext[Any, Any]) -> pb.ListResponse:
        target = door.current.get()
        running = {
            c.id for c in await target.service.commands(target.owner, target.id) if not c.done
        }
        processes = []
        for pid, command_id in door.pids(target.hosted).items():
            if command_id not in running:
                continue
            config = target.hosted.door["configs"][pid]
            processes.append(pb.ProcessInfo(
                config=pb.ProcessConfig(cmd=config["cmd"], args=config["args"],
                                        envs=config["envs"], cwd=config["cwd"]),
                pid=pid, tag=config.get("tag"),
            ))  # fmt: skip
        return pb.ListResponse(processes=processes)

    async def start(
        self, request: pb.StartRequest, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[pb.StartResponse]:
        target = door.current.get()
        async with translated():
            process = request.process or pb.ProcessConfig()
            if not process.cmd:
                raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is empty")
            size = request.pty.size if request.pty is not None else None
            deadline = ctx.timeout_ms
            timeout = deadline / 1000 + TIMEOUT_GRACE if deadline else None
            cwd = target.path(process.cwd) if process.cwd else target.home
            spec = CommandSpec(
                cmd=(process.cmd, *process.args), envs={**target.envs, **dict(process.envs)},
                cwd=cwd, user=target.user, timeout=timeout,
                stdin_open=bool(request.stdin) or size is not None,
                pty=(size.cols or 80, size.rows or 24) if size is not None else None,
            )  # fmt: skip
            info = await target.service.run(target.owner, target.id, spec)
            source = await target.service.command(target.owner, info.id)
            config = {"cmd": process.cmd, "args": list(process.args), "envs": dict(process.envs),
                      "cwd": process.cwd, "tag": request.tag}  # fmt: skip
            pid = door.new_pid(target.hosted, info.id, config)
        ends = time.monotonic() + deadline / 1000 if deadline else None
        async for event in _events(source, pid, size is not None, ends):
            yield pb.StartResponse(event=event)

    async def connect(
        self, request: pb.ConnectRequest, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[pb.ConnectResponse]:
        async with translated():
            pid, source = await _source(request.process)
        async for event in _events(source, pid, source.info().pty):
            yield pb.ConnectResponse(event=event)

    @rpc_errors
    async def update(
        self, request: pb.UpdateRequest, ctx: RequestContext[Any, Any]
    ) -> pb.UpdateResponse:
        _, source = await _source(request.process)
        size = request.pty.size if request.pty is not None else None
        if size is not None:
            await source.resize(size.cols, size.rows)
        return pb.UpdateResponse()

    @rpc_errors
    async def stream_input(
        self, request: AsyncIterator[pb.StreamInputRequest], ctx: RequestContext[Any, Any]
    ) -> pb.StreamInputResponse:
        source: CommandSource | None = None
        async for message in request:
            match message.event:
                case Oneof(field="start", value=start):
                    if isinstance(start, pb.StreamInputRequest.StartEvent):
                        _, source = await _source(start.process)
                case Oneof(field="data", value=data) if source is not None:
                    if isinstance(data, pb.StreamInputRequest.DataEvent):
                        await source.send_stdin(_input(data.input))
        return pb.StreamInputResponse()

    @rpc_errors
    async def send_input(
        self, request: pb.SendInputRequest, ctx: RequestContext[Any, Any]
    ) -> pb.SendInputResponse:
        _, source = await _source(request.process)
        await source.send_stdin(_input(request.input))
        return pb.SendInputResponse()

    @rpc_errors
    async def send_signal(
        self, request: pb.SendSignalRequest, ctx: RequestContext[Any, Any]
    ) -> pb.SendSignalResponse:
        _, source = await _source(request.process)
        if request.signal == pb.Signal.SIGKILL:
            await source.kill()
        elif request.signal == pb.Signal.SIGTERM:
            await source.signal(signals.SIGTERM)
        else:
            raise ConnectError(Code.INVALID_ARGUMENT, "only SIGTERM and SIGKILL can be sent")
        return pb.SendSignalResponse()

    @rpc_errors
    async def close_stdin(
        self, request: pb.CloseStdinRequest, ctx: RequestContext[Any, Any]
    ) -> pb.CloseStdinResponse:
        _, source = await _source(request.process)
        await source.close_stdin()
        return pb.CloseStdinResponse()


def _input(given: pb.ProcessInput | None) -> bytes:
    match given.input if given is not None else None:
        case Oneof(field="stdin" | "pty", value=data):
            return bytes(data)
    return b""
