"""The host end of `agent-vm run -t` and `agent-vm shell`: this terminal wired to a PTY
in the guest.

The host terminal is put in raw mode (so Ctrl-C, Ctrl-Z and every other key reach the
guest's line discipline, which signals the foreground process there), its size is sent
at start and on every SIGWINCH, and it is restored on every way out (the command's end,
an error, a signal). Keystrokes go through one queue, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import termios
import tty
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol, TypeVar

from agent_vm.errors import AgentReplyTimeout
from agent_vm.protocol.messages import Result

T = TypeVar("T")


class Terminal(Protocol):
    """What drives a guest PTY by request id: the agent channel, or a server's socket."""

    async def send_input(self, request_id: int, data: bytes) -> None: ...

    async def resize(self, request_id: int, cols: int, rows: int) -> None: ...

    def end_terminal(self, request_id: int) -> None: ...


async def wait_for_end(ended: Awaitable[T], name: object, timeout: float | None) -> T:
    """What a terminal's command ended with; AgentVMTimeout naming it after ``timeout``."""
    try:
        return await asyncio.wait_for(asyncio.shield(ended), timeout)
    except TimeoutError:
        raise AgentReplyTimeout(
            f"terminal {name} still running after {timeout} s",
            hint="send it input, or kill() it",
        ) from None


def exit_status(exit_code: int | None, signum: int | None) -> int:
    """A shell's way: the exit code, or 128+N when signal N ended the command."""
    return exit_code if exit_code is not None else 128 + (signum or 0)


EOT = b"\x04"  # what ends input in a terminal (stdin was not one: its end becomes ^D)


def size_of(fd: int) -> tuple[int, int]:
    """(cols, rows) of the terminal on ``fd``; 80 x 24 when it is not one."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 80, 24
    return max(1, size.columns), max(1, size.lines)


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """Raw mode while inside; the previous settings back on every exit path."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def attach(
    channel: Terminal,
    request_id: int,
    done: asyncio.Future[Result],
    stdin_fd: int,
    size: Callable[[], tuple[int, int]],
) -> Result:
    """Forward ``stdin_fd`` to the guest PTY and window changes as resizes until ``done``."""
    loop = asyncio.get_running_loop()
    keys: asyncio.Queue[bytes | tuple[int, int] | None] = asyncio.Queue()  # keys, sizes
    interactive = os.isatty(stdin_fd)

    def readable() -> None:
        try:
            data = os.read(stdin_fd, 1 << 16)
        except OSError:
            data = b""
        if data:
            keys.put_nowait(data)
            return
        loop.remove_reader(stdin_fd)
        if not interactive:
            keys.put_nowait(EOT)

    async def pump() -> None:
        while True:
            item = await keys.get()
            if item is None:
                return
            if isinstance(item, tuple):
                await channel.resize(request_id, *item)
            else:
                await channel.send_input(request_id, item)

    def window_changed() -> None:
        keys.put_nowait(size())

    pumper = loop.create_task(pump())
    reading = False
    try:
        loop.add_reader(stdin_fd, readable)
        reading = True
    except (OSError, ValueError):  # a regular file: epoll cannot watch it
        keys.put_nowait(await asyncio.to_thread(_read_all, stdin_fd) + EOT)
    loop.add_signal_handler(signal.SIGWINCH, window_changed)
    try:
        return await done
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)
        if reading:
            loop.remove_reader(stdin_fd)
        pumper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pumper
        channel.end_terminal(request_id)


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 1 << 16):
        parts.append(chunk)
    return b"".join(parts)
