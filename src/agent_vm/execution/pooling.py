"""The counting and refill logic of a pool of pre-started VMs, apart from how VMs are made.

* ``acquire`` only pops an idle VM that passes cheap liveness checks (no libvirt call, no
  guest round trip), or waits for one.
* ``release`` never resets on the caller's path: the used VM is closed and a fresh one
  started in the background. "Reset" therefore means "replaced", which also guarantees
  nothing a user did survives. ``standby`` shells (for clones: QEMU started, waiting for
  the golden state) are kept ahead so that a reset costs only their activation.
* A monitor task pings idle VMs, evicts them after ``ttl_seconds`` and keeps the pool at
  ``min_size``; VMs the factory reports stopped are replaced.

How VMs are made is a :class:`ShellFactory`: ``pool.py`` has the real one (golden-state
clones through the runtime); unit tests drive this logic with a fake one, no libvirt.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic

from agent_vm.errors import (
    AgentVMError,
    BootTimeout,
    ConfigError,
    PoolClosedError,
    PoolError,
    PoolExhaustedError,
)
from agent_vm.execution.shells import PoolStats, S, ShellFactory, V
from agent_vm.logs import get_logger

log = get_logger(__name__)

MAX_PARALLEL_STARTS = 2
SHUTDOWN_GRACE = 60.0
FAILURE_BACKOFF: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0)
START_UP_TIMEOUT = 300.0
START_UP_PER_VM = 3.0  # a pool of 300 fills in ~7 min under TCG here; more time per VM asked


@dataclass(eq=False)
class _Entry(Generic[V]):
    vm: V
    created: float
    dead: bool = False
    started_seconds: float = 0.0

    def alive(self) -> bool:
        return not self.dead and self.vm.alive()


class ShellPool(Generic[S, V]):
    """Pre-started VMs from a factory; see the module docstring."""

    def __init__(
        self,
        min_size: int = 2,
        max_size: int = 4,
        ttl_seconds: float = 3600.0,
        *,
        factory: ShellFactory[S, V] | None = None,
        health_interval: float = 2.0,
        standby: int = 1,
    ) -> None:
        if not 0 <= min_size <= max_size or max_size < 1 or standby < 0:
            raise ConfigError(
                f"pool sizes must satisfy 0 <= min_size <= max_size, max_size >= 1 and "
                f"standby >= 0 (got min_size={min_size}, max_size={max_size}, standby={standby})"
            )
        if ttl_seconds <= 0 or health_interval <= 0:
            raise ConfigError("ttl_seconds and health_interval must be positive")
        self.min_size = min_size
        self.max_size = max_size
        self.ttl_seconds = ttl_seconds
        self.health_interval = health_interval
        self.standby = standby
        self._factory = factory
        self._idle: deque[_Entry[V]] = deque()
        self._in_use: dict[str, _Entry[V]] = {}
        self._dead_in_use: dict[str, _Entry[V]] = {}  # acquired, then they stopped
        self._starting = 0
        self._shells: deque[S] = deque()
        self._shells_starting = 0
        self._waiters = 0
        self._cond = asyncio.Condition()
        self._starts: set[asyncio.Task[None]] = set()  # awaited on shutdown
        self._chores: set[asyncio.Task[None]] = set()  # discards etc.: awaited on shutdown
        self._start_slots = asyncio.Semaphore(MAX_PARALLEL_STARTS)
        self._monitor: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._failures = 0
        self._last_error: BaseException | None = None
        self._initialized = False
        self._closed = False
        self._started = 0
        self._replaced_dead = 0
        self._start_seconds: deque[float] = deque(maxlen=200)

    # ------------------------------------------------------------------ lifecycle

    async def _make_factory(self) -> ShellFactory[S, V]:
        """Subclasses build their factory here (after whatever it needs is ready)."""
        raise ConfigError("this pool has no VM factory")

    async def initialize(self) -> None:
        """Prepare the factory and start ``min_size`` VMs (returns once they are idle)."""
        if self._initialized:
            return
        if self._closed:
            raise PoolClosedError("the pool was shut down")
        if self._factory is None:
            self._factory = await self._make_factory()
        self._unsubscribe = self._factory.subscribe(self._on_stopped)
        self._initialized = True
        try:
            async with self._cond:
                self._refill()
                self._top_up_shells()
            await self._wait_until(
                lambda: len(self._idle) >= self.min_size, "pool start-up",
                START_UP_TIMEOUT + START_UP_PER_VM * self.min_size,
            )  # fmt: skip
        except BaseException:
            await asyncio.shield(self.shutdown())  # nothing half-started stays behind
            raise
        self._monitor = asyncio.create_task(self._watch(), name="vm-pool-monitor")

    async def shutdown(self) -> None:
        """Close every VM of the pool, idle or acquired, and every standby shell."""
        if self._closed:
            return
        self._closed = True
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        async with self._cond:
            self._cond.notify_all()
        # Starts are not cancelled: a start that has just finished would lose its result
        # (and leak its VM) when cancelled before resuming. They see the pool closed and
        # discard what they made; only one stuck past the grace period is cancelled.
        while self._starts:
            _done, stuck = await asyncio.wait(set(self._starts), timeout=SHUTDOWN_GRACE)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        entries = [*self._idle, *self._in_use.values(), *self._dead_in_use.values()]
        shells = list(self._shells)
        self._idle.clear()
        self._in_use.clear()
        self._dead_in_use.clear()
        self._shells.clear()
        for entry in entries:
            self._spawn(self._close_entry(entry))
        for shell in shells:
            self._spawn(self._discard_shell(shell))
        while self._chores:  # discards may be spawned while others finish
            await asyncio.gather(*set(self._chores), return_exceptions=True)
        if self._factory is not None:
            await self._factory.maintain()

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ acquire / release

    def size(self) -> int:
        """VMs the pool holds now: idle, acquired and starting."""
        return len(self._idle) + len(self._in_use) + self._starting

    def stats(self) -> PoolStats:
        return PoolStats(
            idle=len(self._idle),
            in_use=len(self._in_use),
            starting=self._starting,
            standby=len(self._shells),
            started=self._started,
            replaced_dead=self._replaced_dead,
            start_seconds=list(self._start_seconds),
        )

    async def acquire(self, timeout: float = 30.0) -> V:
        """A clean, running VM: at once when one is idle, else within ``timeout`` seconds."""
        if not self._initialized and not self._closed:
            raise PoolError("the pool is not initialized", hint="await pool.initialize() first")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self._cond:
            self._waiters += 1
            try:
                while (entry := self._pop_idle()) is None:
                    if self._closed:
                        raise PoolClosedError("the pool was shut down")
                    self._refill()
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise self._exhausted(timeout)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._cond.wait(), remaining)
            finally:
                self._waiters -= 1
            self._in_use[entry.vm.name] = entry
            self._refill()  # start the replacement for the one just taken
            return entry.vm

    def _exhausted(self, timeout: float) -> PoolExhaustedError:
        failure = f"; last start failure: {self._last_error}" if self._last_error else ""
        return PoolExhaustedError(
            f"no VM free within {timeout:g} s ({len(self._in_use)} in use, "
            f"{self._starting} starting, max_size={self.max_size}){failure}",
            hint="release VMs sooner, raise max_size or the acquire timeout",
        )

    async def release(self, vm: V) -> None:
        """Give a VM back; it is closed and replaced by a fresh one in the background.
        After shutdown the VM is already gone: releasing it then is a no-op."""
        async with self._cond:
            entry = self._in_use.pop(vm.name, None) or self._dead_in_use.pop(vm.name, None)
            if entry is None:
                if self._closed:
                    return
                raise PoolError(f"{vm.name} is not acquired from this pool")
            self._discard(entry)
            self._refill()

    # ------------------------------------------------------------------ internals

    def _pop_idle(self) -> _Entry[V] | None:
        if self._closed:
            return None
        while self._idle:
            entry = self._idle.popleft()
            if entry.alive():
                return entry
            self._replaced_dead += 1
            self._discard(entry)
        return None

    def _refill(self) -> None:
        """Keep max(min_size, waiters) VMs idle or starting, within max_size (lock held)."""
        if self._closed or not self._initialized:
            return
        ready_or_coming = len(self._idle) + self._starting
        deficit = max(self.min_size, self._waiters) - ready_or_coming
        room = self.max_size - len(self._in_use) - ready_or_coming
        for _ in range(max(0, min(deficit, room))):
            self._starting += 1
            self._spawn(self._start_one(), self._starts)

    def _spawn(
        self, coro: Coroutine[Any, Any, None], group: set[asyncio.Task[None]] | None = None
    ) -> None:
        tasks = self._chores if group is None else group
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _top_up_shells(self) -> None:
        """Start standby shells in the background until ``standby`` exist (no await inside,
        so callers need not hold the lock)."""
        while not self._closed and len(self._shells) + self._shells_starting < self.standby:
            self._shells_starting += 1
            self._spawn(self._prepare_standby(), self._starts)

    async def _new_shell(self) -> S:
        assert self._factory is not None
        async with self._start_slots:
            return await self._factory.prepare()

    async def _prepare_standby(self) -> None:
        try:
            shell = await self._new_shell()
        except AgentVMError as exc:
            self._note_failure(exc, "pool_standby_failed")
            return
        finally:
            self._shells_starting -= 1
        if self._closed:
            await self._discard_shell(shell)
        else:
            self._shells.append(shell)

    def _take_shell(self) -> S | None:
        while self._shells:
            shell = self._shells.popleft()
            if shell.alive():
                return shell
            self._spawn(self._discard_shell(shell))
        return None

    async def _start_one(self) -> None:
        assert self._factory is not None
        try:
            if self._failures:
                await asyncio.sleep(FAILURE_BACKOFF[min(self._failures, len(FAILURE_BACKOFF)) - 1])
            if self._closed:
                self._starting -= 1
                return
            started = time.monotonic()
            shell = self._take_shell() or await self._new_shell()
            self._top_up_shells()
            vm = await self._factory.activate(shell)
        except asyncio.CancelledError:
            self._starting -= 1
            raise
        except AgentVMError as exc:
            self._note_failure(exc, "pool_start_failed")
            async with self._cond:
                self._starting -= 1
                self._refill()
                self._cond.notify_all()
            return
        entry = _Entry(vm, time.monotonic(), started_seconds=time.monotonic() - started)
        self._start_seconds.append(entry.started_seconds)
        self._failures = 0
        self._last_error = None
        self._started += 1
        async with self._cond:
            self._starting -= 1
            if self._closed:
                self._spawn(self._close_entry(entry))
                return
            self._idle.append(entry)
            self._cond.notify_all()

    def _note_failure(self, exc: AgentVMError, event: str) -> None:
        self._failures += 1
        self._last_error = exc
        log.error(event, error=str(exc), failures=self._failures)

    def _discard(self, entry: _Entry[V]) -> None:
        self._spawn(self._close_entry(entry))

    async def _close_entry(self, entry: _Entry[V]) -> None:
        try:
            await entry.vm.close()
        except AgentVMError as exc:
            log.warning("pool_discard_failed", vm=entry.vm.name, error=str(exc))

    async def _discard_shell(self, shell: S) -> None:
        try:
            await shell.discard()
        except AgentVMError as exc:
            log.warning("pool_discard_failed", vm=shell.name, error=str(exc))

    def _on_stopped(self, name: str) -> None:
        entry = next((e for e in self._idle if e.vm.name == name), None)
        entry = entry or self._in_use.get(name)
        if entry is None or entry.dead:
            return
        entry.dead = True
        log.warning("pool_vm_stopped", vm=name)
        self._spawn(self._replace_dead(entry))

    async def _replace_dead(self, entry: _Entry[V]) -> None:
        async with self._cond:
            if entry in self._idle:
                self._idle.remove(entry)
                self._replaced_dead += 1
                self._discard(entry)
            elif self._in_use.get(entry.vm.name) is entry:
                # The holder gets VMDiedError from its next call. Its slot is freed now so
                # that a replacement can start; release() still accepts the VM.
                self._dead_in_use[entry.vm.name] = self._in_use.pop(entry.vm.name)
                self._replaced_dead += 1
            self._refill()

    async def _watch(self) -> None:
        """Health, TTL and the factory's housekeeping, every ``health_interval`` seconds."""
        assert self._factory is not None
        while not self._closed:
            await asyncio.sleep(self.health_interval)
            try:
                await self._factory.maintain()
            except AgentVMError as exc:
                log.warning("pool_maintenance_failed", error=str(exc))
            now = time.monotonic()
            for entry in list(self._idle):
                stale = now - entry.created > self.ttl_seconds
                healthy = entry.alive() and await entry.vm.healthy()
                if stale or not healthy:
                    async with self._cond:
                        if entry in self._idle:
                            self._idle.remove(entry)
                            if not healthy:
                                self._replaced_dead += 1
                            self._discard(entry)
                            self._refill()
            async with self._cond:
                self._refill()

    async def _wait_until(
        self, condition: Callable[[], bool], what: str, timeout: float = START_UP_TIMEOUT
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self._cond:
            while not condition():
                if self._failures >= 3 and self._last_error is not None:
                    raise PoolError(f"{what} failed: {self._last_error}")
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise BootTimeout(f"{what} did not finish within {timeout:.0f} s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._cond.wait(), min(remaining, 1.0))
