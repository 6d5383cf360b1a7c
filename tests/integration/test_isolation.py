"""Isolation from the host's surroundings: LAN, metadata service, the host's own routes.

Every destination here is a test host this module creates in a network namespace,
reached through a host route into that namespace: 169.254.77.77 stands for a cloud
metadata service (169.254.169.254 itself is never touched, so the host's real route to it
stays as it is), 192.168.213.10 for a machine on the host's LAN, 203.0.113.10 for a
public-looking subnet the host routes somewhere other than its default route. The
internet is the session's test host at 198.51.100.10, declared public in conftest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any

import pytest

from agent_vm.core.template import channel_socket_path
from agent_vm.errors import VMError
from agent_vm.execution.clones import prepare_shell
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.running import RunningVM
from agent_vm.execution.runtime import Runtime
from agent_vm.host.identities import Identity
from agent_vm.image.store import Image
from agent_vm.network.guard import NetworkGuard
from agent_vm.network.policy import EgressPolicy
from tests.integration.conftest import TEST_HOST_IP
from tests.integration.guest_probe import parse, probe_code
from tests.integration.helpers import eventually
from tests.integration.testnet import TestHost, exclusive, unused_by_the_host

METADATA_IP = "169.254.77.77"
LAN_IP = "192.168.213.10"
ROUTED_IP = "203.0.113.10"


@pytest.fixture(scope="module")
def outside(test_host: TestHost) -> Iterator[dict[str, TestHost]]:
    """The three test hosts, each behind a host route into its namespace."""
    specs = {
        "metadata": ("agvtest3", "169.254.77.1/24", f"{METADATA_IP}/24", "169.254.77."),
        "lan": ("agvtest4", "192.168.213.1/24", f"{LAN_IP}/24", "192.168.213."),
        "routed": ("agvtest5", "203.0.113.1/24", f"{ROUTED_IP}/24", "203.0.113."),
    }
    hosts: dict[str, TestHost] = {}
    with exclusive("extra-networks"), contextlib.ExitStack() as stack:
        for key, (name, host_side, address, prefix) in specs.items():
            unused_by_the_host(prefix)
            hosts[key] = TestHost(
                name=name, host_side=IPv4Interface(host_side), addresses=(IPv4Interface(address),)
            )
            hosts[key].start()
            stack.callback(hosts[key].stop)
        yield hosts


@asynccontextmanager
async def sandbox(runtime: Runtime, image: Image, policy: EgressPolicy) -> AsyncIterator[RunningVM]:
    vm = await runtime.vm(image=image, policy=policy)
    try:
        yield vm
    finally:
        await vm.close()


async def probe(
    executor: AgentExecutor, vm: RunningVM, probes: dict[str, list[Any]]
) -> dict[str, str]:
    result = await executor.execute(vm, code=probe_code(probes, 2.0), timeout=60)
    assert result.exit_code == 0, result.stderr
    return parse(result.stdout)


def blocked(outcome: str) -> bool:
    return outcome in ("timeout", "no reply") or outcome.startswith("error:")


WEB = {
    "internet": ["http", TEST_HOST_IP, 80],
    "metadata": ["http", METADATA_IP, 80],
    "lan": ["http", LAN_IP, 80],
    "routed": ["http", ROUTED_IP, 80],
}


async def test_lan_metadata_and_routed_subnets_are_refused_by_default(
    runtime: Runtime, image: Image, executor: AgentExecutor, guard: NetworkGuard,
    outside: dict[str, TestHost],
) -> None:  # fmt: skip
    async with sandbox(runtime, image, EgressPolicy()) as vm:
        out = await probe(executor, vm, WEB)
        reasons = {"metadata": METADATA_IP, "lan": LAN_IP, "routed": ROUTED_IP}

        def counted() -> set[str]:
            return {
                b.destination
                for b in guard.blocked(vm.name)
                if b.reason == "non-public destination"
            }

        await eventually(lambda: set(reasons.values()) <= counted(), 5, f"blocks in {counted()}")
    assert out["internet"].startswith("ok:"), out  # the network works: the control
    for key in reasons:
        assert blocked(out[key]), (key, out)


async def test_allow_cidrs_opens_exactly_the_named_range(
    runtime: Runtime, image: Image, executor: AgentExecutor, outside: dict[str, TestHost]
) -> None:
    policy = EgressPolicy(allow_cidrs=("169.254.77.0/24", "203.0.113.0/24"), tcp_ports=(80,))
    async with sandbox(runtime, image, policy) as vm:
        out = await probe(executor, vm, {**WEB, "metadata_8080": ["http", METADATA_IP, 8080]})
    assert out["metadata"] == f"ok:hello from port 80 to {METADATA_IP.rsplit('.', 1)[0]}.1", out
    assert out["routed"].startswith("ok:"), out
    assert blocked(out["lan"]), out  # not named: still refused
    assert blocked(out["metadata_8080"]), out  # the policy's ports still apply


async def test_allowlisted_names_with_non_public_answers_are_refused(
    runtime: Runtime, image: Image, executor: AgentExecutor, guard: NetworkGuard,
    outside: dict[str, TestHost],
) -> None:  # fmt: skip
    """DNS rebinding: an allowed name that resolves to the metadata service or the LAN."""
    names = {
        "web": ["resolve", "web.allowed.test"],
        "meta": ["resolve", "meta.allowed.test"],
        "lan": ["resolve", "lan.allowed.test"],
    }
    allowlist = EgressPolicy(allow_domains=("*.allowed.test",))
    async with sandbox(runtime, image, allowlist) as vm:
        refused = await probe(executor, vm, names)
        reasons = {(b.destination, b.reason) for b in guard.blocked(vm.name)}
    assert refused["web"] == f"ok:{TEST_HOST_IP}", refused
    assert refused["meta"].startswith("error:") and refused["lan"].startswith("error:"), refused
    assert ("meta.allowed.test", "non-public answer") in reasons
    opened = EgressPolicy(allow_domains=("*.allowed.test",), allow_cidrs=("169.254.77.0/24",))
    async with sandbox(runtime, image, opened) as vm:
        allowed = await probe(executor, vm, {**names, "get": ["http", METADATA_IP, 80]})
    assert allowed["meta"] == f"ok:{METADATA_IP}", allowed  # named range: handed out
    assert allowed["get"].startswith("ok:"), allowed
    assert allowed["lan"].startswith("error:"), allowed


# ---------------------------------------------------------------- one host user per VM

ATTEMPTS = """
import json, socket, sys
out = {}
for key, path in json.loads(sys.argv[1]).items():
    try:
        if key.endswith("socket"):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
        else:
            open(path, "rb").close()
        out[key] = "opened"
    except OSError as exc:
        out[key] = type(exc).__name__
print(json.dumps(out))
"""


def as_user(identity: Identity, paths: dict[str, str]) -> dict[str, str]:
    """Open each path as that sandbox's QEMU would: its uid, gid and groups."""
    argv = [
        "setpriv", f"--reuid={identity.uid}", f"--regid={identity.gid}", "--init-groups",
        sys.executable, "-I", "-c", ATTEMPTS, json.dumps(paths),
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, check=True)
    result: dict[str, str] = json.loads(proc.stdout)
    return result


def status_of(pid: int | None) -> dict[str, str]:
    assert pid is not None
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()[0] if value.split() else ""
    return fields


def private_paths(vm: RunningVM) -> dict[str, str]:
    socket_path = channel_socket_path(vm.vm.xml())
    assert socket_path is not None
    monitors = list(Path("/var/lib/libvirt/qemu").glob(f"domain-*-{vm.name}/monitor.sock"))
    assert monitors, "no monitor socket found"
    return {
        "overlay": str(vm.workdir / "disk.qcow2"),
        "console": str(vm.console_log),
        "channel socket": str(socket_path),
        "monitor socket": str(monitors[0]),
    }


async def test_each_sandbox_runs_as_its_own_user_and_cannot_reach_another(
    runtime: Runtime, image: Image
) -> None:
    spec = runtime.spec(network="isolated")
    a = await runtime.vm(image=image, spec=spec)
    b = await runtime.vm(image=image, spec=spec)
    try:
        assert a.identity is not None and b.identity is not None
        qemu_a, qemu_b = status_of(a.qemu_pid), status_of(b.qemu_pid)
        assert qemu_a["Uid"] == str(a.identity.uid) and qemu_b["Uid"] == str(b.identity.uid)
        assert qemu_a["Uid"] != qemu_b["Uid"] and qemu_a["Gid"] != qemu_b["Gid"]
        for qemu in (qemu_a, qemu_b):
            assert qemu["CapEff"] == "0000000000000000"
            assert (qemu["Seccomp"], qemu["NoNewPrivs"]) == ("2", "1")
        into_b = await asyncio.to_thread(as_user, a.identity, private_paths(b))
        own = await asyncio.to_thread(as_user, a.identity, {"overlay": private_paths(a)["overlay"]})
        shared = {
            "base image": str(image.disk),
            "golden RAM": str(runtime.golden_store.locate_for(image, spec).ram),
        }
        readable = await asyncio.to_thread(as_user, a.identity, shared)
    finally:
        await a.close()
        await b.close()
    assert own == {"overlay": "opened"}  # the control: the method can open things
    assert into_b == dict.fromkeys(into_b, "PermissionError"), into_b
    assert readable == dict.fromkeys(shared, "opened"), readable  # shared files it needs


async def test_shared_files_are_root_owned_and_read_only_to_sandboxes(
    runtime: Runtime, image: Image
) -> None:
    spec = runtime.spec(network="isolated")
    golden = await runtime.golden(image, spec)
    confinement = runtime.confine()
    for path in (image.disk, image.kernel, image.initrd, golden.disk):
        st = path.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o444), (path, oct(st.st_mode))
    ram = golden.ram.stat()
    assert (ram.st_uid, ram.st_gid) == (0, confinement.identities.shared_gid)
    assert ram.st_mode & 0o007 == 0  # nothing for other users
    for view in confinement.boot_files(image):  # what libvirt's relabelling runs into
        with pytest.raises(OSError, match="Read-only file system"):
            os.chown(view, 0, 0)


async def test_a_golden_ram_file_written_after_capture_is_never_cloned(
    runtime: Runtime, image: Image, executor: AgentExecutor
) -> None:
    """Where QEMU needs the RAM file writable (QEMU < 8.2), an escaped QEMU could write
    it; the capture's ctime and inode give it away, and it is captured again."""
    spec = runtime.spec(network="isolated", memory_mib=640)  # a golden state of its own
    golden = await runtime.golden(image, spec)
    fd = os.open(golden.ram, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xcc", 4096 * 1000)  # what an attacker's write looks like
    finally:
        os.close(fd)
    assert not golden.intact()
    with pytest.raises(VMError, match="changed since its capture"):
        await prepare_shell(
            runtime.connection, image, golden, spec, vms_dir=runtime.settings.vms_dir,
            confinement=runtime.confinement,
        )  # fmt: skip
    again = await runtime.golden(image, spec)  # captured anew
    assert again.intact()
    vm = await runtime.vm(image=image, spec=spec)
    try:
        assert (await executor.execute(vm, "echo fresh")).stdout == "fresh\n"
    finally:
        await vm.close()
    runtime.golden_store.remove(again)
