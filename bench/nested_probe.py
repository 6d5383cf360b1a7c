# ruff: noqa: ASYNC221, ASYNC240
# (a probe: nothing else runs on its event loop)
"""agent-vm's own paths, run *inside* a nested host (a VM of agent-vm's with QEMU, libvirt
and agent-vm installed), by ``bench/nested.py``. Prints one JSON object as its last line.

    python nested_probe.py --repo DIR [--full]

What it does with the accelerator agent-vm chose by its own probe (``AGENT_VM_ACCEL=tcg``
forces the TCG comparison): capture a golden state, clone it three times (timed), keep
the first clone's domain XML and QEMU command line, run ``python3 -c 'print(1)'`` in it,
and record the golden RAM file's mode and how the clone's QEMU opened it. With ``--full``
(the KVM run) also a pool acquire/reset cycle, the egress policy against a test host this
probe creates in a network namespace of the nested host, and resource limits.

Every check is recorded, not asserted: the caller decides what must hold and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any

TEST_HOST_IP = "198.51.100.10"
ZONE = {"web.allowed.test": TEST_HOST_IP, "evil.test": "198.51.100.11"}
os.environ.setdefault("AGENT_VM_DNS_UPSTREAM", f'["{TEST_HOST_IP}:53"]')
os.environ.setdefault("AGENT_VM_NETWORK_PUBLIC_SUBNETS", '["198.51.100.0/24"]')

from agent_vm.config import load_settings  # noqa: E402  (after the environment above)
from agent_vm.core.template import ResourceProfile  # noqa: E402
from agent_vm.execution.executor import AgentExecutor  # noqa: E402
from agent_vm.execution.pool import VMPool  # noqa: E402
from agent_vm.execution.running import RunningVM  # noqa: E402
from agent_vm.execution.runtime import Runtime  # noqa: E402
from agent_vm.host.cgroups import memory_limit_file  # noqa: E402
from agent_vm.network.policy import EgressPolicy  # noqa: E402

EXEC = AgentExecutor()
CURL = "curl -s -m 8 -o /dev/null -w '%{http_code}' http://{}/ || echo blocked"


def virsh(*argv: str) -> str:
    return subprocess.run(["virsh", *argv], capture_output=True, text=True, check=False).stdout


def open_flags(pid: int, target: Path) -> str | None:
    """How process ``pid`` holds ``target`` open: "read-only" or "read-write"."""
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir():
        try:
            if fd.readlink() != target:
                continue
            flags = (fds.parent / "fdinfo" / fd.name).read_text().split("flags:")[1].split()[0]
        except (OSError, IndexError):
            continue
        return "read-only" if int(flags, 8) & 3 == os.O_RDONLY else "read-write"
    return None


async def run(vm: RunningVM, command: str, timeout: float = 60) -> str:
    result = await EXEC.execute(vm, command, timeout=timeout)
    return (result.stdout + result.stderr).strip()


async def golden_and_clones(runtime: Runtime, out: dict[str, Any]) -> None:
    image = await runtime.image()
    spec = runtime.spec(network="isolated")
    started = time.perf_counter()
    golden = await runtime.golden(image, spec)
    out["golden_capture_s"] = round(time.perf_counter() - started, 2)
    out["golden_ram_mode"] = oct(golden.ram.stat().st_mode & 0o777)
    clones = []
    for index in range(3):
        started = time.perf_counter()
        vm = await runtime.vm(image=image, spec=spec)
        clones.append(round(time.perf_counter() - started, 3))
        try:
            if index == 0:
                out["domain_xml"] = virsh("dumpxml", vm.name)
                pid = vm.qemu_pid
                out["qemu_cmdline"] = (
                    Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                    if pid
                    else ""
                )
                out["clone_opens_golden_ram"] = open_flags(pid, golden.ram) if pid else None
                out["print_1"] = await run(vm, "python3 -c 'print(1)'")
        finally:
            await vm.close()
    out["clone_s"] = clones


async def pool_cycle(runtime: Runtime, out: dict[str, Any]) -> None:
    async with VMPool(min_size=1, max_size=1, network="isolated", runtime=runtime) as pool:
        started = time.perf_counter()
        vm = await pool.acquire(timeout=300)
        out["pool_acquire_s"] = round(time.perf_counter() - started, 3)
        await run(vm, "echo dirty > /root/mark")
        await pool.release(vm)
        started = time.perf_counter()
        again = await pool.acquire(timeout=300)
        out["pool_reacquire_s"] = round(time.perf_counter() - started, 3)
        out["pool_after_reset"] = await run(again, "cat /root/mark 2>&1 || true")
        await pool.release(again)


async def egress(runtime: Runtime, repo: Path, out: dict[str, Any]) -> None:
    sys.path.insert(0, str(repo))
    from tests.integration.testnet import TestHost

    host = TestHost(
        name="agvnest1",
        host_side=IPv4Interface("198.51.100.1/24"),
        addresses=(IPv4Interface(f"{TEST_HOST_IP}/24"), IPv4Interface("198.51.100.11/24")),
        zone=ZONE,
    )
    host.start()
    try:
        image = await runtime.image()
        policy = EgressPolicy(allow_domains=("web.allowed.test",))
        vm = await runtime.vm(image=image, spec=runtime.spec(network="nat"), policy=policy)
        try:
            out["egress"] = {name: await run(vm, CURL.replace("{}", name)) for name in ZONE} | {
                "198.51.100.11": await run(vm, CURL.replace("{}", "198.51.100.11"))
            }
        finally:
            await vm.close()
    finally:
        host.stop()


async def limits(runtime: Runtime, out: dict[str, Any]) -> None:
    profile = ResourceProfile(vcpu=1, memory_mib=512, pids_max=64, cpu_cores=0.5)
    vm = await runtime.vm(
        image=await runtime.image(), spec=runtime.spec(profile=profile, network="isolated")
    )
    try:
        assert vm.qemu_pid is not None
        memory = memory_limit_file(vm.qemu_pid)
        cpu = memory.parent / "cpu.max"
        out["limits"] = {
            "memory.max": memory.read_text().strip(),
            "cpu.max": cpu.read_text().strip() if cpu.exists() else virsh("schedinfo", vm.name),
            "fork_bomb_pids_events": await run(
                vm,
                "(:(){ :|:& };:) 2>/dev/null; sleep 8; "
                "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/pids.events",
                timeout=120,
            ),
        }
    finally:
        await vm.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", type=Path, required=True, help="the checkout's copy")
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args()
    out: dict[str, Any] = {"qemu": subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[0]}  # fmt: skip
    out["libvirt"] = virsh("version").strip()
    steps = [golden_and_clones]
    if args.full:
        steps += [pool_cycle, limits]
    async with Runtime(load_settings()) as runtime:
        choice = runtime.accel
        out["accel"], out["accel_reason"] = str(choice.accel), choice.reason
        for step in steps:
            started = time.perf_counter()
            try:
                await step(runtime, out)
            except Exception as exc:  # recorded: the caller names what failed
                out.setdefault("errors", {})[step.__name__] = f"{type(exc).__name__}: {exc}"
            out.setdefault("step_s", {})[step.__name__] = round(time.perf_counter() - started, 1)
        if args.full:
            try:
                await egress(runtime, args.repo, out)
            except Exception as exc:
                out.setdefault("errors", {})["egress"] = f"{type(exc).__name__}: {exc}"
    out["domain_type"] = (re.findall(r"<domain type='(\w+)'", out.get("domain_xml", "")) or [""])[0]
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
