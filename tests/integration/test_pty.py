"""Terminals: `agent-vm run -t` on a real host PTY (the `sb.pty` scenario, `terminal_scenario`,
runs from `test_sandbox.py`, locally and through a server)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import select
import struct
import sys
import termios
import time
from collections.abc import Callable

from agent_vm.image.store import Image
from agent_vm.sandbox import AsyncSandbox


async def until(seen: bytearray, marker: bytes, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while marker not in seen:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {marker!r} in the terminal: {bytes(seen)[-600:]!r}")
        await asyncio.sleep(0.05)


async def terminal_scenario(sb: AsyncSandbox) -> None:
    """tty, size and resize, Ctrl-C, a full-screen program, exit codes; run on a local
    sandbox and on a server's (``test_sandbox.py``)."""
    out = bytearray()
    pty = await sb.pty.create(80, 24, out.extend)
    await sb.pty.send_input(pty, "tty; stty size; echo TERM=$TERM\n")
    await until(out, b"TERM=xterm-256color")
    assert b"/dev/pts/" in out and b"24 80" in out
    await sb.pty.resize(pty, 100, 30)
    await sb.pty.send_input(pty, "stty size\n")
    await until(out, b"30 100")
    await sb.pty.send_input(pty, "sleep 60\n")
    await asyncio.sleep(1.0)
    started = time.monotonic()
    await sb.pty.send_input(pty, "\x03")  # Ctrl-C: the guest's tty signals the sleep
    await sb.pty.send_input(pty, "echo rc=$?\n")
    await until(out, b"rc=130", 10)
    assert time.monotonic() - started < 10
    out.clear()
    await sb.pty.send_input(pty, "top -d 1\n")  # a full-screen program
    await until(out, b"load average")
    assert b"\x1b[" in out  # its screen control sequences arrive as they are
    out.clear()
    await sb.pty.send_input(pty, "q")
    await until(out, b"root@")  # the prompt is back (top flushes typeahead as it quits)
    await sb.pty.send_input(pty, "exit 3\n")
    assert await sb.pty.wait(pty, 30) == 3
    killed = await sb.pty.create(on_data=lambda data: None, cmd="sleep 300")
    await sb.pty.kill(killed)
    assert await sb.pty.wait(killed, 30) == 137


def run_on_a_host_terminal(
    argv: list[str], cols: int, rows: int, on_output: Callable[[bytes, int], bytes | None]
) -> tuple[bytes, int, bool]:
    """``argv`` with a new host PTY as its controlling terminal; ``on_output(seen,
    slave_fd)`` may answer with keystrokes. Returns (output, exit code, settings restored)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    before = termios.tcgetattr(slave)
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        for fd in (0, 1, 2):
            os.dup2(slave, fd)
        os.execv(sys.executable, [sys.executable, *argv])
    out = b""
    deadline = time.monotonic() + 120
    status = None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                data = os.read(master, 1 << 16)
            except OSError:
                data = b""
            out += data
            answer = on_output(out, slave)
            if answer:
                os.write(master, answer)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
    else:
        os.kill(pid, 9)
        raise AssertionError(f"`agent-vm {argv}` did not end: {out[-500:]!r}")
    restored = termios.tcgetattr(slave) == before
    os.close(master)
    os.close(slave)
    return out, os.waitstatus_to_exitcode(status or 0), restored


RESIZE_SCRIPT = "tty; stty size; echo READY; sleep 3; stty size; exit 4"


def check_run_t_follows_the_host_terminal(options: list[str]) -> None:
    """``agent-vm run -t [options]`` on a host PTY of 120x33 that becomes 100x40 once the
    command said READY: the guest sees both sizes, the exit code comes back, and the host
    terminal is restored."""
    resized: list[bool] = []

    def on_output(seen: bytes, slave: int) -> bytes | None:
        if b"READY" in seen and not resized:  # the host window changes: SIGWINCH
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
            resized.append(True)
        return None

    argv = ["-m", "agent_vm", "run", *options, "--network", "isolated", "-t", "--",
            "sh", "-c", RESIZE_SCRIPT]  # fmt: skip
    out, code, restored = run_on_a_host_terminal(argv, 120, 33, on_output)
    assert code == 4, out
    assert b"/dev/pts/" in out and b"33 120" in out and b"40 100" in out, out
    assert restored, "the host terminal was left in raw mode"


def test_run_t_follows_the_host_terminal(image: Image) -> None:
    check_run_t_follows_the_host_terminal([])


def test_ctrl_c_in_run_t_interrupts_the_guest_command(image: Image) -> None:
    sent: list[bool] = []

    def on_output(seen: bytes, slave: int) -> bytes | None:
        if b"READY" in seen and not sent:
            sent.append(True)
            time.sleep(0.5)
            return b"\x03"
        return None

    argv = ["-m", "agent_vm", "run", "--network", "isolated", "-t", "--",
            "sh", "-c", "echo READY; sleep 60; echo not-interrupted"]  # fmt: skip
    out, code, restored = run_on_a_host_terminal(argv, 80, 24, on_output)
    assert code == 130 and b"not-interrupted" not in out, out
    assert restored
