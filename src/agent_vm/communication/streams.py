"""One file operation in flight on a channel: its stream both ways, its result, its events.

The guest is untrusted: it may only send DATA within the credit window we gave it
(``protocol/files.py``), so a stream holds at most ``WINDOW`` bytes here however fast the
guest writes and however slowly the caller reads; more is a protocol error that ends the
operation. Watch events are kept up to ``MAX_EVENTS``; beyond that they are dropped and
an ``overflow`` event says so.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

from agent_vm.errors import ProtocolError
from agent_vm.protocol.files import ACK_EVERY, DATA_CHUNK, WINDOW, Ack, Done, check_events
from agent_vm.protocol.frame import FLAG_EOF, Frame
from agent_vm.protocol.messages import MessageType

MAX_EVENTS = 10_000
Send = Callable[[Frame], Awaitable[None]]
Event = tuple[str, str, bool]  # (type, path, is_dir)


class FileStream:
    """Created by ``AgentChannel.file_request``; fed by the channel's reader."""

    def __init__(self, request_id: int, send: Send, name: str) -> None:
        self.request_id = request_id
        self.name = name
        self._send = send
        self._done: asyncio.Future[Done] = asyncio.get_running_loop().create_future()
        self._chunks: deque[bytes] = deque()
        self._queued = 0
        self._eof = False
        self._arrived = asyncio.Event()
        self._in_flight = 0
        self._acked = asyncio.Event()
        self._events: deque[Event] = deque()
        self.events_dropped = 0

    # ------------------------------------------------------------ from the reader

    def on_data(self, frame: Frame) -> None:
        if self._eof:
            raise ProtocolError(f"{self.name}: DATA after the end of the stream")
        if frame.payload:
            self._queued += len(frame.payload)
            if self._queued > WINDOW:
                raise ProtocolError(f"{self.name}: guest sent past its credit window")
            self._chunks.append(frame.payload)
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
        for event in check_events(payload):
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

    async def send(self, data: bytes) -> None:
        """Stream ``data`` to the guest, waiting for credit (at most WINDOW in flight)."""
        view = memoryview(data)
        while view:
            chunk = bytes(view[:DATA_CHUNK])
            view = view[DATA_CHUNK:]
            while self._in_flight + len(chunk) > WINDOW:
                if self._done.done():
                    self._done.result()  # raises the guest's error
                    raise ProtocolError(f"{self.name}: the guest ended the operation early")
                self._acked.clear()
                await self._acked.wait()
            self._in_flight += len(chunk)
            await self._send(Frame(MessageType.DATA, self.request_id, chunk))

    async def end(self) -> None:
        await self._send(Frame(MessageType.DATA, self.request_id, b"", FLAG_EOF))

    async def chunks(self) -> AsyncIterator[bytes]:
        """What the guest streams, acknowledged as it is taken."""
        unacked = 0
        while True:
            if self._chunks:
                data = self._chunks.popleft()
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
