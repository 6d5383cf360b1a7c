"""Fixtures for tests on real VMs: libvirt, QEMU, the built image, booted guests.

Nothing here is skipped: if the host cannot run VMs the tests fail and say why. The
first run builds the image (about a minute; needs the package mirror the host uses).
At the end of the session every domain, work directory and QEMU process this test
process created must be gone, or the session fails.
"""

from __future__ import annotations

import os

# Tests send traffic only to loopback and to test hosts they create. Every sandbox
# resolver started in this session (here or in a CLI subprocess) forwards to the test
# host's DNS server (see the test_host fixture), never to the host's own resolvers.
os.environ["AGENT_VM_DNS_UPSTREAM"] = '["198.51.100.10:53"]'  # TEST_HOST_IP
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from ipaddress import IPv4Interface
from pathlib import Path

import pytest
import pytest_asyncio

from agent_vm.config import Settings, load_settings
from agent_vm.core.connection import LibvirtConnection
from agent_vm.core.template import NetworkMode
from agent_vm.errors import AgentVMError
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.machine import MachineSpec, RunningVM, launch_vm
from agent_vm.execution.reaper import owned_domains
from agent_vm.host.accel import Accel, detect_accel
from agent_vm.host.daemons import ensure_daemons
from agent_vm.image.builder import ImageBuilder
from agent_vm.image.store import Image
from agent_vm.network.guard import NetworkGuard
from tests.integration.helpers import vm_dirs
from tests.integration.testnet import TestHost

TEST_HOST_IP = "198.51.100.10"
# What the test host's DNS server answers (the sandbox resolver forwards to it).
TEST_ZONE = {
    "web.allowed.test": TEST_HOST_IP,
    "api.allowed.test": TEST_HOST_IP,
    "evil.test": "198.51.100.11",  # the test host's second address
}


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
        spec=MachineSpec(accel=accel, network_mode=NetworkMode.ISOLATED),
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
def test_host(host_ready: None) -> Iterator[TestHost]:
    """A host "on the internet" in a network namespace: HTTP 80/8080, TCP 22, UDP echo
    443/5000 and DNS, on 198.51.100.10 and .11; the host's end is 198.51.100.1."""
    host = TestHost(
        name="agvtest1",
        host_side=IPv4Interface("198.51.100.1/24"),
        addresses=(IPv4Interface(f"{TEST_HOST_IP}/24"), IPv4Interface("198.51.100.11/24")),
        zone=TEST_ZONE,
    )
    try:
        host.start()
    except (RuntimeError, OSError) as exc:
        pytest.fail(f"cannot create the test host namespace: {exc}")
    yield host
    host.stop()


@pytest_asyncio.fixture(scope="session")
async def guard(
    connection: LibvirtConnection, settings: Settings, test_host: TestHost
) -> AsyncIterator[NetworkGuard]:
    """The session's network guard; its resolver forwards to the test host's DNS."""
    network_guard = NetworkGuard(connection, settings)
    await network_guard.start()
    try:
        yield network_guard
    finally:
        await network_guard.close()


@pytest.fixture(scope="session")
def executor() -> AgentExecutor:
    return AgentExecutor(default_timeout=120)
