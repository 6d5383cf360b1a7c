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
import json
import time

from tests.integration.hostile_guest import _daemonize, _take_port, guest_source

from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.running import RunningVM


def _guest(direction: str, size: int) -> None:  # pragma: no cover (runs in the guest)
    import json
    import os
    import pathlib
    import signal
    import time

    if _daemonize():  # these two come with guest_source()
        return
    agent, port = _take_port()
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
    return f"{guest_source(_guest)}\n_guest({direction!r}, {size!r})\n"


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
