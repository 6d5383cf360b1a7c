"""VMPool: pre-warmed VMs started from one golden state, for instant sandboxes.

The pool logic (acquire, release-with-replace, standby shells, health, TTL) is in
``pooling.py``; this module supplies the real VMs: the runtime finds the image and the
golden state, and each VM is a clone shell (QEMU started ahead, waiting for the golden
state) activated when the pool needs it. libvirt lifecycle events mark clones whose QEMU
stopped, so they are replaced.

>>> async with VMPool(min_size=2, max_size=4, ttl_seconds=3600) as pool:
...     vm = await pool.acquire(timeout=10)
...     ...  # AgentExecutor().execute(vm, ...) or AsyncSandbox(pool=pool)
...     await pool.release(vm)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import libvirt

from agent_vm.config import Settings
from agent_vm.core.events import LifecycleEvent
from agent_vm.core.template import ResourceProfile
from agent_vm.errors import AgentVMError
from agent_vm.execution.clones import CloneShell, activate_shell, prepare_shell
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.golden import GoldenState
from agent_vm.execution.pooling import ShellPool
from agent_vm.execution.running import RunningVM
from agent_vm.execution.shells import PoolStats
from agent_vm.execution.spec import MachineSpec, NetworkChoice
from agent_vm.execution.teardown import retry_pending
from agent_vm.image.store import Image
from agent_vm.network.guard import NetworkGuard
from agent_vm.network.policy import EgressPolicy

if TYPE_CHECKING:
    from agent_vm.execution.runtime import Runtime

__all__ = ["PoolStats", "VMPool"]

STOP_EVENTS = (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_CRASHED)
# Run in every pooled VM before it is handed out: a clone's first command pays for the
# guest's cold paths (under TCG, for translating them: ~0.3 s for `true`, ~0.5 s for a
# first python3), and a pool is there to take that off the caller's path.
DEFAULT_WARMUP: tuple[str, ...] = ("sh", "-c", "python3 -c pass 2>/dev/null; true")
WARMUP_TIMEOUT = 60.0
BACKGROUND_SHARES = 256  # a quarter of the default 1024 every VM in use has
NORMAL_SHARES = 1024


class CloneFactory:
    """Clone shells of one golden state, for one pool."""

    def __init__(
        self,
        runtime: Runtime,
        image: Image,
        golden: GoldenState,
        spec: MachineSpec,
        guard: NetworkGuard | None,
        policy: EgressPolicy | None,
        warmup: Sequence[str] = (),
    ) -> None:
        self.runtime = runtime
        self.warmup = tuple(warmup)
        # One warm-up at a time: a big pool filling does not run thirty python3s at once
        self._warming = asyncio.Semaphore(2)
        self.urgent: Callable[[], bool] = lambda: False  # the pool: someone waits, none idle
        self.image = image
        self.golden = golden
        self.spec = spec
        self.guard = guard
        self.policy = policy

    async def prepare(self) -> CloneShell:
        return await prepare_shell(
            self.runtime.connection,
            self.image,
            self.golden,
            self.spec,
            vms_dir=self.runtime.settings.vms_dir,
            guard=self.guard,
            policy=self.policy,
            confinement=self.runtime.confinement,
        )

    async def activate(self, shell: CloneShell) -> RunningVM:
        """The golden state loaded and the warm-up run, at a low CPU share while the pool
        has VMs to spare (on a busy host a VM made for later waits for the ones in use;
        CONFIGURE may then take longer than its usual 10 s). When someone waits, or
        nothing is idle, the VM starts at the normal share and skips the warm-up: its
        first command paying the cold paths beats waiting for them."""
        lowered = not self.urgent()
        if lowered:
            with contextlib.suppress(AgentVMError):  # a share is an optimisation
                await asyncio.to_thread(shell.vm.set_cpu_shares, BACKGROUND_SHARES)
        timeout = self.runtime.settings.boot_timeout
        vm = await activate_shell(shell, self.image, timeout=timeout, configure_timeout=timeout)
        try:
            if self.warmup and not self.urgent():
                async with self._warming:
                    await AgentExecutor().execute(vm, self.warmup, timeout=WARMUP_TIMEOUT)
            if lowered:
                await asyncio.to_thread(vm.vm.set_cpu_shares, NORMAL_SHARES)
        except BaseException:  # also a pool shutting down meanwhile: never leave the VM
            await asyncio.shield(vm.close())
            raise
        return vm

    def subscribe(self, on_stopped: Callable[[str], None]) -> Callable[[], None]:
        def deliver(event: LifecycleEvent) -> None:
            if event.event in STOP_EVENTS:
                on_stopped(event.name)

        return self.runtime.events.subscribe(deliver)

    async def maintain(self) -> None:
        await self.runtime.reconnect()
        await retry_pending()


class VMPool(ShellPool[CloneShell, RunningVM]):
    """Pre-warmed VMs started from one golden state.

    Takes the same simple arguments as ``Sandbox``: ``image`` (a built image's name,
    default: the settings' image), ``profile`` (light, standard, intensive or a
    ResourceProfile), ``network`` (nat, isolated, bridge:NAME), ``policy`` (NAT only),
    ``warmup``: a command run in each VM before it is handed out (``()``: none).
    Without ``runtime`` the pool makes its own and closes it on shutdown.
    """

    def __init__(
        self,
        min_size: int = 2,
        max_size: int = 4,
        ttl_seconds: float = 3600.0,
        *,
        image: str | None = None,
        profile: str | ResourceProfile = "light",
        network: NetworkChoice = "nat",
        policy: EgressPolicy | None = None,
        runtime: Runtime | None = None,
        settings: Settings | None = None,
        health_interval: float = 2.0,
        standby: int = 1,
        warmup: Sequence[str] = DEFAULT_WARMUP,
    ) -> None:
        super().__init__(
            min_size, max_size, ttl_seconds, health_interval=health_interval, standby=standby
        )
        if runtime is None:
            from agent_vm.execution.runtime import Runtime

            runtime = Runtime(settings)
            self._owns_runtime = True
        else:
            self._owns_runtime = False
        self.runtime = runtime
        self.spec = runtime.spec(profile=profile, network=network)  # validated now
        self.policy = policy
        self.warmup = tuple(warmup)
        self._image_name = image
        self._clones: CloneFactory | None = None

    @property
    def image(self) -> Image | None:
        return self._clones.image if self._clones is not None else None

    @property
    def golden(self) -> GoldenState | None:
        return self._clones.golden if self._clones is not None else None

    @property
    def guard(self) -> NetworkGuard | None:
        return self._clones.guard if self._clones is not None else None

    async def _make_factory(self) -> CloneFactory:
        await self.runtime.start()
        self.runtime.adopt(self)
        image = await self.runtime.image(self._image_name)
        guard = await self.runtime.guard_for(self.spec)
        golden = await self.runtime.golden(image, self.spec)
        self._clones = CloneFactory(
            self.runtime, image, golden, self.spec, guard, self.policy, self.warmup
        )
        self._clones.urgent = lambda: self._waiters > 0 or not self._idle
        return self._clones

    async def shutdown(self) -> None:
        """Destroy every VM of the pool, idle or acquired. The golden state stays cached."""
        await super().shutdown()
        self.runtime.disown(self)
        if self._owns_runtime:
            await self.runtime.close()

    async def __aenter__(self) -> VMPool:
        await self.initialize()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()
