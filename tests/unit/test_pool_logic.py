"""The pool's counting, refill, replacement and shutdown logic with a fake shell factory.

No libvirt: the factory hands out fake VMs whose liveness and health the tests control.
The real pool (clones of a golden state) is tested on VMs in tests/integration/test_pool.py.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio

from agent_vm.errors import (
    AgentVMError,
    AgentVMTimeout,
    ConfigError,
    PoolClosedError,
    PoolError,
    PoolExhaustedError,
    VMError,
)
from agent_vm.execution import pooling
from agent_vm.execution.pooling import ShellPool
from tests.waiting import eventually


class FakeVM:
    def __init__(self, name: str) -> None:
        self.name = name
        self.dead = False
        self.answers = True
        self.closed = False

    def alive(self) -> bool:
        return not self.dead

    async def healthy(self, timeout: float = 5.0) -> bool:
        return self.answers and not self.dead

    async def close(self) -> None:
        self.closed = True


class FakeShell:
    def __init__(self, name: str) -> None:
        self.name = name
        self.dead = False
        self.discarded = False

    def alive(self) -> bool:
        return not self.dead

    async def discard(self) -> None:
        self.discarded = True


class FakeFactory:
    """Counts everything it makes, so that tests can prove nothing leaks."""

    def __init__(self, *, prepare_delay: float = 0.01, failures: int = 0) -> None:
        self.names = (f"vm-{i}" for i in itertools.count())
        self.prepare_delay = prepare_delay
        self.failures = failures  # the next N activations fail
        self.shells: list[FakeShell] = []
        self.vms: list[FakeVM] = []
        self.maintained = 0
        self.on_stopped: Callable[[str], None] | None = None
        self.unsubscribed = False

    async def prepare(self) -> FakeShell:
        await asyncio.sleep(self.prepare_delay)
        shell = FakeShell(next(self.names))
        self.shells.append(shell)
        return shell

    async def activate(self, shell: FakeShell) -> FakeVM:
        await asyncio.sleep(0.001)
        if self.failures:
            self.failures -= 1
            await shell.discard()
            raise VMError(f"{shell.name} failed to start (fake)")
        shell.discarded = True  # activated: it became the VM
        vm = FakeVM(shell.name)
        self.vms.append(vm)
        return vm

    def subscribe(self, on_stopped: Callable[[str], None]) -> Callable[[], None]:
        self.on_stopped = on_stopped

        def unsubscribe() -> None:
            self.unsubscribed = True

        return unsubscribe

    async def maintain(self) -> None:
        self.maintained += 1

    def leaked(self) -> list[str]:
        """What was made and never closed or discarded."""
        return [s.name for s in self.shells if not s.discarded] + [
            v.name for v in self.vms if not v.closed
        ]


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    await eventually(condition, timeout, "the pool")


@pytest.fixture
def factory() -> FakeFactory:
    return FakeFactory()


@pytest_asyncio.fixture
async def pool(factory: FakeFactory) -> AsyncIterator[ShellPool[FakeShell, FakeVM]]:
    pool: ShellPool[FakeShell, FakeVM] = ShellPool(
        2, 4, 3600, factory=factory, health_interval=0.05, standby=1
    )
    await pool.initialize()
    yield pool
    await pool.shutdown()
    assert factory.leaked() == []
    assert factory.unsubscribed


async def test_initialize_starts_min_size_and_a_standby_shell(
    pool: ShellPool[FakeShell, FakeVM],
) -> None:
    stats = pool.stats()
    assert stats.idle == 2 and stats.in_use == 0
    await until(lambda: pool.stats().standby == 1)


async def test_acquire_is_refilled_and_release_replaces(
    pool: ShellPool[FakeShell, FakeVM], factory: FakeFactory
) -> None:
    vm = await pool.acquire(timeout=1)
    assert pool.stats().in_use == 1
    await until(lambda: pool.stats().idle == 2)  # the one taken was replaced
    await pool.release(vm)
    await until(lambda: vm.closed)  # reset = replaced, never reused
    assert pool.stats().in_use == 0
    again = [await pool.acquire(timeout=1) for _ in range(2)]
    assert vm not in again


async def test_max_size_is_never_exceeded(
    pool: ShellPool[FakeShell, FakeVM], factory: FakeFactory
) -> None:
    held = [await pool.acquire(timeout=1) for _ in range(4)]
    assert len({vm.name for vm in held}) == 4
    with pytest.raises(PoolExhaustedError, match=r"no VM free within 0\.2 s") as caught:
        await pool.acquire(timeout=0.2)
    assert isinstance(caught.value, AgentVMTimeout) and isinstance(caught.value, TimeoutError)
    assert pool.size() <= 4
    assert len([v for v in factory.vms if not v.closed]) <= 4
    await pool.release(held[0])
    assert (await pool.acquire(timeout=2)).name not in {vm.name for vm in held}
    for vm in held[1:]:
        await pool.release(vm)


async def test_waiters_are_served_in_turn(pool: ShellPool[FakeShell, FakeVM]) -> None:
    held = [await pool.acquire(timeout=1) for _ in range(4)]
    waiting = [asyncio.create_task(pool.acquire(timeout=5)) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert not any(task.done() for task in waiting)
    for vm in held:
        await pool.release(vm)
    served = await asyncio.gather(*waiting)
    assert len({vm.name for vm in served}) == 3
    for vm in served:
        await pool.release(vm)


async def test_a_dead_idle_vm_is_never_handed_out(pool: ShellPool[FakeShell, FakeVM]) -> None:
    victim = pool._idle[0].vm
    victim.dead = True
    before = pool.stats().replaced_dead
    got = [await pool.acquire(timeout=1) for _ in range(2)]
    assert victim not in got
    assert pool.stats().replaced_dead > before
    for vm in got:
        await pool.release(vm)


async def test_a_vm_that_stops_while_held_frees_its_slot(
    pool: ShellPool[FakeShell, FakeVM], factory: FakeFactory
) -> None:
    held = [await pool.acquire(timeout=1) for _ in range(4)]
    assert factory.on_stopped is not None
    held[0].dead = True
    factory.on_stopped(held[0].name)  # as libvirt's lifecycle event would
    replacement = await pool.acquire(timeout=2)  # its slot was freed for a replacement
    assert replacement.name not in {vm.name for vm in held}
    await pool.release(held[0])  # still accepted, and closed
    await until(lambda: held[0].closed)
    for vm in [*held[1:], replacement]:
        await pool.release(vm)


async def test_idle_vms_past_their_ttl_are_replaced(factory: FakeFactory) -> None:
    pool: ShellPool[FakeShell, FakeVM] = ShellPool(1, 2, 0.3, factory=factory, health_interval=0.05)
    async with _running(pool):
        first = pool._idle[0].vm
        await until(lambda: first.closed, 3)
        await until(lambda: pool.stats().idle == 1, 3)  # and replaced
        assert factory.maintained > 0


async def test_idle_vms_that_stop_answering_are_replaced(factory: FakeFactory) -> None:
    pool: ShellPool[FakeShell, FakeVM] = ShellPool(
        1, 2, 3600, factory=factory, health_interval=0.05
    )
    async with _running(pool):
        silent = pool._idle[0].vm
        silent.answers = False
        before = pool.stats().replaced_dead
        await until(lambda: silent.closed, 3)
        assert pool.stats().replaced_dead > before
        await until(lambda: pool.stats().idle == 1, 3)


async def test_start_failures_back_off_and_recover(factory: FakeFactory) -> None:
    factory.failures = 2
    pool: ShellPool[FakeShell, FakeVM] = ShellPool(1, 1, 3600, factory=factory, standby=0)
    async with _running(pool):
        assert pool.stats().idle == 1  # the third attempt worked


async def test_start_up_gives_up_with_the_cause_and_leaves_nothing(
    factory: FakeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    factory.failures = 100
    monkeypatch.setattr(pooling, "FAILURE_BACKOFF", (0.01,))
    pool: ShellPool[FakeShell, FakeVM] = ShellPool(1, 1, 3600, factory=factory, standby=0)
    with pytest.raises(PoolError, match="failed to start"):
        await pool.initialize()
    assert pool.closed
    assert factory.leaked() == []


async def test_shutdown_closes_held_idle_and_standby(factory: FakeFactory) -> None:
    pool: ShellPool[FakeShell, FakeVM] = ShellPool(3, 5, 3600, factory=factory, standby=2)
    await pool.initialize()
    held = await pool.acquire(timeout=1)
    await until(lambda: pool.stats().standby == 2)
    await pool.shutdown()
    assert held.closed
    assert factory.leaked() == []
    with pytest.raises(PoolClosedError):
        await pool.acquire(timeout=0.1)
    await pool.release(held)  # after shutdown: already gone, not an error


async def test_shutdown_while_starts_are_in_flight_leaks_nothing() -> None:
    slow = FakeFactory(prepare_delay=0.2)
    pool: ShellPool[FakeShell, FakeVM] = ShellPool(1, 6, 3600, factory=slow, standby=2)
    await pool.initialize()
    held = [await pool.acquire(timeout=2) for _ in range(3)]  # refills are now starting
    await pool.shutdown()
    assert all(vm.closed for vm in held)
    assert slow.leaked() == []


async def test_releasing_a_stranger_is_refused(pool: ShellPool[FakeShell, FakeVM]) -> None:
    with pytest.raises(PoolError, match="not acquired from this pool"):
        await pool.release(FakeVM("stranger"))


def test_sizes_are_checked() -> None:
    for sizes in ((3, 2), (0, 0), (-1, 2)):
        with pytest.raises(ConfigError, match="min_size"):
            ShellPool(*sizes, factory=FakeFactory())
    assert issubclass(ConfigError, AgentVMError)


class _running:
    """``async with _running(pool)``: initialize, then shut down and check for leaks."""

    def __init__(self, pool: ShellPool[FakeShell, FakeVM]) -> None:
        self.pool = pool

    async def __aenter__(self) -> ShellPool[FakeShell, FakeVM]:
        await self.pool.initialize()
        return self.pool

    async def __aexit__(self, *exc: object) -> None:
        await self.pool.shutdown()
        factory = self.pool._factory
        assert isinstance(factory, FakeFactory) and factory.leaked() == []
