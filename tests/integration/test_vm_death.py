"""A VM that dies under a running command gives a clear error quickly, never a hang."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from agent_vm.core.vm import VMState
from agent_vm.errors import VMDiedError
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.running import RunningVM


async def test_kill_9_of_qemu_mid_execution_raises_within_two_seconds(
    fresh_vm: RunningVM, executor: AgentExecutor
) -> None:
    started = asyncio.Event()
    task = asyncio.create_task(
        executor.execute(
            fresh_vm, "echo go; sleep 120", timeout=300, on_stdout=lambda _: started.set()
        )
    )
    await asyncio.wait_for(started.wait(), 30)
    pid = fresh_vm.vm.qemu_pid()
    assert pid is not None
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(VMDiedError) as caught:
        await asyncio.wait_for(task, 10)
    elapsed = time.monotonic() - killed_at
    assert elapsed < 2.0, f"took {elapsed:.2f} s to report the dead VM"
    assert fresh_vm.name in str(caught.value) and "stopped while in use" in str(caught.value)
    assert fresh_vm.vm.get_state() in (VMState.SHUTOFF, VMState.CRASHED)


async def test_a_dead_vm_fails_new_commands_clearly(
    fresh_vm: RunningVM, executor: AgentExecutor
) -> None:
    pid = fresh_vm.vm.qemu_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await fresh_vm.vm.wait_for_state(VMState.SHUTOFF, timeout=10)
    with pytest.raises(Exception) as caught:
        await asyncio.wait_for(executor.execute(fresh_vm, "true"), 35)
    assert fresh_vm.name in str(caught.value)
