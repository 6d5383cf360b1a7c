"""A pool of pre-started VMs: acquire in milliseconds, clean machine after every release.

* ``acquire`` only pops an idle VM that passes cheap liveness checks (no libvirt call, no
  guest round trip), or waits for one.
* ``release`` never resets on the caller's path: the used VM is destroyed and a fresh
  clone of the golden state started in the background. "Reset" therefore means
  "replaced by a clone", which also guarantees nothing a user did survives. The pool keeps
  ``standby`` clone shells (QEMU started, waiting for the golden state) so that a reset
  costs only loading the state, the handshake and CONFIGURE (~0.2 s here, not ~0.6 s).
* A monitor task pings idle VMs, evicts them after ``ttl_seconds`` and keeps the pool at
  ``min_size``; libvirt lifecycle events mark VMs whose QEMU stopped, which are replaced.
* Start-up reaps domains and work directories left by crashed agent-vm processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import libvirt

from agent_vm.config import Settings, load_settings
from agent_vm.core.connection import LibvirtConnection
from agent_vm.core.events import LifecycleEvents
from agent_vm.core.template import NetworkMode
from agent_vm.errors import AgentVMError, PoolClosedError, PoolError, PoolExhaustedError
from agent_vm.execution.golden import (
    CloneShell,
    GoldenState,
    GoldenStore,
    activate_shell,
    prepare_shell,
)
from agent_vm.execution.machine import MachineSpec, RunningVM, retry_pending_cleanups
from agent_vm.execution.reaper import reap
from agent_vm.image.builder import ImageBuilder
from agent_vm.image.store import Image
from agent_vm.logs import get_logger
from agent_vm.network.guard import NetworkGuard, sandbox_directory
from agent_vm.network.policy import EgressPolicy

log = get_logger(__name__)

STOP_EVENTS = (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_CRASHED)
MAX_PARALLEL_STARTS = 2
SHUTDOWN_GRACE = 60.0
FAILURE_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)


@dataclass(eq=False)
class _Entry:
    vm: RunningVM
    created: float
    qemu_pid: int | None
    dead: bool = False
    started_seconds: float = 0.0

    def alive(self) -> bool:
        """Cheap checks only: a death event, a closed channel, a gone or zombie QEMU."""
        if self.dead or not self.vm.connected:
            return False
        if self.qemu_pid is None:
            return True
        try:
            with open(f"/proc/{self.qemu_pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False


@dataclass
class PoolStats:
    idle: int
    in_use: int
    starting: int
    standby: int
    started: int
    replaced_dead: int
    start_seconds: list[float] = field(default_factory=list)


class VMPool:
    """Pre-warmed VMs started from one golden state.

    >>> pool = VMPool(min_size=2, max_size=4, ttl_seconds=3600)
    >>> await pool.initialize()
    >>> vm = await pool.acquire(timeout=10)
    >>> ...  # AgentExecutor().execute(vm, ...)
    >>> await pool.release(vm)
    >>> await pool.shutdown()
    """

    def __init__(
        self,
        min_size: int = 2,
        max_size: int = 4,
        ttl_seconds: float = 3600.0,
        *,
        image: Image | str | None = None,
        spec: MachineSpec | None = None,
        settings: Settings | None = None,
        connection: LibvirtConnection | None = None,
        guard: NetworkGuard | None = None,
        policy: EgressPolicy | None = None,
        health_interval: float = 2.0,
        standby: int = 1,
    ) -> None:
        if not 0 <= min_size <= max_size or max_size < 1 or standby < 0:
            raise ValueError("need 0 <= min_size <= max_size, max_size >= 1, standby >= 0")
        self.standby = standby
        self.min_size = min_size
        self.max_size = max_size
        self.ttl_seconds = ttl_seconds
        self.health_interval = health_interval
        self.settings = settings or load_settings()
        self.spec = spec or MachineSpec()
        self._image_arg = image
        self._connection = connection or LibvirtConnection(self.settings.libvirt_uri)
        self._owns_connection = connection is None
        self.policy = policy
        self._guard = guard
        self._owns_guard = False
        self._image: Image | None = None
        self._golden: GoldenState | None = None
        self._idle: deque[_Entry] = deque()
        self._in_use: dict[str, _Entry] = {}
        self._dead_in_use: dict[str, _Entry] = {}  # acquired, then their QEMU stopped
        self._by_uuid: dict[str, _Entry] = {}
        self._starting = 0
        self._shells: deque[CloneShell] = deque()
        self._shells_starting = 0
        self._waiters = 0
        self._cond = asyncio.Condition()
        self._starts: set[asyncio.Task[None]] = set()  # cancelled on shutdown
        self._chores: set[asyncio.Task[None]] = set()  # discards etc.: awaited on shutdown
        self._start_slots = asyncio.Semaphore(MAX_PARALLEL_STARTS)
        self._monitor: asyncio.Task[None] | None = None
        self._unsubscribe: list[Callable[[], None]] = []
        self._failures = 0
        self._last_error: BaseException | None = None
        self._closed = False
        self._started = 0
        self._replaced_dead = 0
        self._start_seconds: deque[float] = deque(maxlen=200)

    # ------------------------------------------------------------------ lifecycle

    @property
    def connection(self) -> LibvirtConnection:
        return self._connection

    @property
    def guard(self) -> NetworkGuard | None:
        return self._guard

    @property
    def golden(self) -> GoldenState | None:
        return self._golden

    async def initialize(self) -> None:
        """Reap leftovers, make sure the golden state exists, start ``min_size`` VMs."""
        await asyncio.to_thread(self._connection.open)
        reaped = await asyncio.to_thread(
            reap,
            self._connection,
            self.settings.vms_dir,
            network_records=sandbox_directory(self.settings),
        )
        if reaped:
            log.info("pool_reaped_leftovers", names=reaped)
        self._image = await asyncio.to_thread(self._resolve_image)
        if self._guard is None and self.spec.network_mode is NetworkMode.NAT_FILTERED:
            self._guard = NetworkGuard(self._connection, self.settings)
            self._owns_guard = True
        if self._guard is not None:
            await self._guard.start()
        store = GoldenStore(self.settings.state_dir, self.settings.vms_dir, self.settings.ram_dir)
        self._golden = await store.ensure(
            self._connection,
            self._image,
            self.spec,
            guard=self._guard,
            boot_timeout=self.settings.boot_timeout,
        )
        events = LifecycleEvents(self._connection)
        self._unsubscribe.append(events.subscribe(self._on_lifecycle))
        async with self._cond:
            self._refill()
            self._top_up_shells()
        await self._wait_until(lambda: len(self._idle) >= self.min_size, "pool start-up")
        self._monitor = asyncio.create_task(self._watch(), name="vm-pool-monitor")

    def _resolve_image(self) -> Image:
        if isinstance(self._image_arg, Image):
            return self._image_arg
        return ImageBuilder(self.settings).ensure(self._image_arg)

    async def shutdown(self) -> None:
        """Destroy every VM of the pool, idle or acquired. The golden state stays cached."""
        if self._closed:
            return
        self._closed = True
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        async with self._cond:
            self._cond.notify_all()
        # Starts are not cancelled: a start that has just finished would lose its result
        # (and leak its VM) when cancelled before resuming. They see the pool closed and
        # discard what they made; only one stuck past the grace period is cancelled.
        if self._starts:
            _done, stuck = await asyncio.wait(set(self._starts), timeout=SHUTDOWN_GRACE)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        await asyncio.gather(*self._chores, return_exceptions=True)
        entries = [*self._idle, *self._in_use.values(), *self._dead_in_use.values()]
        shells = list(self._shells)
        self._idle.clear()
        self._in_use.clear()
        self._dead_in_use.clear()
        self._shells.clear()
        await asyncio.gather(
            *(e.vm.close() for e in entries),
            *(shell.discard() for shell in shells),
            return_exceptions=True,
        )
        await asyncio.to_thread(retry_pending_cleanups)
        if self._owns_guard and self._guard is not None:
            await self._guard.close()
        if self._owns_connection:
            self._connection.close()

    async def __aenter__(self) -> VMPool:
        await self.initialize()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

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

    async def acquire(self, timeout: float = 30.0) -> RunningVM:
        """A clean, running VM: at once when one is idle, else within ``timeout`` seconds."""
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

    async def release(self, vm: RunningVM) -> None:
        """Give a VM back; it is destroyed and replaced by a fresh clone in the background."""
        async with self._cond:
            entry = self._in_use.pop(vm.name, None) or self._dead_in_use.pop(vm.name, None)
            if entry is None:
                raise PoolError(f"{vm.name} is not acquired from this pool")
            self._discard(entry)
            self._refill()

    # ------------------------------------------------------------------ internals

    def _pop_idle(self) -> _Entry | None:
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
        if self._closed or self._golden is None:
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

    async def _new_shell(self) -> CloneShell:
        assert self._image is not None and self._golden is not None
        async with self._start_slots:
            return await prepare_shell(
                self._connection,
                self._image,
                self._golden,
                self.spec,
                vms_dir=self.settings.vms_dir,
                guard=self._guard,
                policy=self.policy,
            )

    async def _prepare_standby(self) -> None:
        try:
            shell = await self._new_shell()
        except asyncio.CancelledError:
            self._shells_starting -= 1
            raise
        except AgentVMError as exc:
            self._shells_starting -= 1
            self._failures += 1
            self._last_error = exc
            log.error("pool_standby_failed", error=str(exc))
            return
        self._shells_starting -= 1
        if self._closed:
            await shell.discard()
        else:
            self._shells.append(shell)

    def _take_shell(self) -> CloneShell | None:
        while self._shells:
            shell = self._shells.popleft()
            if shell.alive():
                return shell
            self._spawn(shell.discard())
        return None

    async def _start_one(self) -> None:
        try:
            if self._failures:
                await asyncio.sleep(FAILURE_BACKOFF[min(self._failures, len(FAILURE_BACKOFF)) - 1])
            if self._closed:
                self._starting -= 1
                return
            assert self._image is not None
            started = time.monotonic()
            shell = self._take_shell() or await self._new_shell()
            self._top_up_shells()
            vm = await activate_shell(shell, self._image, timeout=self.settings.boot_timeout)
            entry = _Entry(vm, time.monotonic(), shell.qemu_pid)
            entry.started_seconds = time.monotonic() - started
            self._start_seconds.append(entry.started_seconds)
            self._by_uuid[vm.vm.uuid] = entry
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
        except asyncio.CancelledError:
            self._starting -= 1
            raise
        except AgentVMError as exc:
            self._failures += 1
            self._last_error = exc
            log.error("pool_start_failed", error=str(exc), failures=self._failures)
            async with self._cond:
                self._starting -= 1
                self._refill()
                self._cond.notify_all()

    def _discard(self, entry: _Entry) -> None:
        self._by_uuid.pop(entry.vm.vm.uuid, None)
        self._spawn(self._close_entry(entry))

    async def _close_entry(self, entry: _Entry) -> None:
        try:
            await entry.vm.close()
        except AgentVMError as exc:
            log.warning("pool_discard_failed", vm=entry.vm.name, error=str(exc))

    def _on_lifecycle(self, uuid: str, event: int, _detail: int) -> None:
        entry = self._by_uuid.get(uuid)
        if entry is None or event not in STOP_EVENTS or entry.dead:
            return
        entry.dead = True
        log.warning("pool_vm_stopped", vm=entry.vm.name, lifecycle_event=event)
        self._spawn(self._replace_dead(entry))

    async def _replace_dead(self, entry: _Entry) -> None:
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
        """Health, TTL and libvirt reconnection, every ``health_interval`` seconds."""
        while not self._closed:
            await asyncio.sleep(self.health_interval)
            try:
                await asyncio.to_thread(lambda: self._connection.connection)  # reconnects
                await asyncio.to_thread(retry_pending_cleanups)
            except AgentVMError as exc:
                log.warning("pool_libvirt_unavailable", error=str(exc))
            now = time.monotonic()
            for entry in list(self._idle):
                stale = now - entry.created > self.ttl_seconds
                healthy = entry.alive() and await self._answers(entry)
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

    @staticmethod
    async def _answers(entry: _Entry) -> bool:
        try:
            await (await entry.vm.channel(timeout=5)).ping(timeout=5)
        except AgentVMError:
            return False
        return True

    async def _wait_until(
        self, condition: Callable[[], bool], what: str, timeout: float = 300.0
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self._cond:
            while not condition():
                if self._failures and self._last_error is not None and self._failures >= 3:
                    raise PoolError(f"{what} failed: {self._last_error}")
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise PoolError(f"{what} did not finish within {timeout:.0f} s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._cond.wait(), min(remaining, 1.0))
