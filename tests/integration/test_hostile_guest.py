"""Root inside a guest attacks the host through the control channel.

The guest is the attacker here: it stops its agent and writes whatever it likes to the
control port (``hostile_guest.py``): garbage, a maximum-length header and then silence,
frames for request ids never sent, RESULTs for other requests, and a 30 s flood. The host
must stay up with bounded memory, fail that sandbox's requests with a clear channel
error, replace the VM, and serve its neighbours as before.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import pytest

from agent_vm.errors import ChannelError
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.pool import VMPool
from agent_vm.execution.runtime import Runtime
from agent_vm.image.store import Image
from tests.integration.hostile_guest import attack_code

FLOOD_SECONDS = 30.0
MEMORY_BOUND_MIB = 150  # the host may hold up to max_output of a request; far less here


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def round_trip(executor: AgentExecutor, vm: object) -> float:
    started = time.perf_counter()
    result = await executor.execute(vm, ["true"], timeout=30)  # type: ignore[arg-type]
    assert result.success, result
    return time.perf_counter() - started


async def test_a_hostile_guest_cannot_hurt_the_host_or_its_neighbours(
    runtime: Runtime, image: Image, executor: AgentExecutor
) -> None:
    async with VMPool(2, 3, network="isolated", standby=1, runtime=runtime) as pool:
        victim = await pool.acquire(timeout=120)
        neighbour = await pool.acquire(timeout=120)
        idle = [await round_trip(executor, neighbour) for _ in range(10)]
        before = rss_mib()
        started = await executor.execute(victim, code=attack_code(FLOOD_SECONDS), timeout=60)
        assert started.stdout.strip() == "daemon started", started
        attack_began = time.monotonic()
        peak = before
        during: list[float] = []

        async def watch_memory() -> None:
            nonlocal peak
            while time.monotonic() - attack_began < FLOOD_SECONDS + 5:
                peak = max(peak, rss_mib())
                await asyncio.sleep(0.2)

        watcher = asyncio.create_task(watch_memory())
        await asyncio.sleep(2.0)  # the daemon stops the agent 1 s after the command ended
        with pytest.raises(ChannelError) as refused:  # the victim's requests fail, clearly
            await executor.execute(victim, "echo hi", timeout=5)
        assert victim.name in refused.value.message
        while time.monotonic() - attack_began < FLOOD_SECONDS:
            during.append(await round_trip(executor, neighbour))
        await watcher
        seen = victim._channel.bad_frames  # the host really received the attack
        await pool.release(victim)  # replaced by a fresh clone
        replacement = await pool.acquire(timeout=120)
        assert replacement.name != victim.name
        assert (await executor.execute(replacement, "echo clean")).stdout == "clean\n"
        await pool.release(replacement)
        await pool.release(neighbour)
    grew = peak - before
    print(
        f"hostile guest: host RSS {before:.0f} -> peak {peak:.0f} MiB (+{grew:.0f}); neighbour "
        f"`true` p50 {statistics.median(idle) * 1000:.0f} ms idle, "
        f"{statistics.median(during) * 1000:.0f} ms during the flood ({len(during)} runs); "
        f"{seen} bad frames received"
    )
    assert seen > 100, f"only {seen} bad frames reached the host: was there an attack?"
    assert grew < MEMORY_BOUND_MIB, f"host memory grew by {grew:.0f} MiB"
    assert len(during) >= 10  # the neighbour kept being served throughout
    assert statistics.median(during) < 3 * max(statistics.median(idle), 0.05)
