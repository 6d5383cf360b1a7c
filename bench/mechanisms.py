"""Ways to get a VM back to a known state, measured side by side (issue #3 asks to choose
the reset mechanism by measurement):

* libvirt ``snapshot-revert`` of an internal snapshot (libvirt restarts QEMU);
* the same snapshot loaded in-process with HMP ``loadvm`` through libvirt's passthrough;
* libvirt ``save`` to tmpfs, then ``restore`` (a new QEMU loads the whole RAM);
* agent-vm's clone: x-ignore-shared device state + copy-on-write RAM file, via libvirt;
* the raw primitive under the clone: the same QEMU mechanism without libvirt.

Each figure ends when the guest agent answered a new session's handshake (except where
noted), so they are comparable.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from agent_vm.communication.channel import AgentChannel
from agent_vm.communication.transport import UnixTransport
from agent_vm.core.connection import LibvirtConnection
from agent_vm.core.qmp import qmp
from agent_vm.core.snapshot import SnapshotManager
from agent_vm.execution.running import transport_for
from agent_vm.execution.runtime import Runtime
from agent_vm.execution.spec import MachineSpec
from agent_vm.image.disk import create_overlay
from agent_vm.image.store import Image
from bench.rawqemu import qemu_argv

IGNORE_SHARED = [{"capability": "x-ignore-shared", "state": True}]
RUNNING, READY = "raw QEMU clone: spawn -> running", "raw QEMU clone: spawn -> READY"


async def handshake(vm_transport: Any, name: str) -> None:
    channel = AgentChannel(vm_transport, name=name)
    await channel.connect(60)
    await channel.close()


async def snapshot_mechanisms(
    runtime: Runtime, image: Image, spec: MachineSpec, runs: int
) -> dict[str, list[float]]:
    """revert (libvirt), loadvm (in-process) and save/restore on one cold-booted VM."""
    out: dict[str, list[float]] = {"libvirt snapshot-revert": [], "QMP loadvm (in-process)": []}
    connection = runtime.connection
    vm = await runtime.vm(image=image, spec=spec, cold=True)
    manager = SnapshotManager()
    try:
        await (await vm.channel()).close()
        manager.create_snapshot(vm.vm, "bench")
        for _ in range(runs):
            started = time.perf_counter()
            manager.restore_snapshot(vm.vm, "bench")
            await handshake(transport_for(vm.vm), vm.name)
            out["libvirt snapshot-revert"].append(time.perf_counter() - started)
        for _ in range(runs):
            started = time.perf_counter()
            qmp(vm.vm, "human-monitor-command", {"command-line": "loadvm bench"})
            await handshake(transport_for(vm.vm), vm.name)
            out["QMP loadvm (in-process)"].append(time.perf_counter() - started)
        manager.delete_snapshot(vm.vm, "bench")
        out["libvirt restore (save file on tmpfs)"] = await _save_restore(connection, vm, runs)
    finally:
        await vm.close()
    return out


async def _save_restore(connection: LibvirtConnection, vm: Any, runs: int) -> list[float]:
    samples = []
    with tempfile.TemporaryDirectory(prefix="agent-vm-save-", dir="/dev/shm") as tmp:
        saved = Path(tmp) / "domain.save"
        vm.vm.domain.save(str(saved))
        for _ in range(runs):
            started = time.perf_counter()
            connection.connection.restore(str(saved))
            await handshake(transport_for(vm.vm), vm.name)
            samples.append(time.perf_counter() - started)
            vm.vm.destroy()
    return samples


# ---------------------------------------------------------------- raw QEMU clone


class RawQMP:
    """Just enough QMP to drive a raw QEMU in the benchmark."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: Path) -> RawQMP:
        for _ in range(500):
            try:
                reader, writer = await asyncio.open_unix_connection(str(path))
                break
            except OSError:
                await asyncio.sleep(0.002)
        else:
            raise RuntimeError(f"no QMP socket at {path}")
        client = cls(reader, writer)
        await client._line()  # greeting
        await client.call("qmp_capabilities")
        return client

    async def _line(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(await self.reader.readline())
        return data

    async def call(self, command: str, **arguments: Any) -> Any:
        message = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self.writer.write(json.dumps(message).encode() + b"\n")
        await self.writer.drain()
        while True:
            reply = await self._line()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"{command}: {reply['error']}")

    async def wait_migration(self) -> None:
        while (await self.call("query-migrate")).get("status") != "completed":  # noqa: ASYNC110 - QMP offers polling only
            await asyncio.sleep(0.002)

    async def ignore_shared(self) -> None:
        await self.call("migrate-set-capabilities", capabilities=IGNORE_SHARED)

    def close(self) -> None:
        self.writer.close()


def _raw_argv(
    image: Image, disk: Path, sock: Path, qmp_sock: Path, ram: Path, share: bool, incoming: bool
) -> list[str]:
    backend = (
        f"memory-backend-file,id=ram0,size=512M,mem-path={ram},share={'on' if share else 'off'}"
    )
    argv = qemu_argv(image, disk, sock)
    argv += ["-object", backend, "-machine", "memory-backend=ram0"]
    argv += ["-qmp", f"unix:{qmp_sock},server=on,wait=off"]
    if incoming:
        argv += ["-incoming", "defer"]
    return argv


async def raw_clones(image: Image, runs: int) -> dict[str, list[float]]:
    """A raw golden state, then raw clones: QEMU spawn -> running, and -> agent READY."""
    out: dict[str, list[float]] = {
        "raw QEMU clone: spawn -> running": [],
        "raw QEMU clone: spawn -> READY": [],
    }
    with tempfile.TemporaryDirectory(prefix="agent-vm-rawclone-", dir="/dev/shm") as tmp:
        base = Path(tmp)
        ram, state, golden_disk = base / "golden.ram", base / "golden.state", base / "golden.qcow2"
        create_overlay(image.disk, golden_disk)
        template = await asyncio.create_subprocess_exec(
            *_raw_argv(image, golden_disk, base / "t.sock", base / "t.qmp", ram, True, False),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            channel = AgentChannel(UnixTransport(base / "t.sock"), name="raw-template")
            await channel.connect(60)
            for _ in range(100):
                if (await channel.ping()).settled:
                    break
                await asyncio.sleep(0.05)
            await channel.close()
            control = await RawQMP.connect(base / "t.qmp")
            await control.call(
                "migrate-set-capabilities",
                capabilities=[{"capability": "x-ignore-shared", "state": True}],
            )
            await control.call("migrate", uri=f"exec:cat > {state}")
            await control.wait_migration()
            control.close()
        finally:
            template.kill()
            await template.wait()
        for i in range(runs):
            disk = base / f"c{i}.qcow2"
            create_overlay(golden_disk, disk)
            started = time.perf_counter()
            clone = await asyncio.create_subprocess_exec(
                *_raw_argv(image, disk, base / f"c{i}.sock", base / f"c{i}.qmp", ram, False, True),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                control = await RawQMP.connect(base / f"c{i}.qmp")
                await control.call(
                    "migrate-set-capabilities",
                    capabilities=[{"capability": "x-ignore-shared", "state": True}],
                )
                await control.call("migrate-incoming", uri=f"exec:cat {state}")
                await control.wait_migration()
                await control.call("cont")
                out[RUNNING].append(time.perf_counter() - started)
                await handshake(UnixTransport(base / f"c{i}.sock"), f"raw-clone-{i}")
                out[READY].append(time.perf_counter() - started)
                control.close()
            finally:
                clone.kill()
                await clone.wait()
            disk.unlink()
        ram.unlink(missing_ok=True)
        os.sync()
    return out
