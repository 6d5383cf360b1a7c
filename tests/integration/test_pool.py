"""VMPool on real VMs: acquire, release-with-reset, health, faults, libvirtd restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from agent_vm.config import Settings
from agent_vm.core.connection import LibvirtConnection
from agent_vm.errors import PoolExhaustedError, VMDiedError
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.pool import VMPool
from agent_vm.execution.reaper import owned_domains
from agent_vm.execution.running import RunningVM
from agent_vm.execution.runtime import Runtime
from agent_vm.host.daemons import ensure_daemons, stop_libvirtd
from agent_vm.host.procs import is_alive
from agent_vm.image.store import Image
from tests.integration.helpers import domains_of, eventually, network_leftovers


@pytest_asyncio.fixture
async def pool(runtime: Runtime, image: Image) -> AsyncIterator[VMPool]:
    vm_pool = VMPool(min_size=2, max_size=3, ttl_seconds=3600, runtime=runtime, health_interval=0.5)
    await vm_pool.initialize()
    try:
        yield vm_pool
    finally:
        await vm_pool.shutdown()


async def test_acquire_run_release_and_the_next_user_starts_clean(
    pool: VMPool, executor: AgentExecutor
) -> None:
    assert pool.stats().idle >= 2
    first = await pool.acquire(timeout=5)
    assert (await executor.execute(first, "echo secret > /root/note; hostname")).success
    await pool.release(first)
    seen = {first.name}
    for _ in range(3):  # every later VM is a different, clean machine
        vm = await pool.acquire(timeout=30)
        assert vm.name not in seen
        seen.add(vm.name)
        result = await executor.execute(vm, "cat /root/note")
        assert result.exit_code == 1 and "No such file" in result.stderr
        await pool.release(vm)


async def test_twenty_concurrent_cycles_never_share_a_vm(
    pool: VMPool, executor: AgentExecutor
) -> None:
    holders: dict[str, int] = {}
    overlaps: list[str] = []

    async def cycle(worker: int) -> None:
        vm = await pool.acquire(timeout=120)
        if vm.name in holders:
            overlaps.append(f"{vm.name} held by {holders[vm.name]} and {worker}")
        holders[vm.name] = worker
        try:
            result = await executor.execute(vm, f"echo {worker}")
            assert result.stdout == f"{worker}\n"
        finally:
            del holders[vm.name]
            await pool.release(vm)

    await asyncio.gather(*(cycle(i) for i in range(20)))
    assert overlaps == []
    assert pool.stats().in_use == 0


async def test_exhausted_pool_raises_a_clear_error(runtime: Runtime, image: Image) -> None:
    async with VMPool(min_size=1, max_size=1, runtime=runtime) as small:
        held = await small.acquire(timeout=5)
        started = time.monotonic()
        with pytest.raises(PoolExhaustedError, match=r"no VM free within 0\.5 s") as caught:
            await small.acquire(timeout=0.5)
        assert time.monotonic() - started < 3
        assert caught.value.hint and "max_size" in caught.value.hint
        await small.release(held)
        again = await small.acquire(timeout=30)  # the replacement becomes available
        await small.release(again)


async def test_killed_idle_vm_is_replaced_and_never_handed_out(
    pool: VMPool, executor: AgentExecutor
) -> None:
    await eventually(lambda: pool.stats().idle >= 2, 30, "a full pool")
    victim = pool._idle[0]
    before = pool.stats().replaced_dead
    assert victim.vm.qemu_pid is not None
    os.kill(victim.vm.qemu_pid, signal.SIGKILL)
    pid = victim.vm.qemu_pid
    await eventually(lambda: not is_alive(pid), 5, "QEMU to exit")
    for _ in range(4):  # none of these may be the dead VM
        vm = await pool.acquire(timeout=30)
        assert vm.name != victim.vm.name
        assert (await executor.execute(vm, "true")).success
        await pool.release(vm)
    assert pool.stats().replaced_dead > before
    await eventually(lambda: pool.stats().idle >= 2, 30, "the pool to refill")


async def test_vm_killed_while_acquired_fails_fast_and_is_replaced(
    pool: VMPool, executor: AgentExecutor
) -> None:
    vm = await pool.acquire(timeout=30)
    started = asyncio.Event()
    task = asyncio.create_task(
        executor.execute(vm, "echo go; sleep 100", on_stdout=lambda _: started.set())
    )
    await asyncio.wait_for(started.wait(), 30)
    before = pool.stats().replaced_dead
    pid = vm.vm.qemu_pid()
    assert pid is not None
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(VMDiedError):
        await task
    assert time.monotonic() - killed < 2.0
    # The lifecycle event reaches the pool, which frees the slot and starts a replacement.
    await eventually(lambda: pool.stats().replaced_dead > before, 2.0, "the lifecycle event")
    await pool.release(vm)
    await eventually(lambda: pool.stats().idle >= 2, 30, "the pool to refill")


async def test_unresponsive_idle_vm_is_replaced(pool: VMPool) -> None:
    await eventually(lambda: pool.stats().idle >= 2, 30, "a full pool")
    frozen = pool._idle[0]
    assert frozen.vm.qemu_pid is not None
    os.kill(frozen.vm.qemu_pid, signal.SIGSTOP)  # QEMU alive, agent silent
    try:
        await eventually(lambda: frozen not in pool._idle, 20, "the frozen VM to be dropped")
    finally:
        os.kill(frozen.vm.qemu_pid, signal.SIGCONT)  # lets the discard finish quickly
    await eventually(lambda: pool.stats().idle >= 2, 30, "the pool to refill")


async def test_ttl_evicts_idle_vms(runtime: Runtime, image: Image) -> None:
    async with VMPool(
        min_size=1,
        max_size=2,
        ttl_seconds=1.0,
        runtime=runtime,
        health_interval=0.3,
    ) as short_lived:
        first = {e.vm.name for e in short_lived._idle}
        await eventually(
            lambda: bool(short_lived._idle) and not first & {e.vm.name for e in short_lived._idle},
            30,
            "idle VMs past their TTL to be replaced",
        )


async def test_pool_survives_a_libvirtd_restart(pool: VMPool, executor: AgentExecutor) -> None:
    await eventually(lambda: pool.stats().idle >= 2, 30, "a full pool")
    await asyncio.to_thread(stop_libvirtd)
    try:
        # Idle VMs keep serving while libvirtd is away (acquire needs no libvirt call).
        vm = await pool.acquire(timeout=5)
        assert (await executor.execute(vm, "echo during")).stdout == "during\n"
    finally:
        await asyncio.to_thread(ensure_daemons)
    await pool.release(vm)  # the reset needs libvirt again: it must have reconnected
    for _ in range(3):
        vm = await pool.acquire(timeout=60)
        assert (await executor.execute(vm, "echo after")).stdout == "after\n"
        await pool.release(vm)
    await eventually(lambda: pool.stats().idle >= 2, 60, "the pool to refill after restart")


async def test_start_up_reaps_leftovers_of_a_crashed_process(
    settings: Settings, image: Image, connection: LibvirtConnection
) -> None:
    crashed = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent_vm", "run", "--", "sh", "-c", "echo booted; sleep 120",
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert crashed.stdout is not None and await crashed.stdout.readline() == b"booted\n"
    crashed.kill()  # SIGKILL: no chance to clean up
    await crashed.wait()
    leftover = sorted(domains_of(connection, crashed.pid))
    assert len(leftover) == 1
    async with VMPool(min_size=1, max_size=1, settings=settings):  # a runtime of its own
        remaining = {d.vm.name for d in owned_domains(connection)}
        assert leftover[0] not in remaining
        assert not (settings.vms_dir / leftover[0]).exists()


async def test_shutdown_leaves_nothing(
    runtime: Runtime, image: Image, connection: LibvirtConnection
) -> None:
    before = domains_of(connection, os.getpid())
    pool = VMPool(min_size=2, max_size=3, runtime=runtime)
    await pool.initialize()
    held: RunningVM = await pool.acquire(timeout=5)
    assert domains_of(connection, os.getpid()) - before
    await pool.shutdown()  # also destroys the acquired VM
    assert domains_of(connection, os.getpid()) == before
    assert not held.workdir.exists()


async def test_a_full_nat_pool_cycled_once_leaves_no_network_behind(
    runtime: Runtime, image: Image, executor: AgentExecutor, settings: Settings
) -> None:
    """Seen as a new user: 30 NAT VMs acquired, used, released, the pool closed; one VM's
    ipset and backstop chain stayed until `agent-vm gc` (an iptables-save racing with
    another VM's ipset removal failed, and the failure was swallowed)."""
    names: set[str] = set()
    async with VMPool(min_size=30, max_size=30, runtime=runtime, standby=2) as big:
        vms = [await big.acquire(timeout=300) for _ in range(30)]
        names |= {vm.name for vm in vms}
        results = await asyncio.gather(*(executor.execute(vm, "echo hi") for vm in vms))
        assert all(r.stdout == "hi\n" for r in results)
        for vm in vms:
            await big.release(vm)
        names |= {entry.vm.name for entry in big._idle}
        names |= {shell.name for shell in big._shells}
    assert len(names) >= 30
    assert network_leftovers(settings, names) == []
    guard = await runtime.guard()
    assert not names & set(guard.attached()), "the guard still tracks detached VMs"
    assert not any(guard.blocked_log.recent(name) for name in names)
