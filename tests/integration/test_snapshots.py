"""Snapshots with memory state, for real: the state after restore is the snapshot's."""

from __future__ import annotations

from datetime import timedelta

import pytest

from agent_vm import timeutil
from agent_vm.core.snapshot import SnapshotManager
from agent_vm.errors import SnapshotError
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.running import RunningVM
from agent_vm.host.cgroups import memory_limit_file


async def test_create_list_restore_delete(fresh_vm: RunningVM, executor: AgentExecutor) -> None:
    manager = SnapshotManager()
    vm = fresh_vm.vm
    assert (await executor.execute(fresh_vm, "echo one > /root/state")).success
    # A process whose memory holds state that is not on disk proves memory is restored.
    await executor.execute(
        fresh_vm,
        "nohup python3 -c 'import time; time.sleep(1e6)' >/dev/null 2>&1 & echo $! > /root/pid",
    )
    before = timeutil.now()
    golden = manager.create_snapshot(vm, "golden", "clean state", tags=["base", "test"])
    assert golden.name == "golden" and golden.description == "clean state"
    assert golden.tags == ("base", "test") and golden.state == "running"
    assert golden.created_at.tzinfo is not None
    assert golden.created_at.utcoffset() in (timedelta(hours=-5), timedelta(hours=-4))
    assert (
        before - timedelta(seconds=5) <= golden.created_at <= timeutil.now() + timedelta(seconds=5)
    )

    await executor.execute(
        fresh_vm, "echo two > /root/state; kill $(cat /root/pid); touch /root/new"
    )
    assert [s.name for s in manager.list_snapshots(vm)] == ["golden"]

    manager.restore_snapshot(vm, golden)
    await fresh_vm.reconnect()
    pid = vm.qemu_pid()
    assert pid is not None and vm.memory_limit_mib is not None
    # the restarted QEMU is capped again
    assert int(memory_limit_file(pid).read_text()) == vm.memory_limit_mib << 20
    state = await executor.execute(
        fresh_vm, "cat /root/state; kill -0 $(cat /root/pid) && echo alive; ls /root/new"
    )
    assert state.stdout == "one\nalive\n"  # disk, memory and processes as at the snapshot
    assert "No such file" in state.stderr

    second = manager.create_snapshot(vm, "second")
    assert [s.name for s in manager.list_snapshots(vm)] == ["golden", "second"]
    assert manager.get_snapshot(vm, "golden").tags == ("base", "test")
    manager.delete_snapshot(vm, golden)
    manager.delete_snapshot(vm, second.name)
    assert manager.list_snapshots(vm) == []
    with pytest.raises(SnapshotError, match="no snapshot named"):
        manager.get_snapshot(vm, "golden")


async def test_bad_snapshot_requests_are_clear_errors(fresh_vm: RunningVM) -> None:
    manager = SnapshotManager()
    with pytest.raises(SnapshotError, match="cannot restore"):
        manager.restore_snapshot(fresh_vm.vm, "does-not-exist")
    with pytest.raises(SnapshotError, match="cannot delete"):
        manager.delete_snapshot(fresh_vm.vm, "does-not-exist")
    with pytest.raises(ValueError):
        manager.create_snapshot(fresh_vm.vm, "bad name with spaces")
