"""Fixtures for tests on real VMs: libvirt, QEMU, the built image, booted guests.

Nothing here is skipped: if the host cannot run VMs the tests fail and say why. The
first run builds the image (about a minute; needs the package mirror the host uses).
The stack comes from one session ``Runtime``, as it does for users. At the end of the
session every domain, work directory and QEMU process this test process created must be
gone, or the session fails. When a test fails, the console logs and domain XML of the
VMs it used are kept under ``test-results/<test>/`` (printed in the report).
"""

from __future__ import annotations

import os

# Tests send traffic only to loopback and to test hosts they create. Every sandbox
# resolver started in this session (here or in a CLI subprocess) forwards to the test
# host's DNS server (see the test_host fixture), never to the host's own resolvers.
os.environ["AGENT_VM_DNS_UPSTREAM"] = '["198.51.100.10:53"]'  # TEST_HOST_IP
# The test host's network is reached through a host route, which makes it "the host's LAN"
# (refused by default); it stands for the internet here, so it is declared public.
os.environ["AGENT_VM_NETWORK_PUBLIC_SUBNETS"] = '["198.51.100.0/24"]'
# The test hosts serve HTTPS with a certificate of a test CA (made below, tls_files()):
# the egress proxy, which checks upstream certificates, trusts it besides the host's
# bundle; sandboxes never do.
os.environ["AGENT_VM_EGRESS_UPSTREAM_CA"] = "/run/agent-vm-tests/tls/ca.pem"  # TEST_CA
import re
import shutil
from collections.abc import AsyncIterator, Generator, Iterator
from contextlib import asynccontextmanager, suppress
from ipaddress import IPv4Interface
from pathlib import Path

import pytest
import pytest_asyncio

from agent_vm.config import Settings, load_settings
from agent_vm.core.connection import LibvirtConnection
from agent_vm.errors import AgentVMError
from agent_vm.execution import teardown
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.reaper import owned_domains
from agent_vm.execution.running import RunningVM
from agent_vm.execution.runtime import Runtime
from agent_vm.host.accel import Accel
from agent_vm.host.daemons import ensure_daemons
from agent_vm.host.mounts import mounts_under
from agent_vm.image.store import Image
from agent_vm.network.guard import NetworkGuard
from tests.integration.helpers import saved_dirs, vm_dirs
from tests.integration.testnet import TEST_CA, TestHost, exclusive, tls_files

tls_files()
assert str(TEST_CA) == os.environ["AGENT_VM_EGRESS_UPSTREAM_CA"]

TEST_HOST_IP = "198.51.100.10"
# What the test host's DNS server answers (the sandbox resolver forwards to it).
TEST_ZONE = {
    "web.allowed.test": TEST_HOST_IP,
    "api.allowed.test": TEST_HOST_IP,
    "evil.test": "198.51.100.11",  # the test host's second address
    # DNS rebinding: allowed names whose answers point into non-public ranges
    "meta.allowed.test": "169.254.77.77",  # a test host standing for a metadata service
    "lan.allowed.test": "192.168.213.10",  # a test host standing for the host's LAN
}
RESULTS = Path(__file__).resolve().parents[2] / "test-results"
INTEGRATION = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration boots real VMs: mark it so (``-m integration``)."""
    for item in items:
        if INTEGRATION in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


# ---------------------------------------------------------------- artefacts of failures

_seen: dict[str, tuple[str, bytes]] = {}  # VM name -> (domain XML, console log tail)
CONSOLE_KEEP = 256 * 1024


def _remember(doomed: teardown.Doomed) -> None:
    """Teardown observer: keep what a failed test's report needs, before it is deleted."""
    xml = ""
    if doomed.vm is not None:
        try:
            xml = doomed.vm.xml()
        except AgentVMError as exc:
            xml = f"<!-- domain XML unavailable: {exc} -->"
    console = b""
    workdir = doomed.workdir or Path(
        doomed.vm.metadata().get("workdir", "") if doomed.vm is not None else ""
    )
    log = workdir / "console.log"
    try:
        with log.open("rb") as handle:
            handle.seek(max(0, log.stat().st_size - CONSOLE_KEEP))
            console = handle.read()
    except OSError:
        pass
    _seen[doomed.name] = (xml, console)


def _live_domains(settings: Settings) -> None:
    """VMs still running when a test fails: their XML and console logs too."""
    with LibvirtConnection(settings.libvirt_uri) as conn:
        for owned in owned_domains(conn):
            if owned.metadata.get("pid") != str(os.getpid()):
                continue
            _remember(teardown.Doomed(owned.vm.name, owned.vm, None, None))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call" and report.failed and INTEGRATION in Path(str(item.fspath)).parents:
        with suppress(AgentVMError):
            _live_domains(load_settings())
    if report.failed and _seen:
        target = RESULTS / re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid)
        target.mkdir(parents=True, exist_ok=True)
        for name, (xml, console) in _seen.items():
            (target / f"{name}.xml").write_text(xml)
            (target / f"{name}.console.log").write_bytes(console)
        report.sections.append(("VM artefacts", f"console logs and domain XML in {target}"))
        print(f"\nVM artefacts of {item.nodeid}: {target}")
    if report.when == "teardown" or report.failed:
        _seen.clear()
    return report


@pytest.fixture(scope="session", autouse=True)
def keep_vm_artefacts() -> Iterator[None]:
    if RESULTS.exists():
        shutil.rmtree(RESULTS)
    teardown.observers.append(_remember)
    yield
    teardown.observers.remove(_remember)


# ---------------------------------------------------------------- the stack


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


@pytest_asyncio.fixture(scope="session")
async def runtime(settings: Settings, host_ready: None) -> AsyncIterator[Runtime]:
    """The session's runtime: connection, guard, golden store, images."""
    session_runtime = Runtime(settings)
    try:
        await session_runtime.start()
    except AgentVMError as exc:
        pytest.fail(f"the agent-vm runtime cannot start on this host: {exc}")
    yield session_runtime
    await session_runtime.close()


@pytest_asyncio.fixture(scope="session")
async def image(runtime: Runtime) -> Image:
    try:
        return await runtime.image()
    except AgentVMError as exc:
        pytest.fail(f"cannot build the guest image: {exc}")


@pytest.fixture(scope="session")
def accel(runtime: Runtime) -> Accel:
    return runtime.accel.accel


@pytest.fixture(scope="session")
def connection(runtime: Runtime) -> LibvirtConnection:
    return runtime.connection


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind(settings: Settings, host_ready: None) -> Iterator[None]:
    before = vm_dirs(settings)
    saved_before = saved_dirs(settings)
    yield
    with LibvirtConnection(settings.libvirt_uri) as conn:
        ours = [d for d in owned_domains(conn) if d.metadata.get("pid") == str(os.getpid())]
        names = [d.vm.name for d in ours]
        for owned in ours:  # clean up anyway so one failure does not poison the next run
            owned.vm.destroy()
            owned.vm.undefine()
    after = vm_dirs(settings)
    stray_dirs = sorted(str(p) for p in after - before)
    vms = settings.vms_dir.resolve()
    stray_mounts = [
        str(p)
        for p in mounts_under(vms)
        if p != vms and vms / p.relative_to(vms).parts[0] not in before
    ]
    qemus = _qemu_processes_named(names)
    problems = []
    if names:
        problems.append(f"domains still defined: {names}")
    if stray_dirs:
        problems.append(f"work directories left: {stray_dirs}")
    if stray_mounts:
        problems.append(f"mounts left: {stray_mounts}")
    stray_saved = sorted(str(p) for p in saved_dirs(settings) - saved_before)
    if stray_saved:
        problems.append(f"paused sandboxes or snapshots left: {stray_saved}")
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
async def booted(runtime: Runtime, image: Image) -> AsyncIterator[RunningVM]:
    """A cold-booted VM without network (the bottom rung: no golden state involved)."""
    vm = await runtime.vm(image=image, spec=runtime.spec(network="isolated"), cold=True)
    try:
        yield vm
    finally:
        await vm.close()


@pytest_asyncio.fixture
async def fresh_vm(runtime: Runtime, image: Image) -> AsyncIterator[RunningVM]:
    """A VM of its own, for tests that break or reset it."""
    async with booted(runtime, image) as vm:
        yield vm


@pytest_asyncio.fixture(scope="module")
async def shared_vm(runtime: Runtime, image: Image) -> AsyncIterator[RunningVM]:
    """One VM for a module's non-destructive tests (boots cost seconds under TCG)."""
    async with booted(runtime, image) as vm:
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
        shared=True,  # another test session on this host uses the same one
    )
    try:
        host.start()
    except (RuntimeError, OSError) as exc:
        pytest.fail(f"cannot create the test host namespace: {exc}")
    yield host
    host.stop()


@pytest.fixture
def scripted_model(test_host: TestHost) -> Iterator[None]:
    """The test host's scripted model API, for this test alone (its script is one per
    host: another session's agent test waits)."""
    with exclusive("model-api"):
        yield


@pytest_asyncio.fixture(scope="session")
async def guard(runtime: Runtime, test_host: TestHost) -> NetworkGuard:
    """The session runtime's network guard; its resolver forwards to the test host's DNS."""
    return await runtime.guard()


@pytest.fixture(scope="session")
def executor() -> AgentExecutor:
    return AgentExecutor(default_timeout=120)
