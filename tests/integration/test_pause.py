"""Pause to disk, resume, snapshots and fork, on real VMs (issue 20).

Every check looks at the guest itself: a counter process that kept counting, a command
whose output went on, files, hostnames, machine-ids, addresses, the kernel's random
stream; and at the host: no QEMU while paused, nothing left after delete."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent_vm.errors import (
    AgentVMError,
    DiskFullError,
    SandboxStateError,
    SnapshotError,
    WorkspaceError,
)
from agent_vm.execution.runtime import Runtime
from agent_vm.image.store import Image
from agent_vm.sandbox import AsyncSandbox
from agent_vm.sandbox.base import SandboxState
from tests.integration.testnet import TestHost

COUNTER = (
    "nohup bash -c 'i=0; while :; do i=$((i+1)); echo $i > /root/count.new;"
    " mv /root/count.new /root/count; sleep 0.1; done'"
    " >/dev/null 2>&1 & until [ -s /root/count ]; do sleep 0.05; done"
)
IDENTITY = (
    "hostname; cat /etc/machine-id; hostname -I 2>/dev/null || true;"
    " head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo"
)


@pytest.fixture
async def sandbox(runtime: Runtime, image: Image) -> AsyncIterator[AsyncSandbox]:
    async with AsyncSandbox(runtime=runtime) as sb:
        yield sb


async def out(sb: AsyncSandbox, cmd: str) -> str:
    result = await sb.commands.run(cmd, timeout=60)
    assert result.exit_code == 0, result.stderr
    return result.stdout


def qemu_of(domain: str | None) -> bool:
    if domain is None:
        return False
    return subprocess.run(["pgrep", "-f", f"guest={domain},"], capture_output=True).returncode == 0


async def test_pause_keeps_every_process_and_frees_the_vm(
    sandbox: AsyncSandbox, runtime: Runtime, test_host: TestHost
) -> None:
    await out(sandbox, "echo before > /root/file; " + COUNTER)
    lines: list[str] = []
    command = await sandbox.commands.run(
        "for i in $(seq 1 30); do echo $i; sleep 0.2; done", background=True, timeout=None,
        on_stdout=lines.append,
    )  # fmt: skip
    await asyncio.sleep(1.0)
    policy = await sandbox.get_policy()
    domain = sandbox.info().domain
    counted = int(await out(sandbox, "cat /root/count"))

    await sandbox.pause()
    assert sandbox.state is SandboxState.PAUSED
    saved = runtime.settings.paused_dir / sandbox.sandbox_id
    assert (saved / "memory.ram").is_file() and (saved / "device.state").is_file()
    assert not qemu_of(domain)  # no QEMU, no memory, no CPU while paused
    assert sandbox.info().domain is None
    with pytest.raises(SandboxStateError, match="paused"):
        await sandbox.commands.run("true")
    assert await sandbox.get_policy() == policy
    await asyncio.sleep(2.0)

    await sandbox.resume()
    assert sandbox.info().state is SandboxState.RUNNING
    assert not saved.exists()
    assert await out(sandbox, "cat /root/file") == "before\n"
    first = int(await out(sandbox, "cat /root/count"))
    await asyncio.sleep(0.5)
    second = int(await out(sandbox, "cat /root/count"))
    assert counted <= first < second  # the same process, counting on from where it was
    result = await command.wait(timeout=60)
    assert result.exit_code == 0
    assert "".join(lines).split() == [str(i) for i in range(1, 31)]  # nothing lost or doubled
    assert await sandbox.get_policy() == policy
    assert await out(sandbox, "hostname") == f"{domain}\n"  # the same machine


async def test_fork_children_diverge_with_identities_of_their_own(
    sandbox: AsyncSandbox, test_host: TestHost
) -> None:
    await out(sandbox, "echo parent > /root/shared; " + COUNTER)
    children = await sandbox.fork(2)
    try:
        assert len(children) == 2 and all(c.state is SandboxState.RUNNING for c in children)
        everyone = [sandbox, *children]
        for index, sb in enumerate(everyone):
            assert await out(sb, "cat /root/shared") == "parent\n"
            await out(sb, f"echo {index} > /root/mine")
        for index, sb in enumerate(everyone):
            assert await out(sb, "cat /root/mine") == f"{index}\n"  # no write seen elsewhere
        seen = [(await out(sb, IDENTITY)).split("\n") for sb in everyone]
        for field in range(4):  # hostname, machine-id, address, random stream
            values = [s[field] for s in seen]
            assert len(set(values)) == 3, (field, values)
        for child in children:  # the counter runs on in each
            first = int(await out(child, "cat /root/count"))
            await asyncio.sleep(0.5)
            assert int(await out(child, "cat /root/count")) > first
    finally:
        for child in children:
            await child.kill()


async def test_three_sandboxes_from_a_snapshot_see_the_package(
    sandbox: AsyncSandbox, runtime: Runtime
) -> None:
    await out(
        sandbox,
        "mkdir -p /tmp/p/DEBIAN /tmp/p/usr/local/bin && printf '%s\\n' 'Package: hello-avm'"
        " 'Version: 1.0' 'Architecture: all' 'Maintainer: t <t@t>' 'Description: test'"
        " > /tmp/p/DEBIAN/control && printf '#!/bin/sh\\necho hi from the package\\n'"
        " > /tmp/p/usr/local/bin/hello-avm && chmod 755 /tmp/p/usr/local/bin/hello-avm"
        " && dpkg-deb --build /tmp/p /tmp/hello.deb >/dev/null && dpkg -i /tmp/hello.deb",
    )
    name = f"test-pkg-{os.urandom(3).hex()}"
    info = await sandbox.snapshot(name)
    assert info.name == name and info.memory_bytes > 0 and info.pause_seconds > 0
    assert sandbox.state is SandboxState.RUNNING
    assert name in [s.name for s in await AsyncSandbox.list_snapshots(runtime=runtime)]
    started = [await AsyncSandbox.create(runtime=runtime, snapshot=name) for _ in range(3)]
    try:
        for sb in started:
            assert await out(sb, "dpkg -s hello-avm | grep Status") == (
                "Status: install ok installed\n"
            )
            assert await out(sb, "hello-avm") == "hi from the package\n"
        with pytest.raises(SnapshotError, match="in use"):
            await AsyncSandbox.remove_snapshot(name, runtime=runtime)
    finally:
        for sb in started:
            await sb.kill()
    await AsyncSandbox.remove_snapshot(name, runtime=runtime)
    assert not (runtime.settings.state_dir / "snapshots" / name).exists()


async def test_the_cli_lists_starts_from_and_removes_snapshots(
    sandbox: AsyncSandbox, runtime: Runtime
) -> None:
    await out(sandbox, "echo from-the-snapshot > /root/marker")
    name = f"test-cli-{os.urandom(3).hex()}"
    await sandbox.snapshot(name)
    env = {**os.environ, "AGENT_VM_LOCAL": "1", "COLUMNS": "200"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent_vm", *args], capture_output=True,
                              text=True, env=env, timeout=300, check=False)  # fmt: skip

    listed = await asyncio.to_thread(cli, "snapshot", "list")
    assert listed.returncode == 0 and name in listed.stdout, listed.stderr
    ran = await asyncio.to_thread(cli, "run", "--snapshot", name, "--", "cat", "/root/marker")
    assert ran.returncode == 0 and ran.stdout == "from-the-snapshot\n", ran.stderr
    top = await asyncio.to_thread(cli, "top", "--once")
    assert top.returncode == 0 and "snapshots: " in top.stdout, top.stderr
    removed = await asyncio.to_thread(cli, "snapshot", "rm", name)
    assert removed.returncode == 0, removed.stderr
    missing = await asyncio.to_thread(cli, "snapshot", "rm", name)
    assert missing.returncode != 0 and "no snapshot" in missing.stderr


async def test_a_workspace_is_detached_around_pause_snapshot_and_fork(
    runtime: Runtime, image: Image, tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("from the host\n")
    (tmp_path / "sub").mkdir()
    async with AsyncSandbox(runtime=runtime, workspace=tmp_path) as sb:
        await out(sb, "echo from the guest > /workspace/out.txt")
        # a command working in the workspace (its cwd) keeps running across the pause
        worker = await sb.commands.run(
            "cd sub && while :; do pwd > /tmp/where; sleep 0.2; done", background=True,
            timeout=None,
        )  # fmt: skip
        await asyncio.sleep(0.5)
        await sb.pause()
        await sb.resume()
        assert await out(sb, "cat /workspace/notes.txt") == "from the host\n"
        pid = (await out(sb, "pgrep -f 'pwd > /tmp/where' | head -1")).strip()
        assert await out(sb, f"readlink /proc/{pid}/cwd") == "/workspace/sub\n"  # back
        await asyncio.sleep(0.5)
        assert await out(sb, "cat /tmp/where") == "/workspace/sub\n"
        await worker.kill()
        # one that holds a file of the workspace open: refused, named, nothing changes
        holder = await sb.commands.run("exec 3</workspace/notes.txt; sleep 600",
                                       background=True, timeout=None)  # fmt: skip
        await asyncio.sleep(0.5)
        with pytest.raises(WorkspaceError, match=r"sleep.*notes\.txt"):
            await sb.pause()
        assert sb.state is SandboxState.RUNNING
        assert await out(sb, "cat /workspace/notes.txt") == "from the host\n"
        await holder.kill()
        await asyncio.sleep(0.3)
        name = f"test-ws-{os.urandom(3).hex()}"
        await sb.snapshot(name)
        assert await out(sb, "cat /workspace/out.txt") == "from the guest\n"
        children = await sb.fork(1)
        try:
            child = children[0]
            # a child never reaches the parent's directory: it has no workspace
            assert await out(child, "mountpoint -q /workspace && echo mounted || echo no") == "no\n"
            await out(child, "mkdir -p /workspace && echo child > /workspace/out.txt")
        finally:
            await children[0].kill()
        assert (tmp_path / "out.txt").read_text() == "from the guest\n"
        await AsyncSandbox.remove_snapshot(name, runtime=runtime)


async def test_a_pause_without_room_leaves_the_sandbox_running(
    sandbox: AsyncSandbox, runtime: Runtime
) -> None:
    paused_dir = runtime.settings.paused_dir
    paused_dir.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(paused_dir)]
    await asyncio.to_thread(subprocess.run, mount, check=True)
    try:
        await out(sandbox, COUNTER)
        with pytest.raises(DiskFullError, match="not enough disk"):
            await sandbox.pause()
        assert sandbox.state is SandboxState.RUNNING
        first = int(await out(sandbox, "cat /root/count"))
        await asyncio.sleep(0.3)
        assert int(await out(sandbox, "cat /root/count")) > first
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", str(paused_dir)], check=True)


async def test_a_paused_sandbox_deleted_leaves_nothing(
    sandbox: AsyncSandbox, runtime: Runtime
) -> None:
    await sandbox.pause()
    saved = runtime.settings.paused_dir / sandbox.sandbox_id
    assert saved.is_dir()
    await sandbox.kill()
    assert not saved.exists()
    leftovers = [p for p in (runtime.settings.state_dir / "snapshots").glob(".fork-*")]
    assert all(runtime.snapshots.users(p.name) for p in leftovers), leftovers
    shutil.rmtree(saved, ignore_errors=True)


async def test_auto_resume_and_gc_leave_paused_data_alone(runtime: Runtime, image: Image) -> None:
    async with AsyncSandbox(runtime=runtime, auto_resume=True) as sb:
        await out(sb, "echo kept > /root/kept")
        name = f"test-gc-{os.urandom(3).hex()}"
        await sb.snapshot(name)
        await sb.pause()
        removed = await runtime.collect_garbage()
        assert not any(sb.sandbox_id in r or name in r for r in removed), removed
        assert (runtime.settings.paused_dir / sb.sandbox_id / "memory.ram").is_file()
        assert await sb.files.read("/root/kept") == "kept\n"  # resumed by the call
        assert sb.state is SandboxState.RUNNING
        await sb.pause()
        assert await out(sb, "cat /root/kept") == "kept\n"  # and by a command
        await AsyncSandbox.remove_snapshot(name, runtime=runtime)


async def test_a_resume_that_fails_keeps_the_paused_state_to_try_again(
    sandbox: AsyncSandbox, runtime: Runtime
) -> None:
    await out(sandbox, COUNTER)
    await sandbox.pause()
    saved = runtime.settings.paused_dir / sandbox.sandbox_id
    state = saved / "device.state"
    good = state.read_bytes()
    state.write_bytes(good[: len(good) // 2])  # QEMU fails to load it half way
    with pytest.raises(AgentVMError):
        await sandbox.resume()
    assert sandbox.state is SandboxState.PAUSED
    assert (saved / "memory.ram").is_file() and (saved / "disk.qcow2").is_file()
    state.unlink()
    with pytest.raises(AgentVMError, match="incomplete"):
        await sandbox.resume()
    state.write_bytes(good)
    await sandbox.resume()
    first = int(await out(sandbox, "cat /root/count"))
    await asyncio.sleep(0.3)
    assert int(await out(sandbox, "cat /root/count")) > first


async def test_paused_sandboxes_and_snapshots_outlive_a_new_golden_state(
    sandbox: AsyncSandbox, runtime: Runtime, image: Image
) -> None:
    """A reboot empties /dev/shm and the golden state is captured again, a new disk at
    the old path: what was saved keeps the disk it was made on (``pins.py``)."""
    await out(sandbox, "echo on-the-old-disk > /root/mark; " + COUNTER)
    name = f"test-pin-{os.urandom(3).hex()}"
    await sandbox.snapshot(name)
    await sandbox.pause()
    saved = runtime.settings.paused_dir / sandbox.sandbox_id
    assert (saved / "base.qcow2").is_file()
    assert [h for h in runtime.images.holders(image) if sandbox.sandbox_id in h]
    golden = runtime.golden_store.locate_for(image, runtime.spec())
    golden.ram.unlink()  # as a reboot would
    fresh = await runtime.vm(spec=runtime.spec())  # captures the golden state again
    await fresh.close()
    await sandbox.resume()
    assert await out(sandbox, "cat /root/mark") == "on-the-old-disk\n"
    first = int(await out(sandbox, "cat /root/count"))
    await asyncio.sleep(0.3)
    assert int(await out(sandbox, "cat /root/count")) > first
    async with AsyncSandbox(runtime=runtime, snapshot=name) as child:
        assert await out(child, "cat /root/mark") == "on-the-old-disk\n"
    await sandbox.pause()  # again, from the resumed VM (its base travelled with it)
    await sandbox.resume()
    assert await out(sandbox, "cat /root/mark") == "on-the-old-disk\n"
    await AsyncSandbox.remove_snapshot(name, runtime=runtime)
    assert not [h for h in runtime.images.holders(image) if name in h]
