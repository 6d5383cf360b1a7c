"""One file operation in flight on a channel: its stream both ways, its result, its events.

The guest is untrusted: it may only send DATA within the credit window we gave it
(``protocol/files.py``), so a stream holds at most ``WINDOW`` bytes here however fast the
guest writes and however slowly the caller reads; more is a protocol error that ends the
operation. Watch events are kept up to ``MAX_EVENTS``; beyond that they are dropped and
an ``overflow`` event says so.

A staged stream (``staging`` given) moves its bytes as segment files in the VM's staging
directory: a segment from the guest is opened without following links, must be a regular
file of exactly the announced size (at most ``SEGMENT``), and is removed once read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from agent_vm.errors import ProtocolError
from agent_vm.protocol.files import (
    ACK_EVERY,
    DATA_CHUNK,
    SEGMENT,
    WINDOW,
    Ack,
    Done,
    Segment,
    check_events,
    read_segment,
)
from agent_vm.protocol.frame import FLAG_EOF, Frame
from agent_vm.protocol.messages import MessageType

MAX_EVENTS = 10_000
Send = Callable[[Frame], Awaitable[None]]
Event = tuple[str, str, bool]  # (type, path, is_dir)


class FileStream:
    """Created by ``AgentChannel.file_request``; fed by the channel's reader."""

    def __init__(self, request_id: int, send: Send, name: str, staging: Path | None = None) -> None:
        self.request_id = request_id
        self.name = name
        self.staging = staging
        self._segments = 0
        self._pending = bytearray()  # staged bytes not yet a full segment
        self._send = send
        self._done: asyncio.Future[Done] = asyncio.get_running_loop().create_future()
        self._chunks: deque[bytes | Segment] = deque()
        self._queued = 0
        self._eof = False
        self._arrived = asyncio.Event()
        self._in_flight = 0
        self._acked = asyncio.Event()
        self._events: deque[Event] = deque()
        self.watching = asyncio.Event()  # a watch request: its guest side is in place
        self.events_dropped = 0

    # ------------------------------------------------------------ from the reader

    def on_data(self, frame: Frame) -> None:
        if self._eof:
            raise ProtocolError(f"{self.name}: DATA after the end of the stream")
        if frame.payload:
            item: bytes | Segment = frame.payload
            if self.staging is not None:
                item = Segment.from_payload(frame.payload)
            self._queued += item.bytes if isinstance(item, Segment) else len(item)
            if self._queued > WINDOW:
                raise ProtocolError(f"{self.name}: guest sent past its credit window")
            self._chunks.append(item)
        if frame.flags & FLAG_EOF:
            self._eof = True
        self._arrived.set()

    def on_ack(self, payload: bytes) -> None:
        self._in_flight = max(0, self._in_flight - Ack.from_payload(payload).bytes)
        self._acked.set()

    def on_done(self, payload: bytes) -> None:
        if not self._done.done():
            self._done.set_result(Done.from_payload(payload))
        self._arrived.set()
        self._acked.set()

    def on_events(self, payload: bytes) -> None:
        events = check_events(payload)
        if not events:  # a watch's first frame: the guest's watch is in place
            self.watching.set()
        for event in events:
            if len(self._events) >= MAX_EVENTS:
                self.events_dropped += 1
                continue
            self._events.append(event)
        self._arrived.set()

    def fail(self, exc: BaseException) -> None:
        if not self._done.done():
            self._done.set_exception(exc)
            self._done.exception()  # retrieved: no "never retrieved" warning if unused
        self._arrived.set()
        self._acked.set()

    # ------------------------------------------------------------ for the caller

    @property
    def finished(self) -> bool:
        return self._done.done()

    async def send(self, data: bytes | memoryview) -> None:
        """Stream ``data`` to the guest, waiting for credit (at most WINDOW in flight).
        Staged, bytes are gathered into full segments first (``end`` sends the rest)."""
        if self.staging is None:
            view = memoryview(data)
            while view:
                await self._send_unit(view[:DATA_CHUNK])
                view = view[DATA_CHUNK:]
            return
        self._pending += data
        while len(self._pending) >= SEGMENT:
            unit = memoryview(bytes(self._pending[:SEGMENT]))  # no view pins the buffer
            del self._pending[:SEGMENT]
            await self._send_unit(unit)

    async def _send_unit(self, chunk: memoryview) -> None:
        while self._in_flight + len(chunk) > WINDOW:
            if self._done.done():
                self._done.result()  # raises the guest's error
                raise ProtocolError(f"{self.name}: the guest ended the operation early")
            self._acked.clear()
            await self._acked.wait()
        self._in_flight += len(chunk)
        if self.staging is not None:
            self._segments += 1
            segment = Segment(f"{self.request_id}-{self._segments}", len(chunk))
            await asyncio.to_thread(_put_segment, self.staging / segment.name, chunk)
            payload = segment.to_payload()
        else:
            payload = bytes(chunk)
        await self._send(Frame(MessageType.DATA, self.request_id, payload))

    async def end(self) -> None:
        if self._pending:
            rest = memoryview(bytes(self._pending))
            self._pending.clear()
            await self._send_unit(rest)
        await self._send(Frame(MessageType.DATA, self.request_id, b"", FLAG_EOF))

    async def chunks(self) -> AsyncIterator[bytes]:
        """What the guest streams, acknowledged as it is taken."""
        unacked = 0
        while True:
            if self._chunks:
                item = self._chunks.popleft()
                if isinstance(item, Segment):
                    assert self.staging is not None
                    data = await asyncio.to_thread(_take_segment, self.staging, item)
                else:
                    data = item
                self._queued -= len(data)
                unacked += len(data)
                if unacked >= ACK_EVERY:
                    await self._ack(unacked)
                    unacked = 0
                yield data
                continue
            if self._eof:
                return
            if self._done.done():
                self._done.result()  # the guest's error, if it failed
                return
            self._arrived.clear()
            await self._arrived.wait()

    async def _ack(self, consumed: int) -> None:
        if not self._done.done():
            await self._send(
                Frame(MessageType.ACK, self.request_id, Ack(min(consumed, WINDOW)).to_payload())
            )

    async def events(self) -> AsyncIterator[Event]:
        while True:
            if self.events_dropped:
                dropped, self.events_dropped = self.events_dropped, 0
                yield ("overflow", f"{dropped} events dropped", False)
            while self._events:
                yield self._events.popleft()
            if self._done.done():
                self._done.result()
                return
            self._arrived.clear()
            await self._arrived.wait()

    async def result(self) -> object:
        return (await self._done).value

    async def cancel(self) -> None:
        if not self._done.done():
            await self._send(Frame(MessageType.CANCEL, self.request_id))


def _put_segment(path: Path, data: memoryview) -> None:
    """A segment for the guest: root's, its QEMU's group (the directory is setgid)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        view = data
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _take_segment(staging: Path, segment: Segment) -> bytes:
    """The guest's segment: a regular file of exactly the announced size, read, removed."""
    path = staging / segment.name  # the name is digits and a dash: never a path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ProtocolError(f"segment {segment.name}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size != segment.bytes:
            raise ProtocolError(f"segment {segment.name} is not {segment.bytes} bytes of a file")
        data = read_segment(fd, segment)
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
    return data
