"""Commands (``executions``): start one in a sandbox (a terminal too: ``pty``), follow
its events from any sequence number (server-sent events; reconnect with the last
``id:`` seen), feed its stdin, resize its terminal, signal or kill it."""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from agent_vm.api.deps import Service, Token
from agent_vm.api.schemas import (
    ExecutionOutcome,
    ExecutionView,
    RunCommand,
    SendSignal,
    Signalled,
    TerminalSize,
)
from agent_vm.sandbox import wire
from agent_vm.sandbox.base import CommandSpec, Exit

router = APIRouter(prefix="/v1", tags=["executions"])


def spec_of(body: RunCommand) -> CommandSpec:
    return CommandSpec(
        cmd=tuple(body.cmd) if isinstance(body.cmd, list) else body.cmd, code=body.code,
        envs=body.env, cwd=body.cwd, user=body.user, timeout=body.timeout,
        stdin=wire.unb64(body.stdin) if body.stdin is not None else None,
        stdin_open=body.stdin_open,
        pty=(body.pty.cols, body.pty.rows) if body.pty is not None else None,
    )  # fmt: skip


@router.post(
    "/sandboxes/{sandbox_id}/executions", status_code=201,
    response_model=ExecutionView | ExecutionOutcome,
)  # fmt: skip
async def execute(
    sandbox_id: str, body: RunCommand, owner: Token, service: Service, wait: bool = False
) -> dict[str, Any]:
    """Start a command; with ``?wait=true`` answer once it ended, with all its output."""
    info = await service.run(owner, sandbox_id, spec_of(body))
    if not wait:
        return wire.command_json(info)
    source = await service.command(owner, info.id)
    out, err = bytearray(), bytearray()
    async for event in source.follow():
        if isinstance(event, Exit):
            return {
                "id": info.id, "stdout": out.decode(errors="replace"),
                "stderr": err.decode(errors="replace"), "stdout_b64": wire.b64(bytes(out)),
                "stderr_b64": wire.b64(bytes(err)), "exit": wire.exit_json(event),
            }  # fmt: skip
        (out if event.stream == "stdout" else err).extend(event.data)
    raise AssertionError("a command's events end with its exit")


@router.get("/sandboxes/{sandbox_id}/executions", response_model=list[ExecutionView])
async def list_executions(sandbox_id: str, owner: Token, service: Service) -> list[dict[str, Any]]:
    """Commands running in the sandbox, and ended ones still kept."""
    return [wire.command_json(info) for info in await service.commands(owner, sandbox_id)]


@router.get("/executions/{execution_id}", response_model=ExecutionView)
async def status(execution_id: str, owner: Token, service: Service) -> dict[str, Any]:
    return wire.command_json((await service.command(owner, execution_id)).info())


@router.get(
    "/executions/{execution_id}/events", response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "OutputView per chunk, then one ExitView"}},
)  # fmt: skip
async def events(
    execution_id: str, owner: Token, service: Service,
    after: Annotated[int, Query(ge=-1)] = -1,
) -> StreamingResponse:  # fmt: skip
    """Server-sent events from ``after`` on (the ``id:`` of the last one seen): output
    chunks (``data`` base64), then one ``exit``. A client that lost the stream
    reconnects with it and misses nothing that is still kept."""
    source = await service.command(owner, execution_id)

    async def stream() -> AsyncIterator[bytes]:
        async for event in source.follow(after):
            data = wire.event_json(event)
            yield f"id: {event.seq}\nevent: {data['type']}\ndata: {json.dumps(data)}\n\n".encode()

    return StreamingResponse(stream(), media_type="text/event-stream")


@router.post("/executions/{execution_id}/stdin", status_code=202, response_model=Signalled)
async def stdin(
    execution_id: str, request: Request, owner: Token, service: Service, close: bool = False
) -> dict[str, Any]:
    """The body's bytes to its stdin (or keys to its terminal); ``?close=true`` then ends
    its input."""
    source = await service.command(owner, execution_id)
    async for chunk in request.stream():
        if chunk:
            await source.send_stdin(chunk)
    if close:
        await source.close_stdin()
    return {"id": source.id, "done": source.info().done}


@router.post("/executions/{execution_id}/resize", status_code=202, response_model=Signalled)
async def resize(
    execution_id: str, body: TerminalSize, owner: Token, service: Service
) -> dict[str, Any]:
    source = await service.command(owner, execution_id)
    await source.resize(body.cols, body.rows)
    return {"id": source.id, "done": source.info().done}


@router.post("/executions/{execution_id}/kill", status_code=202, response_model=Signalled)
async def kill(execution_id: str, owner: Token, service: Service) -> dict[str, Any]:
    """SIGKILL to the command's whole process tree."""
    source = await service.command(owner, execution_id)
    await source.kill()
    return {"id": source.id, "done": source.info().done, "signal": "KILL"}


@router.post("/executions/{execution_id}/signal", status_code=202, response_model=Signalled)
async def send_signal(
    execution_id: str, body: SendSignal, owner: Token, service: Service
) -> dict[str, Any]:
    source = await service.command(owner, execution_id)
    await source.signal(signal.Signals[f"SIG{body.signal}"])
    return {"id": source.id, "done": source.info().done, "signal": body.signal}
