"""Limits the host holds a sandbox to, against guests that try to exceed them.

A fork bomb, a CPU spin, a disk filled to the brim and a memory hog in one sandbox; the
host and a neighbour sandbox must not notice (neighbour's `true` round trip within 2x of
its idle figure), and the offending sandbox's agent keeps working.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from agent_vm.core.template import ResourceProfile
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.running import RunningVM
from agent_vm.execution.runtime import Runtime
from agent_vm.host.accel import Accel
from agent_vm.host.cgroups import memory_limit_file
from agent_vm.image.store import Image

# the bomb runs while the command's own shell waits, then reports how often it hit the limit
FORK_BOMB = (
    "(:(){ :|:& };:) 2>/dev/null; sleep 12; "
    "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/pids.events"
)


@asynccontextmanager
async def two(
    runtime: Runtime, image: Image, profile: ResourceProfile
) -> AsyncIterator[tuple[RunningVM, RunningVM]]:
    spec = runtime.spec(profile=profile, network="isolated")
    attacker = await runtime.vm(image=image, spec=spec)
    neighbour = await runtime.vm(image=image, spec=runtime.spec(network="isolated"))
    try:
        yield attacker, neighbour
    finally:
        await attacker.close()
        await neighbour.close()


async def latencies(executor: AgentExecutor, vm: RunningVM, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        assert (await executor.execute(vm, ["true"], timeout=30)).success
        out.append(time.perf_counter() - started)
    return out


def host_exec() -> float:
    started = time.perf_counter()
    subprocess.run(["true"], check=True)
    return time.perf_counter() - started


async def under_attack(
    executor: AgentExecutor, attacker: RunningVM, neighbour: RunningVM, attack: str, seconds: float
) -> tuple[list[float], list[float], list[float], list[float], str]:
    """The neighbour's and the host's latencies, idle and while ``attack`` runs."""
    await latencies(executor, neighbour, 3)  # warm
    idle = await latencies(executor, neighbour, 10)
    host_idle = [await asyncio.to_thread(host_exec) for _ in range(10)]
    task = asyncio.create_task(executor.execute(attacker, attack, timeout=seconds))
    await asyncio.sleep(3)  # let it take hold
    busy = await latencies(executor, neighbour, 10)
    host_busy = [await asyncio.to_thread(host_exec) for _ in range(10)]
    assert not task.done(), "the attack ended before it was measured"
    outcome = await task
    return idle, busy, host_idle, host_busy, outcome.stdout


def within_2x(idle: list[float], busy: list[float]) -> bool:
    return statistics.median(busy) <= 2 * statistics.median(idle)


async def test_a_fork_bomb_is_contained(
    runtime: Runtime, image: Image, executor: AgentExecutor
) -> None:
    async with two(runtime, image, ResourceProfile(pids_max=256)) as (attacker, neighbour):
        idle, busy, host_idle, host_busy, report = await under_attack(
            executor, attacker, neighbour, FORK_BOMB, 30
        )
        after = await executor.execute(attacker, "echo still here", timeout=60)
    hits = int(report.split()[-1]) if report.startswith("max") else 0
    assert hits > 0, report  # the bomb really ran into the per-command pids limit
    assert within_2x(idle, busy), (idle, busy)
    # the host stays responsive: starting a process costs what it did, within noise
    assert statistics.median(host_busy) < max(0.05, 5 * statistics.median(host_idle)), host_busy
    assert after.stdout == "still here\n", after  # the bomb's cgroup was killed, not the VM


async def test_a_cpu_spin_leaves_the_neighbour_alone(
    runtime: Runtime, image: Image, executor: AgentExecutor
) -> None:
    spin = "for i in $(seq $(nproc)); do (while :; do :; done) & done; wait"

    async with two(runtime, image, ResourceProfile()) as (attacker, neighbour):
        spin = f"timeout 12 sh -c '{spin}'"
        idle, busy, _, _, _ = await under_attack(executor, attacker, neighbour, spin, 30)
    assert within_2x(idle, busy), (idle, busy)


async def test_a_full_disk_is_enospc_and_costs_the_host_at_most_the_cap(
    runtime: Runtime, image: Image, executor: AgentExecutor
) -> None:
    profile = ResourceProfile(disk_gib=2)
    free_before = shutil.disk_usage(runtime.settings.vms_dir).free
    async with two(runtime, image, profile) as (attacker, _):
        fill = await executor.execute(
            attacker,
            "dd if=/dev/zero of=/fill bs=1M status=none; rc=$?; sync; exit $rc",
            timeout=600,
        )
        overlay = (attacker.workdir / "disk.qcow2").stat().st_size
        grew = free_before - shutil.disk_usage(runtime.settings.vms_dir).free
        after = await executor.execute(attacker, "rm /fill && echo usable", timeout=60)
    assert fill.exit_code != 0 and "No space left on device" in fill.stderr, fill
    cap = profile.disk_gib * 2**30
    assert overlay <= cap + 64 * 2**20, overlay  # qcow2 metadata on top of the cap
    assert grew <= cap + 64 * 2**20, grew
    assert after.stdout == "usable\n"


async def test_a_memory_hog_is_killed_inside_the_guest_and_the_agent_survives(
    runtime: Runtime, image: Image, executor: AgentExecutor
) -> None:
    hog = "x = []\nwhile True:\n    x.append(bytearray(32 << 20))\n"
    async with two(runtime, image, ResourceProfile()) as (attacker, _):
        result = await executor.execute(attacker, code=hog, timeout=120)
        alive = await executor.execute(attacker, "echo agent alive", timeout=60)
        qemu_running = attacker.alive()
        assert attacker.qemu_pid is not None
        cap = int(memory_limit_file(attacker.qemu_pid).read_text())
    spec = attacker.spec
    assert spec is not None
    expected = spec.profile.host_memory_mib(tcg=spec.accel is Accel.TCG)
    assert expected is not None and cap == expected << 20  # the host's cap on all of QEMU
    assert result.signal == 9 and result.error is not None and "out of memory" in result.error
    assert alive.stdout == "agent alive\n"
    assert qemu_running  # the guest's OOM killer acted, not the host's
