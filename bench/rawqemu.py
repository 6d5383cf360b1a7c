"""The same guest without libvirt: QEMU started directly with the image's kernel,
initramfs and an overlay, devices as in agent-vm's domain XML.

Three moments per boot, on the wall clock from spawning QEMU:
* ``init``: the initramfs's first line (the floor any boot of this kernel+initramfs has);
* ``root``: root disk mounted, just before Python starts;
* ``ready``: agent-vm's agent answered the handshake (same guest, no libvirt).
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import time
from pathlib import Path

from agent_vm.communication.channel import AgentChannel
from agent_vm.communication.transport import UnixTransport
from agent_vm.image.disk import create_overlay
from agent_vm.image.store import Image
from agent_vm.protocol.ports import CHANNEL_NAME


def qemu_argv(
    image: Image, overlay: Path, sock: Path, memory_mib: int = 512, kernel: Path | None = None
) -> list[str]:
    return [
        "qemu-system-x86_64", "-accel", "tcg,tb-size=128", "-M", "q35", "-cpu", "max",
        "-m", str(memory_mib), "-smp", "1", "-nodefaults", "-nographic", "-no-reboot",
        "-kernel", str(kernel or image.kernel), "-initrd", str(image.initrd),
        "-append", f"{image.cmdline} agentvm.debug=1",
        "-serial", "stdio",
        "-drive", f"if=none,id=d0,file={overlay},format=qcow2,cache=unsafe",
        "-device", "virtio-blk-pci,drive=d0",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=ch0,path={sock},server=on,wait=off",
        "-device", f"virtserialport,chardev=ch0,name={CHANNEL_NAME}",
        "-device", "virtio-rng-pci",
    ]  # fmt: skip


def packaged_bzimage(image: Image, cache_dir: Path) -> Path | None:
    """The same kernel as the distribution ships it (compressed), from the build cache."""
    inputs = image.manifest.inputs
    boot = cache_dir / "kernel" / f"{inputs.kernel_package}_{inputs.kernel_version}" / "root/boot"
    path = boot / f"vmlinuz-{image.manifest.kernel_release}"
    return path if path.exists() else None


async def boot_once(
    image: Image, kernel: Path | None = None, until: str = "ready"
) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="agent-vm-rawqemu-") as tmp:
        overlay, sock = Path(tmp) / "disk.qcow2", Path(tmp) / "ctl.sock"
        create_overlay(image.disk, overlay)
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *qemu_argv(image, overlay, sock, kernel=kernel),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        marks: dict[str, float] = {}
        try:
            assert proc.stdout is not None
            while "root" not in marks and until not in marks:
                line = await asyncio.wait_for(proc.stdout.readline(), 60)
                if not line:
                    raise RuntimeError("raw QEMU exited before the root disk was mounted")
                if b"agent-vm initramfs: start" in line:
                    marks["init"] = time.perf_counter() - started
                elif b"agent-vm initramfs: root mounted" in line:
                    marks["root"] = time.perf_counter() - started
            if until != "ready":
                return marks
            drain = asyncio.create_task(_drain(proc.stdout))
            channel = AgentChannel(UnixTransport(sock), name="raw-qemu")
            await channel.connect(60)
            marks["ready"] = time.perf_counter() - started
            await channel.close()
            drain.cancel()
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        return marks


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass
