"""Fixtures for tests on real VMs: libvirt, QEMU, the built image, booted guests.

Nothing here is skipped: if the host cannot run VMs the tests fail and say why. The
first run builds the image (about a minute; needs the package mirror the host uses).
At the end of the session every domain, work directory and QEMU process this test
process created must be gone, or the session fails.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import pytest_asyncio

from agent_vm.config import Settings, load_settings
from agent_vm.core.connection import LibvirtConnection
from agent_vm.errors import AgentVMError
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.machine import MachineSpec, RunningVM, launch_vm
from agent_vm.execution.reaper import owned_domains
from agent_vm.host.accel import Accel, detect_accel
from agent_vm.host.daemons import ensure_daemons
from agent_vm.image.builder import ImageBuilder
from agent_vm.image.store import Image
from tests.integration.helpers import vm_dirs


@pytest.fixture(scope="session")
def settings() -> Settings:
    return load_settings()


@pytest.fixture(scope="session")
def host_ready(settings: Settings) -> None:
    if os.geteuid() != 0:
        pytest.fail("integration tests manage qemu:///system and must run as root")
    try:
        ensure_daemons()
    except AgentVMError as exc:
        pytest.fail(f"libvirt is not usable on this host: {exc}")


@pytest.fixture(scope="session")
def image(settings: Settings, host_ready: None) -> Image:
    try:
        return ImageBuilder(settings).ensure()
    except AgentVMError as exc:
        pytest.fail(f"cannot build the guest image: {exc}")


@pytest.fixture(scope="session")
def accel(settings: Settings) -> Accel:
    return detect_accel(settings.accel).accel


@pytest.fixture(scope="session")
def connection(settings: Settings, host_ready: None) -> Iterator[LibvirtConnection]:
    with LibvirtConnection(settings.libvirt_uri) as conn:
        yield conn


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind(settings: Settings, host_ready: None) -> Iterator[None]:
    before = vm_dirs(settings)
    yield
    with LibvirtConnection(settings.libvirt_uri) as conn:
        ours = [d for d in owned_domains(conn) if d.metadata.get("pid") == str(os.getpid())]
        names = [d.vm.name for d in ours]
        for owned in ours:  # clean up anyway so one failure does not poison the next run
            owned.vm.destroy()
            owned.vm.undefine()
    after = vm_dirs(settings)
    stray_dirs = sorted(str(p) for p in after - before)
    qemus = _qemu_processes_named(names)
    problems = []
    if names:
        problems.append(f"domains still defined: {names}")
    if stray_dirs:
        problems.append(f"work directories left: {stray_dirs}")
    if qemus:
        problems.append(f"QEMU processes left: {qemus}")
    if problems:
        pytest.fail("test session left resources behind: " + "; ".join(problems))


def _qemu_processes_named(names: list[str]) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmdline and any(f"guest={n}," in cmdline for n in names):
            pids.append(int(proc.name))
    return pids


@asynccontextmanager
async def booted(
    connection: LibvirtConnection, image: Image, settings: Settings, accel: Accel
) -> AsyncIterator[RunningVM]:
    vm = await launch_vm(
        connection,
        image,
        vms_dir=settings.vms_dir,
        spec=MachineSpec(accel=accel),
        boot_timeout=settings.boot_timeout,
    )
    try:
        yield vm
    finally:
        await vm.close()


@pytest_asyncio.fixture
async def fresh_vm(
    connection: LibvirtConnection, image: Image, settings: Settings, accel: Accel
) -> AsyncIterator[RunningVM]:
    """A VM of its own, for tests that break or reset it."""
    async with booted(connection, image, settings, accel) as vm:
        yield vm


@pytest_asyncio.fixture(scope="module")
async def shared_vm(
    connection: LibvirtConnection, image: Image, settings: Settings, accel: Accel
) -> AsyncIterator[RunningVM]:
    """One VM for a module's non-destructive tests (boots cost seconds under TCG)."""
    async with booted(connection, image, settings, accel) as vm:
        yield vm


@pytest.fixture(scope="session")
def executor() -> AgentExecutor:
    return AgentExecutor(default_timeout=120)
