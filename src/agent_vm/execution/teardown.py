"""The one way a VM goes away: channel, domain, work directory, identity, network.

Every caller (a running VM closing, a standby shell discarded, a start that failed half
way, a golden template after capture) goes through :func:`teardown`, so the order that
leaks nothing is written once: the guard is told the VM is going (its rules will vanish
on purpose), the domain is destroyed and undefined, the work directory removed, and only
then the network pieces, which the domain's filter binding refers to.

When libvirtd is unreachable the domain cannot be destroyed; the whole teardown is then
queued and retried by :func:`retry_pending` (the pool's monitor and the runtime call it),
and the network pieces stay until it succeeds: removing them under a running domain
would fail anyway (an ipset a live rule refers to cannot be destroyed).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent_vm.communication.channel import AgentChannel
from agent_vm.core.vm import VM
from agent_vm.errors import AgentVMError
from agent_vm.host.identities import Identity
from agent_vm.host.mounts import remove_tree
from agent_vm.logs import get_logger
from agent_vm.network.guard import NetworkGuard

log = get_logger(__name__)


@dataclass(frozen=True)
class Doomed:
    """What one teardown removes."""

    name: str
    vm: VM | None
    workdir: Path | None  # None: keep the files (a golden capture moves the disk out)
    guard: NetworkGuard | None
    identity: Identity | None = None


# Called with each VM just before its domain goes (tests keep console logs and domain
# XML of failed tests this way). Observers must be quick and must not raise.
observers: list[Callable[[Doomed], None]] = []

_pending: list[Doomed] = []
_pending_lock = threading.Lock()


async def teardown(
    name: str,
    *,
    vm: VM | None,
    workdir: Path | None,
    guard: NetworkGuard | None,
    channel: AgentChannel | None = None,
    identity: Identity | None = None,
) -> None:
    """Remove everything of one VM; never raises for what it can retry later.

    Shielded from cancellation: a half-done teardown is how things leak.
    """
    doomed = Doomed(name, vm, workdir, guard, identity)
    await asyncio.shield(_teardown(doomed, channel))


async def _teardown(doomed: Doomed, channel: AgentChannel | None) -> None:
    if channel is not None:
        await channel.close()
    for observer in list(observers):
        try:
            await asyncio.to_thread(observer, doomed)
        except Exception as exc:  # an observer must never stop a teardown
            log.warning("teardown_observer_failed", vm=doomed.name, error=repr(exc))
    if doomed.guard is not None:
        doomed.guard.closing(doomed.name)
    await _remove_or_defer(doomed)


async def _remove_or_defer(doomed: Doomed) -> None:
    """Domain and files, then the network; or all of it later if libvirt is away."""
    if await asyncio.to_thread(_remove_domain, doomed):
        if doomed.identity is not None:  # its QEMU is gone: the uid may serve another VM
            doomed.identity.release()
        if doomed.guard is not None:
            await doomed.guard.detach(doomed.name)
    else:
        with _pending_lock:
            _pending.append(doomed)


def _remove_domain(doomed: Doomed) -> bool:
    """Destroy, undefine, remove files; False when libvirt could not be reached."""
    try:
        if doomed.vm is not None:
            doomed.vm.destroy()
            doomed.vm.undefine()
    except AgentVMError as exc:
        log.error("teardown_deferred", vm=doomed.name, error=str(exc), retry="later")
        return False
    if doomed.workdir is not None:
        remove_tree(doomed.workdir)
    return True


def destroy_and_remove(vm: VM, workdir: Path | None) -> None:
    """Synchronous removal of a domain nobody in this process holds (the reaper's)."""
    try:
        vm.destroy()
        vm.undefine()
    finally:
        if workdir is not None:
            remove_tree(workdir)


async def retry_pending() -> int:
    """Retry teardowns that libvirtd's absence deferred; returns how many still wait."""
    with _pending_lock:
        pending = list(_pending)
        _pending.clear()
    for doomed in pending:
        await _remove_or_defer(doomed)
    with _pending_lock:
        return len(_pending)
