"""Clones of a golden state: a shell (overlay on the golden disk, domain defined and
started with ``-incoming defer``, RAM file mapped private) made ahead, then activated
(device state migrated in, handshake, CONFIGURE: its own clock, entropy, hostname,
machine-id and network) when someone needs a VM.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

from agent_vm.core.connection import LibvirtConnection
from agent_vm.core.qmp import load_device_state
from agent_vm.core.template import MemoryFile
from agent_vm.core.vm import VM
from agent_vm.errors import VMError
from agent_vm.execution.confine import Confinement
from agent_vm.execution.golden import GoldenState
from agent_vm.execution.launch import (
    Held,
    connect_agent,
    creating,
    define_vm,
    new_vm_name,
    start_limited,
)
from agent_vm.execution.nic import Nic
from agent_vm.execution.running import RunningVM
from agent_vm.execution.spec import MachineSpec
from agent_vm.execution.teardown import teardown
from agent_vm.host.identities import Identity
from agent_vm.host.procs import is_alive
from agent_vm.image.store import Image
from agent_vm.logs import get_logger
from agent_vm.network.guard import NetworkGuard
from agent_vm.network.policy import EgressPolicy
from agent_vm.protocol.configure import Configure

log = get_logger(__name__)

# 2: per-sandbox identities (RAM file owner and mode); 3: 9p share; 4: workspace code warm
GOLDEN_VERSION = "4"
SETTLE_TIMEOUT = 30.0


@dataclass
class CloneShell:
    """A started QEMU waiting for a golden state (-incoming defer): libvirt's ~0.4 s start
    is paid ahead, so that activating it takes only the load, handshake and CONFIGURE."""

    vm: VM
    workdir: Path
    golden: GoldenState
    qemu_pid: int | None
    nic: Nic | None = None
    guard: NetworkGuard | None = None
    identity: Identity | None = None
    spec: MachineSpec | None = None

    @property
    def name(self) -> str:
        return self.vm.name

    def alive(self) -> bool:
        return is_alive(self.qemu_pid)

    async def discard(self) -> None:
        await teardown(
            self.vm.name, vm=self.vm, workdir=self.workdir, guard=self.guard,
            identity=self.identity,
        )  # fmt: skip


async def prepare_shell(
    connection: LibvirtConnection,
    image: Image,
    golden: GoldenState,
    spec: MachineSpec,
    *,
    vms_dir: Path,
    guard: NetworkGuard | None = None,
    policy: EgressPolicy | None = None,
    name: str | None = None,
    confinement: Confinement | None = None,
) -> CloneShell:
    """Define and start a clone that waits for its state (~0.4 s here, mostly libvirt).
    Refused when the golden RAM file changed since its capture."""
    if not await asyncio.to_thread(golden.intact):
        raise VMError(
            f"golden state {golden.digest} changed since its capture: not cloning it",
            hint="it is captured again on the next start; see the golden_ram_changed log line",
        )
    read_only = confinement is not None and confinement.ram_read_only
    async with creating(vms_dir, name or new_vm_name(), guard, confinement) as held:
        vm = await define_vm(
            connection, image, spec, held, backing_disk=golden.disk, policy=policy,
            memory_file=MemoryFile(path=golden.ram, shared=False, read_only=read_only),
            incoming=True,
        )  # fmt: skip
        await start_limited(vm, spec)
        pid = await asyncio.to_thread(vm.qemu_pid)
        return CloneShell(vm, held.workdir, golden, pid, held.nic, guard, held.identity, spec)


async def activate_shell(
    shell: CloneShell, image: Image, *, timeout: float = 30.0, configure_timeout: float = 10.0
) -> RunningVM:
    """Load the golden state into the shell and give the VM its own clock, entropy and
    identity. On failure the shell is destroyed. (A pool, with no caller waiting and
    its clones at a low CPU share, allows CONFIGURE longer.)"""
    started = time.monotonic()
    held = Held(shell.workdir, shell.guard, shell.vm, identity=shell.identity)
    try:
        await asyncio.to_thread(load_device_state, shell.vm, shell.golden.state, timeout)
        agent = await connect_agent(held, timeout)
        await agent.configure(
            Configure(
                time_ns=time.time_ns(),
                entropy=os.urandom(64).hex(),
                hostname=shell.vm.name,
                machine_id=os.urandom(16).hex(),
                net=shell.nic.guest if shell.nic is not None else None,
            ),
            timeout=configure_timeout,
        )
    except BaseException:
        await teardown(
            shell.name, vm=shell.vm, workdir=shell.workdir, guard=shell.guard,
            channel=held.agent, identity=shell.identity,
        )  # fmt: skip
        raise
    return RunningVM(
        shell.vm,
        shell.workdir,
        image,
        agent,
        time.monotonic() - started,
        shell.nic,
        shell.guard,
        shell.qemu_pid,
        shell.identity,
        shell.spec,
    )


async def start_clone(
    connection: LibvirtConnection,
    image: Image,
    golden: GoldenState,
    spec: MachineSpec,
    *,
    vms_dir: Path,
    guard: NetworkGuard | None = None,
    policy: EgressPolicy | None = None,
    name: str | None = None,
    timeout: float = 30.0,
    confinement: Confinement | None = None,
) -> RunningVM:
    """A new VM running from the golden state, with its own clock, entropy, identity and
    (NAT_FILTERED) address and egress policy."""
    started = time.monotonic()
    shell = await prepare_shell(
        connection, image, golden, spec, vms_dir=vms_dir, guard=guard, policy=policy,
        name=name, confinement=confinement,
    )  # fmt: skip
    running = await activate_shell(shell, image, timeout=timeout)
    running.boot_seconds = time.monotonic() - started
    log.info(
        "vm_cloned", vm=running.name, golden=golden.digest, seconds=round(running.boot_seconds, 3)
    )
    return running
