"""A command's events, kept so that a client that lost its connection (or another
client) can follow it from any sequence number: output chunks, then one ``Exit``.

Memory is bounded whatever the guest writes: each journal keeps at most
``MAX_KEPT_BYTES`` of output (the oldest chunks go first; a follower that comes back
after them sees a gap in the sequence numbers), and a sandbox keeps ended journals
within ``ENDED_KEEP`` and ``ENDED_BUDGET`` (``Journals.prune``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from agent_vm.sandbox.base import Event, Exit, Output

MAX_KEPT_BYTES = 16 * 2**20  # output kept per command for followers
MAX_KEPT_EVENTS = 65536  # and chunks (a guest writing a byte at a time)
ENDED_KEEP = 100  # ended commands kept per sandbox
ENDED_BUDGET = 64 * 2**20  # their output, all together


class Journal:
    def __init__(self, start: int = 0) -> None:
        """``start``: the first sequence number (a command continued after a restart of
        the process that ran it continues its numbering)."""
        self._events: list[Event] = []  # seqs consecutive from _events[_head].seq
        self._head = 0  # events before it are dropped (compacted now and then)
        self._next = start  # seq of the next event
        self.size = 0  # bytes of output kept
        self.total = 0  # bytes of output ever seen
        self.exit: Exit | None = None
        self._changed = asyncio.Event()

    @property
    def next_seq(self) -> int:
        return self._next

    @property
    def done(self) -> bool:
        return self.exit is not None

    def _kept(self) -> int:
        return len(self._events) - self._head

    def output(self, stream: str, data: bytes) -> None:
        if self.exit is not None or not data:
            return
        self._events.append(Output(self._next, stream, data))
        self._next += 1
        self.size += len(data)
        self.total += len(data)
        while self._kept() > 1 and (self.size > MAX_KEPT_BYTES or self._kept() > MAX_KEPT_EVENTS):
            dropped = self._events[self._head]
            assert isinstance(dropped, Output)
            self.size -= len(dropped.data)
            self._head += 1
        if self._head > 1024 and self._head * 2 > len(self._events):
            del self._events[: self._head]
            self._head = 0
        self._changed.set()

    def end(self, exit_code: int | None, **fields: object) -> Exit:
        """Record how the command ended (once; later calls return the first)."""
        if self.exit is None:
            self.exit = Exit(self._next, exit_code, **fields)  # type: ignore[arg-type]
            self._events.append(self.exit)
            self._next += 1
            self._changed.set()
        return self.exit

    def drop_output(self) -> None:
        """Forget the kept output (an ended command over its sandbox's budget)."""
        self._events = [self.exit] if self.exit is not None else []
        self._head = 0
        self.size = 0

    async def follow(self, after: int = -1) -> AsyncIterator[Event]:
        """Events with ``seq > after``, live until the ``Exit`` (a follower that comes
        back after dropped output resumes at the oldest kept event)."""
        position = after + 1
        while True:
            while position < self._next and self._kept():
                first = self._events[self._head].seq
                index = self._head + max(0, position - first)
                if index >= len(self._events):
                    break
                event = self._events[index]
                position = event.seq + 1
                yield event
                if isinstance(event, Exit):
                    return
            if self.exit is not None and position > self.exit.seq:
                return
            self._changed.clear()
            if position < self._next:
                continue
            await self._changed.wait()


def prune(journals: list[Journal]) -> list[int]:
    """Indexes of ended journals to forget, oldest first, so that what is kept fits
    ``ENDED_KEEP`` and ``ENDED_BUDGET`` (``journals`` in start order)."""
    ended = [i for i, j in enumerate(journals) if j.done]
    size = sum(journals[i].size for i in ended)
    gone: list[int] = []
    for index in ended:
        if len(ended) - len(gone) <= ENDED_KEEP and size <= ENDED_BUDGET:
            break
        gone.append(index)
        size -= journals[index].size
    return gone
