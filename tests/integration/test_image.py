"""The built image: contents, caching, and a guest that runs nothing of its own."""

from __future__ import annotations

import pytest

from agent_vm.config import Settings
from agent_vm.errors import ImageError
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.running import RunningVM
from agent_vm.execution.runtime import Runtime
from agent_vm.image.rootfs import GUEST_PACKAGES
from agent_vm.image.store import Image, ImageStore


def test_manifest_describes_the_image(image: Image) -> None:
    m = image.manifest
    installed = {entry.split("=")[0] for entry in m.installed_packages}
    assert set(GUEST_PACKAGES) <= installed
    assert m.kernel_file == "vmlinux"  # booted through PVH, no in-guest decompression
    assert image.kernel.exists() and image.initrd.exists() and image.disk.exists()
    assert m.sizes["initramfs.cpio"] < 8 * 2**20  # small, not the distribution's initrd
    assert m.created_at.tzinfo is not None
    assert m.inputs.kernel_package.startswith("linux-image-")


def test_an_unchanged_image_is_not_rebuilt(image: Image, settings: Settings) -> None:
    again = Runtime(settings).build_image()  # resolves all inputs, finds the cached image
    assert again.key == image.key
    assert again.manifest.created_at == image.manifest.created_at


def test_missing_images_are_clear_errors(settings: Settings) -> None:
    store = ImageStore(settings.images_dir)
    with pytest.raises(ImageError, match=r"no image named .* has been built"):
        store.require("no-such-image")
    with pytest.raises(ImageError, match="no image named"):
        store.remove("no-such-image")


async def test_guest_runs_nothing_but_init_and_agent(
    shared_vm: RunningVM, executor: AgentExecutor
) -> None:
    # User-space processes besides ours would be services that could reach out on their
    # own (NTP, apt timers, telemetry); kernel threads have no command line.
    result = await executor.execute(
        shared_vm,
        "for p in /proc/[0-9]*; do c=$(tr '\\0' ' ' < $p/cmdline 2>/dev/null); "
        '[ -n "$c" ] && echo "$c"; done',
    )
    commands = [line for line in result.stdout.splitlines() if line.strip()]
    unexpected = [
        c
        for c in commands
        if not c.startswith(("/usr/bin/python3 -I -S -B -c", "/bin/bash -c for p in", "tr "))
    ]
    assert unexpected == []
    assert any("agent_vm.guest.init" in c for c in commands)


async def test_guest_identity(shared_vm: RunningVM, executor: AgentExecutor) -> None:
    result = await executor.execute(shared_vm, "hostname; cat /etc/machine-id; id agent")
    hostname, machine_id, agent = result.stdout.splitlines()
    assert hostname == shared_vm.name
    assert len(machine_id) == 32
    assert agent.startswith("uid=1000(agent)")


async def test_console_log_is_bounded(shared_vm: RunningVM, executor: AgentExecutor) -> None:
    # virtlogd rotates the console log at 2 MiB and keeps 3 old files.
    await executor.execute(
        shared_vm, "head -c 2300000 /dev/zero | tr '\\0' x > /dev/console", timeout=300
    )
    logs = sorted(shared_vm.workdir.glob("console.log*"))
    assert shared_vm.console_log.stat().st_size <= 2 * 2**20
    assert 2 <= len(logs) <= 4
