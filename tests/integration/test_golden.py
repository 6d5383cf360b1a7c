"""VMs started from a golden state: no boot, yet distinct and correct."""

from __future__ import annotations

import asyncio
import hashlib
import time

from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.running import RunningVM
from agent_vm.execution.runtime import Runtime
from agent_vm.image.store import Image
from agent_vm.network.guard import NetworkGuard


async def test_clones_are_distinct_and_correct(
    runtime: Runtime, image: Image, executor: AgentExecutor, guard: NetworkGuard
) -> None:
    spec = runtime.spec()
    golden = await runtime.golden(image, spec)
    first_meta = golden.meta()
    assert first_meta is not None and first_meta.state_bytes < 2 * 2**20
    again = await runtime.golden(image, spec)  # cached: not captured
    assert again.meta() == first_meta

    clones: list[RunningVM] = []
    try:
        for _ in range(2):
            clones.append(await runtime.vm(image=image, spec=spec))
        probe = (
            "hostname; cat /etc/machine-id; date +%s.%N; "
            "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; "
            "python3 -c 'import random; print(random.random())'"
        )
        results = await asyncio.gather(*(executor.execute(vm, probe) for vm in clones))
        host_now = time.time()
        seen = [r.stdout.splitlines() for r in results]
        for vm, (hostname, machine_id, clock, urandom, pyrandom) in zip(clones, seen, strict=True):
            assert hostname == vm.name
            assert len(machine_id) == 32
            assert abs(float(clock) - host_now) < 5, "guest clock not set to the host's"
            assert len(urandom) == 64 and len(pyrandom) > 3
        a, b = seen
        assert a[1] != b[1], "machine-id shared between clones"
        assert a[3] != b[3], "clones produced the same /dev/urandom bytes"
        assert a[4] != b[4], "clones' Python RNGs produced the same value"
        # A write in one clone is invisible in the other (private disk and memory).
        await executor.execute(clones[0], "echo mine > /root/owned")
        other = await executor.execute(clones[1], "cat /root/owned")
        assert other.exit_code == 1
    finally:
        await asyncio.gather(*(vm.close() for vm in clones))


async def test_clone_runs_software_normally(
    runtime: Runtime, image: Image, executor: AgentExecutor, guard: NetworkGuard
) -> None:
    vm = await runtime.vm(image=image)
    try:
        result = await executor.execute(
            vm, "git --version && python3 -c 'import json,ssl; print(ssl.OPENSSL_VERSION)'"
        )
        assert result.success, result.stderr
        assert "git version" in result.stdout and "OpenSSL" in result.stdout
        big = await executor.execute(vm, "head -c 50000000 /dev/zero | sha256sum")
        assert big.stdout.split()[0] == hashlib.sha256(bytes(50_000_000)).hexdigest()
    finally:
        await vm.close()
