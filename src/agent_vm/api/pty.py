"""A terminal over a WebSocket: ``/v1/sandboxes/{id}/pty``.

The client's first message is JSON (``cols``, ``rows``, and optionally ``cmd`` or ``code``, ``env``,
``cwd``, ``user``, ``timeout``); then binary messages are keystrokes and text messages
JSON controls (``{"resize": [cols, rows]}``, ``{"kill": true}``). The server sends the
terminal's output as binary messages and, when the command ends, one JSON message with
its ``exit_code`` and ``signal``. A token goes in the ``Authorization`` header, as for
every route; close codes 4401 (no valid token), 4404 (no such sandbox for it), 4422 (a
malformed first message). Output waiting for a slow client is capped (then dropped and
counted), so a guest cannot grow the server's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal

from fastapi import WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent_vm.api.service import NotFound, SandboxService
from agent_vm.api.tokens import TokenStore
from agent_vm.errors import AgentVMError
from agent_vm.execution.executor import AgentExecutor
from agent_vm.logs import get_logger

log = get_logger(__name__)

MAX_QUEUED = 8 * 2**20


class PtyStart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cols: int = Field(default=80, ge=1, le=1000)
    rows: int = Field(default=24, ge=1, le=1000)
    cmd: str | list[str] | None = None
    code: str | None = None  # Python source instead of cmd
    env: dict[str, str] = {}
    cwd: str | None = None
    user: str | None = None
    timeout: float | None = Field(default=None, gt=0, le=7 * 86400)


async def serve_pty(
    websocket: WebSocket, sandbox_id: str, service: SandboxService, tokens: TokenStore
) -> None:
    header = websocket.headers.get("authorization", "")
    record = tokens.verify(header.removeprefix("Bearer ").strip()) if header else None
    if record is None:
        log.warning("api_auth_failed", path=websocket.url.path, client="websocket")
        websocket.app.state.on_auth_failure(websocket.url.path, "websocket")
        await websocket.close(code=4401)
        return
    try:
        hosted = service.get(record, sandbox_id)
    except NotFound:
        await websocket.close(code=4404)
        return
    await websocket.accept()
    try:
        start = PtyStart.model_validate(await websocket.receive_json())
    except (ValidationError, ValueError, KeyError) as exc:
        await websocket.send_json({"error": f"bad first message: {exc}"})
        await websocket.close(code=4422)
        return
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    queued = [0, 0]  # bytes waiting, bytes dropped

    def on_output(data: bytes) -> None:
        if queued[0] + len(data) > MAX_QUEUED:
            queued[1] += len(data)
            return
        queued[0] += len(data)
        queue.put_nowait(data)

    command = start.cmd if start.cmd is not None or start.code else ["bash", "-l"]
    try:
        channel, rid, done = await AgentExecutor().start_terminal(
            hosted.vm, command, code=start.code, cols=start.cols, rows=start.rows,
            on_output=on_output, timeout=start.timeout, env=start.env, cwd=start.cwd,
            user=start.user,
        )  # fmt: skip
    except AgentVMError as exc:
        await websocket.send_json({"error": exc.message})
        await websocket.close(code=4400)
        return

    service.watch.record("terminal_started", sandbox=sandbox_id, owner=record.id,
                         owner_name=record.name, command=command, code_bytes=len(start.code)
                         if start.code is not None else None, env_keys=sorted(start.env),
                         cols=start.cols, rows=start.rows)  # fmt: skip

    async def pump_out() -> None:
        while True:
            data = await queue.get()
            queued[0] -= len(data)
            await websocket.send_bytes(data)

    async def kill() -> None:
        await channel.signal(rid, signal.SIGKILL)

    async def pump_in() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            if message.get("bytes") is not None:
                await channel.send_input(rid, message["bytes"])
            elif message.get("text") is not None:
                control = json.loads(message["text"])
                if "resize" in control:
                    cols, rows = control["resize"]
                    await channel.resize(rid, int(cols), int(rows))
                if control.get("kill"):
                    await kill()

    sender = asyncio.create_task(pump_out())
    receiver = asyncio.create_task(pump_in())
    try:

        async def ended() -> None:
            await asyncio.shield(done)

        waiter = asyncio.create_task(ended())
        await asyncio.wait([receiver, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if done.done():
            while not queue.empty():  # what the command wrote last
                data = queue.get_nowait()
                await websocket.send_bytes(data)
            result = done.result()
            await websocket.send_json({
                "exit_code": result.exit_code, "signal": result.signal,
                "timed_out": result.timed_out, "dropped_bytes": queued[1],
            })  # fmt: skip
            await websocket.close()
    except WebSocketDisconnect:
        pass
    finally:
        for task in (sender, receiver):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if not done.done():  # the client went away: the terminal goes too
            with contextlib.suppress(AgentVMError, ConnectionError):
                await kill()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(done), 5)
        channel.end_terminal(rid)
        outcome = (
            done.result() if done.done() and not done.cancelled() and not done.exception() else None
        )
        service.watch.record("terminal_ended", sandbox=sandbox_id, owner=record.id,
                             exit_code=outcome.exit_code if outcome else None,
                             signal=outcome.signal if outcome else None)  # fmt: skip
