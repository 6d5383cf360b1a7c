"""VM state transitions through libvirt, with a real guest reacting to them."""

from __future__ import annotations

import libvirt
import pytest

from agent_vm.core.vm import VM, VMState
from agent_vm.errors import VMError
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.running import RunningVM


async def test_pause_resume_and_graceful_stop(fresh_vm: RunningVM, executor: AgentExecutor) -> None:
    vm = fresh_vm.vm
    assert vm.get_state() is VMState.RUNNING and vm.is_active()
    vm.pause()
    await vm.wait_for_state(VMState.PAUSED, timeout=5)
    vm.resume()
    await vm.wait_for_state(VMState.RUNNING, timeout=5)
    assert (await executor.execute(fresh_vm, "echo back")).stdout == "back\n"
    # Graceful: the ACPI power button reaches agent-vm's init, which powers off cleanly.
    # Wait until init has loaded the button driver (it does so right after boot).
    wait_for_button = (
        "for i in $(seq 100); do "
        "grep -q 'Power Button' /proc/bus/input/devices && break; sleep 0.1; done"
    )
    await executor.execute(fresh_vm, wait_for_button)
    vm.stop(graceful=True, timeout=30)
    assert vm.get_state() is VMState.SHUTOFF
    assert "powering off (SIGUSR2)" in fresh_vm.console_log.read_text()


async def test_force_stop_and_start_again(fresh_vm: RunningVM) -> None:
    vm = fresh_vm.vm
    vm.stop(graceful=False)
    assert vm.get_state() is VMState.SHUTOFF
    vm.stop(graceful=False)  # stopping a stopped VM is a no-op
    with pytest.raises(VMError) as caught:
        vm.pause()
    assert isinstance(caught.value.__cause__, libvirt.libvirtError)
    assert "pause" in str(caught.value) and vm.name in str(caught.value)
    vm.start()
    await vm.wait_for_state(VMState.RUNNING, timeout=10)
    await fresh_vm.reconnect(timeout=60)  # the guest booted again from its overlay
    with pytest.raises(VMError, match="is running, not shutoff"):
        await vm.wait_for_state(VMState.SHUTOFF, timeout=0.3)


async def test_lookup_and_undefined_state(fresh_vm: RunningVM) -> None:
    again = VM.lookup(fresh_vm.vm.connection, fresh_vm.name)
    assert again.uuid == fresh_vm.vm.uuid
    with pytest.raises(VMError, match="no VM named"):
        VM.lookup(fresh_vm.vm.connection, "agentvm-does-not-exist")
