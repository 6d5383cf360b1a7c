"""The host's client for the guest agent: asyncio, many requests in flight, one reader.

The requests (commands, stdin, signals, status, files, workspace) over one session
(``session.py``: transport, handshake, reading, suspend and reattach).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal as signal_module
from collections.abc import Callable
from pathlib import Path

from agent_vm.communication.session import DEFAULT_MAX_OUTPUT, ChannelSession, ChannelState
from agent_vm.communication.streams import FileStream
from agent_vm.communication.waiters import OutputCallback, Pending, RawExecution
from agent_vm.errors import (
    AgentReplyTimeout,
    AgentVMError,
    ConfigError,
)
from agent_vm.logs import get_logger
from agent_vm.protocol.configure import Configure
from agent_vm.protocol.files import FileRequest, WorkspaceRequest
from agent_vm.protocol.frame import (
    FLAG_EOF,
    Frame,
)
from agent_vm.protocol.messages import (
    Execute,
    MessageType,
    Resize,
    Result,
    Signal,
    Status,
)

__all__ = ["DEFAULT_MAX_OUTPUT", "RESULT_GRACE", "AgentChannel", "ChannelState"]

log = get_logger(__name__)

STDIN_CHUNK = 64 * 1024
RESULT_GRACE = 5.0  # how long past the guest-side timeout we wait for its RESULT


class AgentChannel(ChannelSession):
    """One connection to one guest agent."""

    async def execute(
        self,
        request: Execute,
        *,
        stdin: bytes | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        wait_timeout: float | None = None,
        on_started: Callable[[int], None] | None = None,
    ) -> RawExecution:
        """Run one command; returns when the guest reports its RESULT, with its output
        (kept up to ``max_output``).

        ``on_started`` gets the request id once the command is sent: what ``signal``
        needs to reach it while it runs.

        ``wait_timeout`` bounds the wait on the host side; it should exceed the request's
        own (guest-enforced) timeout. On expiry the process is killed and ChannelError
        raised if the guest still does not answer.
        """
        if stdin is not None and not request.stdin:
            raise ConfigError("pass Execute(stdin=True) to send stdin")
        rid, future = await self.start(
            request, on_stdout=on_stdout, on_stderr=on_stderr, keep=self.max_output
        )
        try:
            if on_started is not None:
                on_started(rid)
            if request.stdin:
                await self.send_input(rid, stdin or b"", eof=True)
            return await self.wait(rid, future, wait_timeout)
        except asyncio.CancelledError:
            await self._kill_quietly(rid)
            raise
        finally:
            self.waiters.pending.pop(rid, None)

    async def wait(
        self, rid: int, future: asyncio.Future[Result], wait_timeout: float | None
    ) -> RawExecution:
        """The RESULT of a started command (and what was kept of its output); past
        ``wait_timeout`` the command is killed, and without a RESULT soon after,
        ``AgentReplyTimeout``."""
        pending = self.waiters.pending.get(rid)
        try:
            result = await asyncio.wait_for(asyncio.shield(future), wait_timeout)
        except TimeoutError:
            await self._kill_quietly(rid)
            try:
                result = await asyncio.wait_for(asyncio.shield(future), RESULT_GRACE)
            except TimeoutError:
                raise AgentReplyTimeout(
                    f"{self.name}: no result {wait_timeout} s after starting the command",
                    hint="the guest may be overloaded or hung",
                ) from None
        if pending is None:
            return RawExecution(result, b"", b"", False)
        return RawExecution(result, bytes(pending.stdout), bytes(pending.stderr), pending.truncated)

    async def start(
        self,
        request: Execute,
        *,
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None = None,
        keep: int = 0,
    ) -> tuple[int, asyncio.Future[Result]]:
        """Send a command and return at once: its request id and the future of its RESULT.
        Output goes to the callbacks (a PTY's all to ``on_stdout``) and up to ``keep``
        bytes are kept; stdin (``request.stdin`` or a PTY) follows with ``send_input``.
        Drive it with ``send_input``/``resize``/``signal``; ``release`` it once ended."""
        rid = self._next_id()
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self.waiters.pending[rid] = Pending(rid, future, on_stdout, on_stderr, keep)
        try:
            await self._send(Frame(MessageType.EXECUTE, rid, request.to_payload()))
        except BaseException:
            self.waiters.pending.pop(rid, None)
            raise
        return rid, future

    def follow_request(
        self, rid: int, on_stdout: OutputCallback | None, on_stderr: OutputCallback | None
    ) -> asyncio.Future[Result]:
        """Wait again for a command another process of this session started (a paused
        sandbox continued after a restart): its output and RESULT from now on."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self.waiters.pending[rid] = Pending(rid, future, on_stdout, on_stderr, 0)
        return future

    async def send_input(self, request_id: int, data: bytes, *, eof: bool = False) -> None:
        """Bytes for a running command's stdin (or its terminal), in order; ``eof``
        closes its stdin after them (a terminal has no end of input: send ``\\x04``)."""
        for start in range(0, max(len(data), 1 if eof else 0), STDIN_CHUNK):
            last = eof and start + STDIN_CHUNK >= len(data)
            chunk = data[start : start + STDIN_CHUNK]
            await self._send(Frame(MessageType.STDIN, request_id, chunk, FLAG_EOF if last else 0))

    async def resize(self, request_id: int, cols: int, rows: int) -> None:
        await self._send(Frame(MessageType.RESIZE, request_id, Resize(cols, rows).to_payload()))

    def release(self, request_id: int) -> None:
        """Forget a command started with ``start`` (after its RESULT, or given up on)."""
        self.waiters.pending.pop(request_id, None)

    async def _kill_quietly(self, rid: int) -> None:
        if not self.closed:
            with contextlib.suppress(AgentVMError, ConnectionError):
                await self.signal(rid, signal_module.SIGKILL)

    async def signal(self, request_id: int, signum: int) -> None:
        await self._send(Frame(MessageType.SIGNAL, request_id, Signal(signum).to_payload()))

    async def ping(self, timeout: float = 5.0) -> Status:
        return await self._status_request(MessageType.PING, b"", timeout)

    async def configure(self, config: Configure, timeout: float = 10.0) -> Status:
        """Set clock, entropy and identity in the guest (after a start from golden state)."""
        return await self._status_request(MessageType.CONFIGURE, config.to_payload(), timeout)

    async def _status_request(self, mtype: MessageType, payload: bytes, timeout: float) -> Status:
        rid = self._next_id()
        future: asyncio.Future[Status] = asyncio.get_running_loop().create_future()
        self.waiters.pings[rid] = future
        try:
            await self._send(Frame(mtype, rid, payload))
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise AgentReplyTimeout(
                f"{self.name}: agent did not answer {mtype.name} in {timeout} s",
                hint="the guest may be overloaded or hung",
            ) from None
        finally:
            self.waiters.pings.pop(rid, None)

    async def workspace(self, request: WorkspaceRequest, timeout: float = 30.0) -> Status:
        """Mount (or unmount) the shared workspace in the guest."""
        return await self._status_request(MessageType.WORKSPACE, request.to_payload(), timeout)

    async def file_request(self, request: FileRequest, staging: Path | None = None) -> FileStream:
        """Start a file operation; the caller streams through the returned FileStream and
        must ``forget`` it when done (``communication/files.py`` does both). A staged
        request needs the host's end of the staging directory."""
        if request.staged != (staging is not None):
            raise ValueError("a staged request needs a staging directory, and only it")
        rid = self._next_id()
        stream = FileStream(rid, self._send, self.name, staging)
        self.waiters.streams[rid] = stream
        try:
            await self._send(Frame(MessageType.FILE, rid, request.to_payload()))
        except BaseException:
            self.waiters.streams.pop(rid, None)
            raise
        return stream

    def forget(self, stream: FileStream) -> None:
        self.waiters.streams.pop(stream.request_id, None)

    async def request_shutdown(self) -> None:
        await self._send(Frame(MessageType.SHUTDOWN, 0))

    async def send_raw(self, data: bytes) -> None:
        """Write arbitrary bytes (tests use this to prove the agent survives garbage)."""
        self._raise_if_failed()
        assert self._writer is not None
        self._writer.write(data)
        await self._writer.drain()
