"""A libvirt domain with the lifecycle operations agent-vm needs.

Every libvirt failure surfaces as :class:`VMError` with the libvirt message and the
original exception as ``__cause__``. The domain handle is looked up again by UUID after
the connection was reopened (libvirtd restart), so a ``VM`` object stays usable.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import libvirt

from agent_vm.core.connection import LibvirtConnection
from agent_vm.core.template import parse_metadata
from agent_vm.errors import VMError
from agent_vm.host import cgroups
from agent_vm.logs import get_logger

log = get_logger(__name__)

T = TypeVar("T")


class VMState(enum.StrEnum):
    NOSTATE = "nostate"
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"  # shutting down
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"
    UNDEFINED = "undefined"  # the domain no longer exists


_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: VMState.NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: VMState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: VMState.BLOCKED,
    libvirt.VIR_DOMAIN_PAUSED: VMState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: VMState.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: VMState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: VMState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: VMState.PMSUSPENDED,
}


class VM:
    """One libvirt domain."""

    def __init__(self, domain: libvirt.virDomain, connection: LibvirtConnection) -> None:
        self._domain = domain
        self._conn = connection
        self._generation = connection.generation
        self._name: str = domain.name()
        self._uuid: str = domain.UUIDString()
        self.memory_limit_mib: int | None = None  # what limit_memory set, to set again

    @classmethod
    def define(cls, connection: LibvirtConnection, xml: str) -> VM:
        try:
            domain = connection.connection.defineXML(xml)
        except libvirt.libvirtError as exc:
            raise VMError(f"libvirt refused the domain XML: {exc.get_error_message()}") from exc
        return cls(domain, connection)

    @classmethod
    def lookup(cls, connection: LibvirtConnection, name: str) -> VM:
        try:
            domain = connection.connection.lookupByName(name)
        except libvirt.libvirtError as exc:
            raise VMError(f"no VM named {name!r}: {exc.get_error_message()}") from exc
        return cls(domain, connection)

    # -- identity --

    @property
    def name(self) -> str:
        return self._name

    @property
    def uuid(self) -> str:
        return self._uuid

    @property
    def connection(self) -> LibvirtConnection:
        return self._conn

    def __repr__(self) -> str:
        return f"VM({self._name!r})"

    @property
    def domain(self) -> libvirt.virDomain:
        """The live handle, looked up again if the connection was reopened meanwhile."""
        conn = self._conn.connection
        if self._conn.generation != self._generation:
            try:
                self._domain = conn.lookupByUUIDString(self._uuid)
            except libvirt.libvirtError as exc:
                raise VMError(f"VM {self._name} no longer exists") from exc
            self._generation = self._conn.generation
        return self._domain

    def _call(self, what: str, fn: Callable[[libvirt.virDomain], T]) -> T:
        try:
            return fn(self.domain)
        except libvirt.libvirtError as exc:
            raise VMError(f"{what} {self._name} failed: {exc.get_error_message()}") from exc

    # -- lifecycle --

    def start(self, paused: bool = False) -> None:
        """Start QEMU; ``paused``: its vCPUs never run until resumed (with -incoming, the
        loaded state stays paused: what a capture's converter needs)."""
        flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
        self._call("start", lambda d: d.createWithFlags(flags))
        log.debug("vm_started", vm=self._name)

    def stop(self, graceful: bool = True, timeout: float = 30.0) -> None:
        """Graceful: ACPI power button, then force after ``timeout``. Force: destroy now."""
        if self.get_state() in (VMState.SHUTOFF, VMState.UNDEFINED):
            return
        if graceful:
            self._call("shutdown", lambda d: d.shutdown())
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.get_state() in (VMState.SHUTOFF, VMState.UNDEFINED):
                    return
                time.sleep(0.05)
            log.warning("vm_graceful_stop_timeout", vm=self._name, timeout=timeout)
        self.destroy()

    def destroy(self) -> None:
        """Kill QEMU at once (no-op if not running)."""
        try:
            self.domain.destroy()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                raise VMError(f"destroy {self._name} failed: {exc.get_error_message()}") from exc

    def undefine(self) -> None:
        """Remove the definition (and its snapshot metadata); no-op if already gone."""
        flags = (
            libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        )
        try:
            self.domain.undefineFlags(flags)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise VMError(f"undefine {self._name} failed: {exc.get_error_message()}") from exc
        except VMError:
            pass  # already gone after a reconnect

    def limit_memory(self, mib: int) -> None:
        """Cap the running QEMU's host memory (its cgroup's limit), guest RAM and QEMU's
        own included; past it the host's OOM killer ends this QEMU, no other. Remembered:
        ``reapply_limits`` sets it again after something restarted QEMU."""
        pid = self.qemu_pid()
        if pid is None:
            raise VMError(f"{self._name} is not running: cannot cap its memory")
        cgroups.limit_memory(pid, mib << 20)
        self.memory_limit_mib = mib

    def reapply_limits(self) -> None:
        if self.memory_limit_mib is not None:
            self.limit_memory(self.memory_limit_mib)

    def set_cpu_shares(self, shares: int) -> None:
        """This QEMU's share of contended CPU time against other VMs (libvirt's
        ``cpu_shares``: 1024 by default). A pool lowers it while a VM is being made so
        that its start never slows a VM someone is using."""
        self._call(
            "set cpu shares",
            lambda d: d.setSchedulerParametersFlags(
                {"cpu_shares": shares}, libvirt.VIR_DOMAIN_AFFECT_LIVE
            ),
        )

    def pause(self) -> None:
        self._call("pause", lambda d: d.suspend())

    def resume(self) -> None:
        self._call("resume", lambda d: d.resume())

    # -- state --

    def get_state(self) -> VMState:
        try:
            state, _reason = self.domain.state()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return VMState.UNDEFINED
            raise VMError(f"state of {self._name}: {exc.get_error_message()}") from exc
        except VMError:
            return VMState.UNDEFINED
        return _STATES.get(state, VMState.NOSTATE)

    def is_active(self) -> bool:
        return self.get_state() in (VMState.RUNNING, VMState.PAUSED, VMState.BLOCKED)

    async def wait_for_state(
        self, desired: VMState, timeout: float = 30.0, interval: float = 0.05
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            state = self.get_state()
            if state == desired:
                return
            if loop.time() >= deadline:
                raise VMError(
                    f"{self._name} is {state.value}, not {desired.value}, after {timeout:.1f} s"
                )
            await asyncio.sleep(interval)

    # -- information --

    def xml(self, inactive: bool = False) -> str:
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return str(self._call("read XML of", lambda d: d.XMLDesc(flags)))

    def metadata(self) -> dict[str, str]:
        return parse_metadata(self.xml(inactive=True))

    def qemu_pid(self) -> int | None:
        """QEMU's pid from libvirt's pid file (None when not running)."""
        try:
            return int(Path(f"/run/libvirt/qemu/{self._name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None
