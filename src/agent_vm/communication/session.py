"""The host's end of one session with a guest agent: transport, handshake, the one reader.

Trust boundary: everything received comes from the guest and is untrusted. Frames are
size-checked by the decoder before allocation, payloads are parsed by strict
``from_payload`` constructors, request ids must belong to a request we made, and stored
output is capped (``max_output``) however much the guest sends.

Lifecycle: one ``state`` field (``ChannelState``): NEW → CONNECTING → READY → CLOSED,
and READY ⇄ SUSPENDED around a pause: the session (its id, its request ids, every
waiter) outlives the QEMU that carried it, and ``reattach`` continues it over the
transport of the VM that resumes it. ``connect`` runs once per channel, a request is sent
only while READY, and once CLOSED every call fails at once with the reason.

Session rule: each connect sends HELLO with a fresh random session id and ignores every
byte until READY carries that id. Bytes left in the channel from before (the socket
accepts writes while no agent runs, and an old agent may have queued output) are
therefore never mistaken for answers to new requests. A reattach says HELLO with the
same id: the agent keeps that session's commands running.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import os
import struct
import termios
from collections import deque

from agent_vm.communication.transport import Transport
from agent_vm.communication.waiters import Waiters
from agent_vm.errors import (
    AgentVMError,
    ChannelClosedError,
    ChannelError,
    FrameTooLargeError,
    HandshakeError,
    ProtocolError,
)
from agent_vm.logs import get_logger
from agent_vm.protocol.frame import (
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
    Hello,
    MessageType,
    Ready,
)

log = get_logger(__name__)

HELLO_INTERVAL = 0.2
DEFAULT_MAX_OUTPUT = 64 * 1024 * 1024


class ChannelState(enum.Enum):
    NEW = "new"  # made, never connected
    CONNECTING = "connecting"  # transport open, handshake under way
    READY = "ready"  # requests may be sent
    SUSPENDED = "suspended"  # its VM is paused: waiters kept, nothing sent until reattach
    CLOSED = "closed"  # failed or closed: every call raises the reason


class ChannelSession:
    """One session with one guest agent (requests: ``channel.AgentChannel``)."""

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
        self._last_id = 0
        self._failure: BaseException | None = None
        self._resuming = False  # a reattach's handshake: output of the session flows on

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
        self._session = os.urandom(16).hex()
        return await self._handshake(timeout)

    async def _handshake(self, timeout: float) -> Ready:
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
        self._resuming = False
        self._raise_if_failed()
        assert self.ready is not None
        return self.ready

    # ------------------------------------------------------------------ pause

    async def suspend(self, timeout: float = 5.0) -> None:
        """Stop sending and wait until the guest side has taken every byte sent (a pause
        then loses nothing in flight: what QEMU took is in the guest's memory). The VM
        is stopped next; its QEMU's end of the transport goes with it."""
        if self.state is not ChannelState.READY or self._writer is None:
            self._raise_if_failed()
            raise ChannelError(f"channel to {self.name} is {self.state.value}, not ready")
        self.state = ChannelState.SUSPENDED
        deadline = asyncio.get_running_loop().time() + timeout
        while _unsent(self._writer):
            if asyncio.get_running_loop().time() > deadline:
                self.state = ChannelState.READY
                raise ChannelError(
                    f"the guest agent of {self.name} did not take its input within {timeout} s",
                    hint="the guest is very busy: try again",
                )
            await asyncio.sleep(0.01)

    def unsuspend(self) -> None:
        """The pause did not happen: carry on over the same transport."""
        if self.state is ChannelState.SUSPENDED:
            self.state = ChannelState.READY

    async def drop_transport(self, timeout: float = 5.0) -> None:
        """After QEMU went: read what it delivered to the end, then close our end."""
        if self._reader_task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self._reader_task), timeout)
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = self._reader_task = None

    def adopt(self, session: str, next_id: int) -> None:
        """Continue a session another process began (a paused sandbox after a restart)."""
        if self.state is not ChannelState.NEW:
            raise ChannelError(f"channel to {self.name} is {self.state.value}, not new")
        self._session, self._last_id = session, next_id - 1
        self.state = ChannelState.SUSPENDED

    @property
    def session(self) -> tuple[str, int]:
        """The session id and the next request id (what ``adopt`` needs)."""
        return self._session, self._last_id + 1

    async def reattach(self, transport: Transport, timeout: float = 30.0) -> Ready:
        """Continue the session over ``transport`` (the resumed VM's): HELLO with the same
        id, so the agent keeps its commands; their output flows on to the same waiters."""
        if self.state is not ChannelState.SUSPENDED:
            raise ChannelError(f"channel to {self.name} is {self.state.value}, not suspended")
        await self.drop_transport(0)
        self.transport = transport
        self.state, self._resuming = ChannelState.CONNECTING, True
        return await self._handshake(timeout)

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
        self._last_id = self._last_id + 1 if self._last_id < MAX_REQUEST_ID else 1
        return self._last_id

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
                if not data and self.state is ChannelState.SUSPENDED:
                    return  # the paused VM's QEMU went: the session waits for reattach
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
            if self._resuming:  # the session's commands, going on where they were
                self.waiters.dispatch(mtype, frame)
            return  # else stale bytes from before this session
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


def _unsent(writer: asyncio.StreamWriter) -> int:
    """Bytes written but not yet read by the other end: asyncio's buffer, then the
    socket's send queue (SIOCOUTQ; 0 where the socket type does not say)."""
    pending = writer.transport.get_write_buffer_size()
    sock = writer.get_extra_info("socket")
    if sock is None:
        return pending
    try:
        queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        queued = 0
    return pending + int(queued)
