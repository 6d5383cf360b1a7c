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
from collections.abc import Callable, Iterator
from typing import Protocol

from agent_vm.execution.result import ExecutionResult


class Terminal(Protocol):
    """A command running in a guest PTY, as the SDK hands it out (``sb.pty.create``)."""

    async def send_stdin(self, data: str | bytes) -> None: ...

    async def resize(self, cols: int, rows: int) -> None: ...

    async def wait(self, timeout: float | None = None) -> ExecutionResult: ...


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
    terminal: Terminal, stdin_fd: int, size: Callable[[], tuple[int, int]]
) -> ExecutionResult:
    """Forward ``stdin_fd`` to the guest PTY and window changes as resizes until its
    command ends; its result."""
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
                await terminal.resize(*item)
            else:
                await terminal.send_stdin(item)

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
        return await terminal.wait()
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)
        if reading:
            loop.remove_reader(stdin_fd)
        pumper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pumper


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 1 << 16):
        parts.append(chunk)
    return b"".join(parts)
