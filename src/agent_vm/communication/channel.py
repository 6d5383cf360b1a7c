"""The host's client for the guest agent: asyncio, many requests in flight, one reader.

Trust boundary: everything received comes from the guest and is untrusted. Frames are
size-checked by the decoder before allocation, payloads are parsed by strict
``from_payload`` constructors, request ids must belong to a request we made, and stored
output is capped (``max_output``) however much the guest sends.

Session rule: each connect sends HELLO with a fresh random session id and ignores every
byte until READY carries that id. Bytes left in the channel from before (the socket
accepts writes while no agent runs, and an old agent may have queued output) are
therefore never mistaken for answers to new requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal as signal_module
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent_vm.communication.streams import FileStream
from agent_vm.communication.transport import Transport
from agent_vm.errors import (
    AgentRefusedError,
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
from agent_vm.protocol.files import FileRequest, WorkspaceRequest
from agent_vm.protocol.frame import FLAG_EOF, MAX_REQUEST_ID, BadFrame, Frame, FrameDecoder, encode
from agent_vm.protocol.messages import (
    Configure,
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

OutputCallback = Callable[[bytes], None]
HELLO_INTERVAL = 0.2
STDIN_CHUNK = 64 * 1024
DEFAULT_MAX_OUTPUT = 64 * 1024 * 1024
RESULT_GRACE = 5.0  # how long past the guest-side timeout we wait for its RESULT


@dataclass(frozen=True)
class RawExecution:
    result: Result
    stdout: bytes
    stderr: bytes
    truncated: bool


@dataclass
class _Pending:
    request_id: int
    future: asyncio.Future[Result]
    on_stdout: OutputCallback | None
    on_stderr: OutputCallback | None
    max_output: int
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    truncated: bool = False

    def feed(self, stream: MessageType, data: bytes) -> None:
        buffer = self.stdout if stream is MessageType.STDOUT else self.stderr
        room = self.max_output - len(self.stdout) - len(self.stderr)
        if len(data) > room:
            self.truncated = True
        buffer += data[: max(room, 0)]
        callback = self.on_stdout if stream is MessageType.STDOUT else self.on_stderr
        if callback is not None:
            try:
                callback(data)
            except Exception as exc:  # a user's callback must not kill the channel
                log.warning("output_callback_failed", request=self.request_id, error=repr(exc))


class AgentChannel:
    """One connection to one guest agent."""

    def __init__(
        self, transport: Transport, *, name: str = "vm", max_output: int = DEFAULT_MAX_OUTPUT
    ) -> None:
        self.transport = transport
        self.name = name
        self.max_output = max_output
        self.ready: Ready | None = None
        self.bad_frames = 0
        # Recent ERROR replies not tied to a pending request (e.g. to garbage we sent).
        self.agent_errors: deque[tuple[int, ErrorMessage]] = deque(maxlen=100)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._decoder = FrameDecoder()
        self._session = ""
        self._ready_event = asyncio.Event()
        self._kick = asyncio.Event()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._pings: dict[int, asyncio.Future[Status]] = {}
        self._streams: dict[int, FileStream] = {}
        self._failure: BaseException | None = None

    # ------------------------------------------------------------------ connect

    async def connect(self, timeout: float = 30.0) -> Ready:
        """Open the transport (retrying while QEMU sets it up) and complete the handshake."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last_error: Exception | None = None
        while self._writer is None:
            try:
                self._reader, self._writer = await self.transport.open()
            except OSError as exc:
                last_error = exc
                if loop.time() >= deadline:
                    raise HandshakeError(
                        f"cannot open {self.transport.describe()}: {exc}",
                        hint="is the VM running? see its console log",
                    ) from exc
                await asyncio.sleep(0.02)
        del last_error
        self._reader_task = asyncio.create_task(self._read_loop(), name=f"agent-read-{self.name}")
        self._session = os.urandom(16).hex()
        hello = encode(Frame(MessageType.HELLO, 0, Hello(self._session).to_payload()))
        while not self._ready_event.is_set():
            self._raise_if_failed()
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
            self._kick.clear()
            waiters = [
                asyncio.create_task(self._ready_event.wait()),
                asyncio.create_task(self._kick.wait()),
            ]
            try:
                await asyncio.wait(
                    waiters, timeout=min(HELLO_INTERVAL, remaining), return_when="FIRST_COMPLETED"
                )
            finally:
                for task in waiters:
                    task.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)
        self._raise_if_failed()
        assert self.ready is not None
        return self.ready

    # ------------------------------------------------------------------ requests

    @property
    def closed(self) -> bool:
        return self._failure is not None

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
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
        if self._writer is None or not self._ready_event.is_set():
            raise ChannelError(f"channel to {self.name} is not connected")
        self._writer.write(encode(frame))
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
        """Run one command; returns when the guest reports its RESULT.

        ``on_started`` gets the request id once the command is sent: what ``signal``
        needs to reach it while it runs.

        ``wait_timeout`` bounds the wait on the host side; it should exceed the request's
        own (guest-enforced) timeout. On expiry the process is killed and ChannelError
        raised if the guest still does not answer.
        """
        if stdin is not None and not request.stdin:
            raise ConfigError("pass Execute(stdin=True) to send stdin")
        rid = self._next_id()
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        pending = _Pending(rid, future, on_stdout, on_stderr, self.max_output)
        self._pending[rid] = pending
        try:
            await self._send(Frame(MessageType.EXECUTE, rid, request.to_payload()))
            if on_started is not None:
                on_started(rid)
            if request.stdin:
                data = stdin or b""
                for start in range(0, max(len(data), 1), STDIN_CHUNK):
                    chunk = data[start : start + STDIN_CHUNK]
                    last = start + STDIN_CHUNK >= len(data)
                    await self._send(Frame(MessageType.STDIN, rid, chunk, FLAG_EOF if last else 0))
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
        except asyncio.CancelledError:
            await self._kill_quietly(rid)
            raise
        finally:
            self._pending.pop(rid, None)
        return RawExecution(result, bytes(pending.stdout), bytes(pending.stderr), pending.truncated)

    async def start_terminal(
        self, request: Execute, on_output: OutputCallback
    ) -> tuple[int, asyncio.Future[Result]]:
        """Start a command in a PTY (``request.pty`` set); its output goes to
        ``on_output`` only (nothing is kept). Drive it with ``send_input``/``resize``/
        ``signal``; ``end_terminal`` once its future is done."""
        if request.pty is None:
            raise ConfigError("start_terminal needs Execute(pty=[cols, rows])")
        rid = self._next_id()
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending[rid] = _Pending(rid, future, on_output, None, 0)
        try:
            await self._send(Frame(MessageType.EXECUTE, rid, request.to_payload()))
        except BaseException:
            self._pending.pop(rid, None)
            raise
        return rid, future

    async def send_input(self, request_id: int, data: bytes) -> None:
        for start in range(0, len(data), STDIN_CHUNK):
            await self._send(
                Frame(MessageType.STDIN, request_id, data[start : start + STDIN_CHUNK])
            )

    async def resize(self, request_id: int, cols: int, rows: int) -> None:
        await self._send(Frame(MessageType.RESIZE, request_id, Resize(cols, rows).to_payload()))

    def end_terminal(self, request_id: int) -> None:
        self._pending.pop(request_id, None)

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
        self._pings[rid] = future
        try:
            await self._send(Frame(mtype, rid, payload))
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise AgentReplyTimeout(
                f"{self.name}: agent did not answer {mtype.name} in {timeout} s",
                hint="the guest may be overloaded or hung",
            ) from None
        finally:
            self._pings.pop(rid, None)

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
        self._streams[rid] = stream
        try:
            await self._send(Frame(MessageType.FILE, rid, request.to_payload()))
        except BaseException:
            self._streams.pop(rid, None)
            raise
        return stream

    def forget(self, stream: FileStream) -> None:
        self._streams.pop(stream.request_id, None)

    async def request_shutdown(self) -> None:
        await self._send(Frame(MessageType.SHUTDOWN, 0))

    async def send_raw(self, data: bytes) -> None:
        """Write arbitrary bytes (tests use this to prove the agent survives garbage)."""
        self._raise_if_failed()
        assert self._writer is not None
        self._writer.write(data)
        await self._writer.drain()

    async def close(self) -> None:
        if self._failure is None:
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
        if self._failure is None:
            self._failure = exc
        self._kick.set()
        error = (
            exc
            if isinstance(exc, AgentVMError)
            else ChannelClosedError(f"channel to {self.name} failed: {exc!r}")
        )
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(error)
        for future in self._pings.values():
            if not future.done():
                future.set_exception(error)
        for stream in self._streams.values():
            stream.fail(error)

    def _handle(self, event: Frame | BadFrame) -> None:
        if isinstance(event, BadFrame):
            self.bad_frames += 1
            if event.too_large:
                raise FrameTooLargeError(
                    f"{self.name}: guest sent an oversized frame ({event.reason})"
                )
            log.warning("bad_frame_from_guest", vm=self.name, reason=event.reason)
            return
        try:
            mtype = MessageType(event.type)
        except ValueError:
            self.bad_frames += 1
            log.warning("unknown_message_type", vm=self.name, type=event.type)
            return
        if not self._ready_event.is_set():
            self._handle_before_ready(mtype, event)
            return
        try:
            self._dispatch(mtype, event)
        except ProtocolError as exc:
            self.bad_frames += 1
            log.warning("invalid_message_from_guest", vm=self.name, error=str(exc))
            pending = self._pending.get(event.request_id)
            if pending is not None and not pending.future.done():
                pending.future.set_exception(exc)
            if (stream := self._streams.get(event.request_id)) is not None:
                stream.fail(exc)

    def _handle_before_ready(self, mtype: MessageType, frame: Frame) -> None:
        if mtype is not MessageType.READY:
            return  # stale bytes from before this session
        try:
            ready = Ready.from_payload(frame.payload)
        except ProtocolError:
            return
        if ready.session == self._session:
            self.ready = ready
            self._ready_event.set()
        elif ready.session is None:
            self._kick.set()  # the agent just started: say HELLO now rather than later

    def _dispatch(self, mtype: MessageType, frame: Frame) -> None:
        rid = frame.request_id
        if mtype in (MessageType.STDOUT, MessageType.STDERR):
            if (pending := self._pending.get(rid)) is not None:
                pending.feed(mtype, frame.payload)
        elif mtype is MessageType.RESULT:
            result = Result.from_payload(frame.payload)
            if (pending := self._pending.get(rid)) is not None and not pending.future.done():
                pending.future.set_result(result)
        elif mtype in _STREAM_TYPES:
            if (stream := self._streams.get(rid)) is not None:
                _STREAM_TYPES[mtype](stream, frame)
        elif mtype is MessageType.STATUS:
            status = Status.from_payload(frame.payload)
            if (ping := self._pings.get(rid)) is not None and not ping.done():
                ping.set_result(status)
        elif mtype is MessageType.ERROR:
            error = ErrorMessage.from_payload(frame.payload)
            refusal = AgentRefusedError(
                f"{self.name}: agent refused request: {error.code}: {error.message}",
                code=error.code,
                detail=error.message,
            )
            if (pending := self._pending.get(rid)) is not None and not pending.future.done():
                pending.future.set_exception(refusal)
            elif (ping := self._pings.get(rid)) is not None and not ping.done():
                ping.set_exception(refusal)
            elif (stream := self._streams.get(rid)) is not None:
                stream.fail(refusal)
            else:
                self.agent_errors.append((rid, error))
                log.warning("agent_error", vm=self.name, code=error.code, message=error.message)
        elif mtype is MessageType.READY:
            ready = Ready.from_payload(frame.payload)
            if ready.session != self._session:
                # The agent restarted (or another host took over): our requests are gone.
                raise ChannelClosedError(f"the guest agent of {self.name} restarted")
        else:
            raise ProtocolError(f"{mtype.name} is not a guest-to-host message")


_STREAM_TYPES: dict[MessageType, Callable[[FileStream, Frame], None]] = {
    MessageType.DATA: FileStream.on_data,
    MessageType.ACK: lambda stream, frame: stream.on_ack(frame.payload),
    MessageType.DONE: lambda stream, frame: stream.on_done(frame.payload),
    MessageType.EVENTS: lambda stream, frame: stream.on_events(frame.payload),
}
