"""The host's client for the guest agent: asyncio, many requests in flight, one reader.

Trust boundary: everything received comes from the guest and is untrusted. Frames are
size-checked by the decoder before allocation, payloads are parsed by strict
``from_payload`` constructors, request ids must belong to a request we made, and stored
output is capped (``max_output``) however much the guest sends.

Lifecycle: one ``state`` field (``ChannelState``): NEW → CONNECTING → READY → CLOSED.
``connect`` runs once per channel (a second one would start a second reader), a request
is sent only while READY, and once CLOSED every call fails at once with the reason.

Session rule: each connect sends HELLO with a fresh random session id and ignores every
byte until READY carries that id. Bytes left in the channel from before (the socket
accepts writes while no agent runs, and an old agent may have queued output) are
therefore never mistaken for answers to new requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import os
import signal as signal_module
from collections import deque
from collections.abc import Callable
from pathlib import Path

from agent_vm.communication.streams import FileStream
from agent_vm.communication.transport import Transport
from agent_vm.communication.waiters import OutputCallback, Pending, RawExecution, Waiters
from agent_vm.errors import (
    AgentReplyTimeout,
    AgentVMError,
    ChannelClosedError,
    ChannelError,
    ConfigError,
    FrameTooLargeError,
    HandshakeError,
    ProtocolError,
)
from agent_vm.logs import get_logger
from agent_vm.protocol.configure import Configure
from agent_vm.protocol.files import FileRequest, WorkspaceRequest
from agent_vm.protocol.frame import (
    FLAG_EOF,
    MAX_PAYLOAD,
    MAX_REQUEST_ID,
    MAX_REQUEST_PAYLOAD,
    BadFrame,
    Frame,
    FrameDecoder,
    encode,
)
from agent_vm.protocol.messages import (
    ErrorMessage,
    Execute,
    Hello,
    MessageType,
    Ready,
    Resize,
    Result,
    Signal,
    Status,
)

log = get_logger(__name__)

HELLO_INTERVAL = 0.2
STDIN_CHUNK = 64 * 1024
DEFAULT_MAX_OUTPUT = 64 * 1024 * 1024
RESULT_GRACE = 5.0  # how long past the guest-side timeout we wait for its RESULT


class ChannelState(enum.Enum):
    NEW = "new"  # made, never connected
    CONNECTING = "connecting"  # transport open, handshake under way
    READY = "ready"  # requests may be sent
    CLOSED = "closed"  # failed or closed: every call raises the reason


class AgentChannel:
    """One connection to one guest agent."""

    def __init__(
        self, transport: Transport, *, name: str = "vm", max_output: int = DEFAULT_MAX_OUTPUT
    ) -> None:
        self.transport = transport
        self.name = name
        self.max_output = max_output
        self.ready: Ready | None = None
        self.waiters = Waiters(name)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._decoder = FrameDecoder()
        self._session = ""
        self.state = ChannelState.NEW
        self._wake = asyncio.Event()  # READY, CLOSED, or the agent announced itself
        self._ids = itertools.count(1)
        self._failure: BaseException | None = None

    # ------------------------------------------------------------------ connect

    async def connect(self, timeout: float = 30.0) -> Ready:
        """Open the transport (retrying while QEMU sets it up) and complete the handshake.
        Once per channel: a channel that connected (or failed) is not connected again."""
        if self.state is not ChannelState.NEW:
            raise ChannelError(
                f"channel to {self.name} is {self.state.value}: connect() runs once per channel",
                hint="make a new AgentChannel to reconnect",
            )
        self.state = ChannelState.CONNECTING
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._writer is None:
            try:
                self._reader, self._writer = await self.transport.open()
            except OSError as exc:
                if loop.time() >= deadline:
                    self._fail(ChannelClosedError(f"cannot open {self.transport.describe()}"))
                    raise HandshakeError(
                        f"cannot open {self.transport.describe()}: {exc}",
                        hint="is the VM running? see its console log",
                    ) from exc
                await asyncio.sleep(0.02)
        self._reader_task = asyncio.create_task(self._read_loop(), name=f"agent-read-{self.name}")
        self._session = os.urandom(16).hex()
        hello = encode(Frame(MessageType.HELLO, 0, Hello(self._session).to_payload()))
        while self.state is ChannelState.CONNECTING:
            self._writer.write(hello)
            with contextlib.suppress(ConnectionError):
                await self._writer.drain()
            remaining = deadline - loop.time()
            if remaining <= 0:
                await self.close()
                raise HandshakeError(
                    f"the guest agent of {self.name} did not answer within {timeout:.1f} s",
                    hint="the guest may still be booting or failed to boot; see its console log",
                )
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(HELLO_INTERVAL, remaining))
        self._raise_if_failed()
        assert self.ready is not None
        return self.ready

    # ------------------------------------------------------------------ requests

    @property
    def closed(self) -> bool:
        return self.state is ChannelState.CLOSED

    def _raise_if_failed(self) -> None:
        if self.state is ChannelState.CLOSED:
            if isinstance(self._failure, AgentVMError):
                raise self._failure
            raise ChannelClosedError(f"channel to {self.name} failed: {self._failure!r}")

    def _next_id(self) -> int:
        rid = next(self._ids)
        if rid > MAX_REQUEST_ID:
            self._ids = itertools.count(1)
            rid = next(self._ids)
        return rid

    async def _send(self, frame: Frame) -> None:
        self._raise_if_failed()
        if self.state is not ChannelState.READY or self._writer is None:
            raise ChannelError(f"channel to {self.name} is {self.state.value}, not ready")
        limit = MAX_REQUEST_PAYLOAD if frame.type == MessageType.EXECUTE else MAX_PAYLOAD
        self._writer.write(encode(frame, limit))
        try:
            await self._writer.drain()
        except ConnectionError as exc:
            self._fail(ChannelClosedError(f"channel to {self.name} closed while writing"))
            raise ChannelClosedError(f"channel to {self.name} closed while writing") from exc

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

    async def close(self) -> None:
        if self.state is not ChannelState.CLOSED:
            self._fail(ChannelClosedError(f"channel to {self.name} was closed by the host"))
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()

    # ------------------------------------------------------------------ reading

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                data = await self._reader.read(1 << 20)
                if not data:
                    raise ChannelClosedError(
                        f"channel to {self.name} closed by the VM side (QEMU exited or restarted)"
                    )
                self._decoder.feed(data)
                for event in self._decoder.events():
                    self._handle(event)
        except asyncio.CancelledError:
            raise
        except (AgentVMError, OSError) as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self.state is not ChannelState.CLOSED:
            self._failure = exc
            self.state = ChannelState.CLOSED
        self._wake.set()
        error = (
            exc
            if isinstance(exc, AgentVMError)
            else ChannelClosedError(f"channel to {self.name} failed: {exc!r}")
        )
        self.waiters.fail_all(error)

    @property
    def bad_frames(self) -> int:
        return self.waiters.bad_frames

    @property
    def agent_errors(self) -> deque[tuple[int, ErrorMessage]]:
        """Recent ERROR replies not tied to a request (e.g. to garbage we sent)."""
        return self.waiters.agent_errors

    def _handle(self, event: Frame | BadFrame) -> None:
        if isinstance(event, BadFrame):
            self.waiters.bad_frames += 1
            if event.too_large:
                raise FrameTooLargeError(
                    f"{self.name}: guest sent an oversized frame ({event.reason})"
                )
            log.warning("bad_frame_from_guest", vm=self.name, reason=event.reason)
            return
        try:
            mtype = MessageType(event.type)
        except ValueError:
            self.waiters.bad_frames += 1
            log.warning("unknown_message_type", vm=self.name, type=event.type)
            return
        if self.state is ChannelState.CONNECTING:
            self._handle_before_ready(mtype, event)
        elif mtype is MessageType.READY:
            ready = Ready.from_payload(event.payload)
            if ready.session != self._session:
                # The agent restarted (or another host took over): our requests are gone.
                raise ChannelClosedError(f"the guest agent of {self.name} restarted")
        else:
            self.waiters.dispatch(mtype, event)

    def _handle_before_ready(self, mtype: MessageType, frame: Frame) -> None:
        if mtype is not MessageType.READY:
            return  # stale bytes from before this session
        try:
            ready = Ready.from_payload(frame.payload)
        except ProtocolError:
            return
        if ready.session == self._session:
            self.ready = ready
            self.state = ChannelState.READY
            self._wake.set()
        elif ready.session is None:
            self._wake.set()  # the agent just started: say HELLO now rather than later
