"""The one object that assembles agent-vm's stack; every entry point builds on it.

A ``Runtime`` owns the settings, the accelerator choice (resolved once, from the host),
the libvirt connection and its lifecycle events, the network guard (started on first
use by a NAT_FILTERED VM), the golden store and image lookup. It hands out VMs: fresh
ones from the golden state, cold boots, or pools it holds. ``cli.py``, ``sandbox/`` and
``VMPool`` build on it; nothing else constructs the connection, the guard or the golden
store. Blocking work (image lookup and builds, libvirt calls, daemons) runs in threads.
A runtime belongs to the event loop it is first used on (its guard's tasks and locks do);
the blocking ``Sandbox`` therefore makes its runtimes on its own background loop.

>>> async with Runtime() as runtime:
...     vm = await runtime.vm(spec=runtime.spec(profile="standard", network="isolated"))
...     ...
...     await vm.close()
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from agent_vm.config import Settings, load_settings
from agent_vm.core.connection import LibvirtConnection
from agent_vm.core.events import LifecycleEvents
from agent_vm.core.template import NetworkMode, ResourceProfile
from agent_vm.errors import AgentVMError, ConfigError
from agent_vm.execution.clones import start_clone
from agent_vm.execution.confine import Confinement, qemu_opens_private_ram_read_only
from agent_vm.execution.golden import GoldenState, GoldenStore
from agent_vm.execution.launch import launch_vm
from agent_vm.execution.layers import build_layer
from agent_vm.execution.reaper import reap
from agent_vm.execution.running import RunningVM
from agent_vm.execution.snapshots import SnapshotStore
from agent_vm.execution.spec import MachineSpec, NetworkChoice, parse_network
from agent_vm.execution.teardown import retry_pending
from agent_vm.host import ksm
from agent_vm.host.accel import AccelChoice, HostPaths, detect_accel
from agent_vm.host.daemons import ensure_daemons
from agent_vm.host.identities import Identities
from agent_vm.host.resources import HostResources, read_resources
from agent_vm.image.builder import ImageBuilder, Progress
from agent_vm.image.recipe import LoadedRecipe, load_recipe
from agent_vm.image.store import Image, ImageStore
from agent_vm.logs import get_logger
from agent_vm.network.guard import NetworkGuard
from agent_vm.network.policy import EgressPolicy
from agent_vm.network.sandboxes import sandbox_directory

log = get_logger(__name__)

MIN_MEMORY_MIB = 128
MIN_DISK_GIB = 2  # the image's root file system is built at this size


class HeldPool(Protocol):
    """A pool on this runtime (``VMPool`` adopts itself): shut down with the runtime."""

    async def shutdown(self) -> None: ...


def _quiet(_: str) -> None:
    return None


class Runtime:
    """Settings, connection, network guard, golden store and images, for one process."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        host: HostPaths | None = None,
        resources: Callable[[], HostResources] = read_resources,
    ) -> None:
        self.settings = settings or load_settings()
        self.accel: AccelChoice = detect_accel(self.settings.accel, host or HostPaths())
        self.connection = LibvirtConnection(self.settings.libvirt_uri)
        self.events = LifecycleEvents(self.connection)
        self.golden_store = GoldenStore(
            self.settings.state_dir, self.settings.vms_dir, self.settings.ram_dir
        )
        self.images = ImageStore(self.settings.images_dir)
        self.snapshots = SnapshotStore(
            self.settings.state_dir, self.settings.vms_dir, self.settings.paused_dir
        )
        self._builder = ImageBuilder(self.settings)
        self.identities = Identities(self.settings.uid_base)
        self.confinement: Confinement | None = None  # set by start()
        self._resources = resources
        self._guard: NetworkGuard | None = None
        self._pools: set[HeldPool] = set()
        self._vms: set[RunningVM] = set()
        self._lock: asyncio.Lock | None = None
        self._reaped: list[str] = []
        self._started = False
        self._closed = False

    # ------------------------------------------------------------------ machines

    def spec(
        self,
        *,
        profile: str | ResourceProfile = "light",
        network: NetworkChoice = "nat",
        cpus: int | None = None,
        memory_mib: int | None = None,
        disk_gib: int | None = None,
    ) -> MachineSpec:
        """The hardware for a VM, with this host's accelerator; refused (ConfigError)
        when the host cannot give it."""
        base = ResourceProfile.preset(profile) if isinstance(profile, str) else profile
        if cpus is not None and cpus < 1:
            raise ConfigError(f"--cpus must be at least 1, not {cpus}")
        if memory_mib is not None and memory_mib < MIN_MEMORY_MIB:
            raise ConfigError(f"--memory must be at least {MIN_MEMORY_MIB} MiB, not {memory_mib}")
        vcpu = cpus if cpus is not None else base.vcpu
        memory = memory_mib if memory_mib is not None else base.memory_mib
        host = self._resources()
        if vcpu > host.cpus:
            raise ConfigError(
                f"{vcpu} vCPUs asked for, but this host has {host.cpus} CPUs",
                hint=f"use --cpus {host.cpus} or fewer",
            )
        if host.memory_available_mib and memory > host.memory_available_mib:
            raise ConfigError(
                f"{memory} MiB of guest memory asked for, but this host has "
                f"{host.memory_available_mib} MiB available (of {host.memory_total_mib} MiB)",
                hint=f"use --memory {host.memory_available_mib} or less",
            )
        if disk_gib is not None and disk_gib < MIN_DISK_GIB:
            raise ConfigError(f"--disk must be at least {MIN_DISK_GIB} GiB, not {disk_gib}")
        disk = disk_gib if disk_gib is not None else base.disk_gib
        resources = ResourceProfile(
            **{**base.model_dump(), "vcpu": vcpu, "memory_mib": memory, "disk_gib": disk}
        )
        mode, bridge = parse_network(network)
        return MachineSpec(
            profile=resources, accel=self.accel.accel, network_mode=mode, bridge=bridge
        )

    async def vm(
        self,
        *,
        image: str | Image | None = None,
        spec: MachineSpec | None = None,
        policy: EgressPolicy | None = None,
        cold: bool = False,
        progress: Progress = _quiet,
    ) -> RunningVM:
        """A fresh VM: cloned from the golden state (captured first if needed), or booted
        with ``cold``. The caller closes it; whatever is still open goes with close()."""
        await self.start()
        built = image if isinstance(image, Image) else await self.image(image, progress)
        chosen = spec or self.spec()
        guard = await self.guard_for(chosen)
        if (
            policy is None
            and built.allowlist is not None
            and chosen.network_mode is NetworkMode.NAT_FILTERED
        ):
            policy = EgressPolicy(allow_domains=built.allowlist)  # the recipe's names only
        if cold:
            vm = await launch_vm(
                self.connection, built, chosen, vms_dir=self.settings.vms_dir, guard=guard,
                policy=policy, boot_timeout=self.settings.boot_timeout,
                confinement=self.confinement,
            )  # fmt: skip
        else:
            golden = await self.golden(built, chosen, progress)
            vm = await start_clone(
                self.connection, built, golden, chosen, vms_dir=self.settings.vms_dir,
                guard=guard, policy=policy, timeout=self.settings.boot_timeout,
                confinement=self.confinement,
            )  # fmt: skip
        self.track(vm)
        return vm

    def track(self, vm: RunningVM) -> None:
        """A VM this runtime closes with itself (if its user has not)."""
        self._vms = {held for held in self._vms if not held.closed}
        self._vms.add(vm)

    def adopt(self, pool: HeldPool) -> None:
        self._pools.add(pool)

    def disown(self, pool: HeldPool) -> None:
        self._pools.discard(pool)

    # ------------------------------------------------------------------ the stack

    async def start(self) -> None:
        """Daemons up, libvirt connected, leftovers of crashed processes reaped. Once."""
        async with self._get_lock():
            if self._started:
                return
            if self._closed:
                raise ConfigError("this runtime was closed")
            await asyncio.to_thread(self._start)
            self._started = True

    def _start(self) -> None:
        ensure_daemons()
        self.connection.open()
        self.confine()
        if self.settings.ksm:
            ksm.enable()
        self._reaped = reap(
            self.connection,
            self.settings.vms_dir,
            network_records=sandbox_directory(self.settings.network_name),
            identities=self.identities,
        )
        if self._reaped:
            log.info("reaped_leftovers", names=self._reaped)

    def confine(self) -> Confinement:
        """How this host keeps sandboxes apart (see ``confine.py``); blocking, idempotent."""
        if self.confinement is None:
            _, qemu_version = self.connection.versions()
            confinement = Confinement(
                self.identities,
                self.settings.images_dir,
                self.settings.images_view,
                ram_read_only=qemu_opens_private_ram_read_only(qemu_version),
            )
            confinement.prepare()
            self.confinement = confinement
        return self.confinement

    async def reconnect(self) -> None:
        """Reopen the libvirt connection if libvirtd went away (logged, never raised)."""
        try:
            await asyncio.to_thread(lambda: self.connection.connection)
        except AgentVMError as exc:
            log.warning("libvirt_unavailable", error=str(exc))

    async def guard(self) -> NetworkGuard:
        """The network guard of this runtime, started on first use."""
        await self.start()
        async with self._get_lock():
            if self._guard is None:
                self._guard = NetworkGuard(self.connection, self.settings)
            guard = self._guard
        await guard.start()
        return guard

    async def guard_for(self, spec: MachineSpec) -> NetworkGuard | None:
        if spec.network_mode is NetworkMode.NAT_FILTERED:
            return await self.guard()
        return None

    async def image(self, name: str | None = None, progress: Progress = _quiet) -> Image:
        """A built image by name (the settings' default is built on first use; any other
        name must have been built with ``agent-vm image build --name NAME``)."""
        return await asyncio.to_thread(self.find_image, name, progress)

    def find_image(self, name: str | None = None, progress: Progress = _quiet) -> Image:
        """Blocking twin of :meth:`image`, for the CLI."""
        wanted = name or self.settings.image
        if wanted != self.settings.image:
            self.images.require(wanted)  # never built: say how, rather than build it now
        return self._builder.ensure(wanted, progress=progress)

    def build_image(
        self, name: str | None = None, *, force: bool = False, progress: Progress = _quiet
    ) -> Image:
        """Build (or find, when its inputs did not change) an image; blocking."""
        return self._builder.build(name, force=force, progress=progress)

    async def build_recipe(
        self,
        recipe: str | os.PathLike[str] | LoadedRecipe,
        *,
        name: str | None = None,
        force: bool = False,
        progress: Progress = _quiet,
    ) -> Image:
        """The image of a recipe: a layer on the base image, built unless one with the
        same inputs exists (then this takes well under a second)."""
        loaded = recipe if isinstance(recipe, LoadedRecipe) else load_recipe(recipe)
        await self.start()
        return await build_layer(self, loaded, name=name, force=force, progress=progress)

    async def golden(
        self, image: Image, spec: MachineSpec, progress: Progress = _quiet
    ) -> GoldenState:
        """The golden state of (image, spec), captured now if it does not exist."""
        golden = self.golden_store.locate_for(image, spec)
        if await asyncio.to_thread(golden.ready):
            return golden
        await asyncio.to_thread(self._check_shared_memory, spec)
        progress("creating the golden state (first start of this image and hardware)")
        await self.start()
        return await self.golden_store.ensure(
            self.connection,
            image,
            spec,
            guard=await self.guard_for(spec),
            boot_timeout=self.settings.boot_timeout,
            confinement=self.confinement,
        )

    def _check_shared_memory(self, spec: MachineSpec) -> None:
        """Golden RAM lives in tmpfs: a guest bigger than its free space would crash QEMU
        half way through the capture."""
        ram_dir = self.settings.ram_dir
        probe = next((p for p in (ram_dir, *ram_dir.parents) if p.exists()), Path("/"))
        free_mib = shutil.disk_usage(probe).free // 2**20
        if spec.profile.memory_mib > free_mib:
            raise ConfigError(
                f"{spec.profile.memory_mib} MiB of guest memory does not fit the golden "
                f"state's shared memory: {free_mib} MiB free in {probe}",
                hint="use less --memory, --cold, or a larger tmpfs (AGENT_VM_SHM_DIR)",
            )

    async def collect_garbage(self, *, all_owners: bool = False) -> list[str]:
        """Remove what crashed agent-vm processes left, and golden states of removed images
        (what :meth:`start` already removed is part of the answer)."""
        await self.start()
        reaped_at_start, self._reaped = self._reaped, []

        def collect() -> list[str]:
            removed = reaped_at_start + reap(
                self.connection,
                self.settings.vms_dir,
                include_live_owners=all_owners,
                network_records=sandbox_directory(self.settings.network_name),
                identities=self.identities,
            )
            live = {image.build_id for image, _ in self.images.all()}
            removed += [f"golden state {d}" for d in self.golden_store.prune(live)]
            return removed + [f"fork snapshot {n}" for n in self.snapshots.prune()]

        return await asyncio.to_thread(collect)

    async def close(self) -> None:
        """Shut the pools down, close the VMs still open, stop the guard, disconnect."""
        if self._closed:
            return
        self._closed = True
        for pool in list(self._pools):
            await pool.shutdown()
        await asyncio.gather(*(vm.close() for vm in self._vms), return_exceptions=True)
        self._vms.clear()
        if self._started:
            await retry_pending()
        if self._guard is not None:
            await self._guard.close()
        await asyncio.to_thread(self.connection.close)

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _get_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock
