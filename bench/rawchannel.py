"""The control channel's raw limit: bytes through the virtio-serial port with no protocol.

A helper inside the guest stops the agent (SIGSTOP), takes a duplicate of its port
(``pidfd_getfd``) and either reads ``size`` bytes the host writes or writes ``size``
zero bytes to the host, timing itself from the first byte to the last; then it lets the
agent go on (SIGCONT) and leaves its figures in ``/tmp/rawchannel.json``. The host side
writes raw bytes into the channel socket (``send_raw``), or lets its reader skip the
zeros (no magic in them: the decoder's garbage path). The host then starts a new session,
which makes the agent drop what it half-read.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time

from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.running import RunningVM


def _guest(direction: str, size: int) -> None:  # pragma: no cover (runs in the guest)
    import ctypes
    import json
    import os
    import pathlib
    import signal
    import time

    if os.fork():
        return
    os.setsid()
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    proc = pathlib.Path("/proc")
    init_cmdline = (proc / "1" / "cmdline").read_bytes()
    agent = None
    for entry in proc.iterdir():
        if entry.name.isdigit() and entry.name != "1":
            try:
                cmdline = (entry / "cmdline").read_bytes()
                ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            except OSError:
                continue
            if cmdline == init_cmdline and ppid == "1":
                agent = int(entry.name)
    assert agent is not None
    port_fd = next(
        int(link.name)
        for link in (proc / str(agent) / "fd").iterdir()
        if str(link.readlink()).startswith("/dev/vport")
    )
    libc = ctypes.CDLL(None, use_errno=True)
    port = libc.syscall(438, libc.syscall(434, agent, 0), port_fd, 0)
    os.kill(agent, signal.SIGSTOP)
    pathlib.Path("/tmp/rawchannel.ready").write_text("1")
    buffer = bytearray(1 << 20)
    done = 0
    started = None
    if direction == "in":
        while done < size:
            count = os.readv(port, [buffer])
            if count and started is None:
                started = time.monotonic()
            done += count
    else:
        chunk = bytes(1 << 20)
        started = time.monotonic()
        while done < size:
            done += os.write(port, chunk[: min(len(chunk), size - done)])
    seconds = time.monotonic() - (started or time.monotonic())
    os.kill(agent, signal.SIGCONT)
    pathlib.Path("/tmp/rawchannel.json").write_text(json.dumps({"bytes": done, "seconds": seconds}))
    os._exit(0)


def guest_code(direction: str, size: int) -> str:
    source = inspect.getsource(_guest)
    return f"{source}\n_guest({direction!r}, {size!r})\n"


async def measure(vm: RunningVM, direction: str, size: int) -> float:
    """MB/s through the port, ``in`` (host to guest) or ``out``, as the guest timed it."""
    executor = AgentExecutor()
    await executor.execute(vm, "rm -f /tmp/rawchannel.json /tmp/rawchannel.ready")
    await executor.execute(vm, code=guest_code(direction, size))
    channel = await vm.channel()
    await asyncio.sleep(1.5)  # the helper stops the agent
    if direction == "in":
        block = bytes(1 << 20)
        sent = 0
        while sent < size:
            await channel.send_raw(block[: min(len(block), size - sent)])
            sent += len(block)
    deadline = time.monotonic() + 300
    while True:
        await asyncio.sleep(0.5)
        await vm.reconnect(30)  # the agent runs again: a new session drops the junk
        result = await executor.execute(vm, "cat /tmp/rawchannel.json 2>/dev/null")
        if result.stdout.strip():
            figures = json.loads(result.stdout)
            return float(figures["bytes"]) / float(figures["seconds"]) / 1e6
        if time.monotonic() > deadline:
            raise RuntimeError("the raw channel helper did not finish")
