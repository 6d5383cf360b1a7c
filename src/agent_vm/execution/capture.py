"""Capture a running VM's memory into a file on disk, the form a golden state has.

A golden clone maps its golden RAM privately, so QEMU cannot save its RAM the golden way
(``x-ignore-shared`` skips only shared RAM). The capture therefore migrates the stopped
VM into a *converter*: a second QEMU of the same devices, started paused with -incoming
and its RAM a shared file in ``dest``. Once the migration lands, the file is the RAM; the
converter then saves its device state with ``x-ignore-shared`` (~0.5 MB) and goes. Its
vCPUs never run and its network interface is an unconnected tap.

The result (``memory.ram`` + ``device.state``, and a disk the caller keeps) starts VMs
exactly like a golden state: a clone maps the file privately and loads the device state.
Pages the guest never wrote stay holes in the file (disk costs what the guest touched).

The caller stops the source first and decides what happens to it afterwards (continue for
a snapshot, destroy for a pause); on any failure the converter and ``dest`` are removed
and the source is left as it was.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from agent_vm.core.connection import LibvirtConnection
from agent_vm.core.qmp import migrate_into, save_device_state
from agent_vm.core.template import METADATA_URI, QEMU_NS, RAM_BACKEND_ID
from agent_vm.core.vm import VM
from agent_vm.errors import ConfigError, DiskFullError, VMError
from agent_vm.execution.launch import new_vm_name
from agent_vm.execution.running import RunningVM
from agent_vm.logs import get_logger

log = get_logger(__name__)

RAM_FILE = "memory.ram"
STATE_FILE = "device.state"
_RAM_FILE_OPTIONS = ("mem-path=", "share=", "readonly=", "rom=")
MARGIN_MIB = 64  # beyond the guest's RAM, for the device state and the file system


@dataclass(frozen=True)
class Captured:
    ram: Path
    state: Path
    seconds: float
    ram_bytes: int  # what the RAM file takes on disk (the guest's touched pages)


def captured_ram_backend(domain_xml: str) -> bool:
    """Whether the domain's RAM is a named memory backend (golden clones, resumed VMs);
    a cold-booted VM's RAM is QEMU's default and cannot be captured this way."""
    return f"id={RAM_BACKEND_ID}," in domain_xml


def check_room(dest: Path, memory_mib: int, extra_bytes: int = 0) -> None:
    """Refuse before stopping anything when ``dest``'s file system cannot hold the RAM."""
    probe = next((p for p in (dest, *dest.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    needed = ((memory_mib + MARGIN_MIB) << 20) + extra_bytes
    if free < needed:
        raise DiskFullError(
            f"not enough disk to save the sandbox's memory: {free >> 20} MiB free in "
            f"{probe}, {needed >> 20} MiB needed",
            hint="free some disk (agent-vm snapshot rm, agent-vm gc) and try again",
        )


async def capture_memory(
    connection: LibvirtConnection, running: RunningVM, dest: Path, *, timeout: float = 300.0
) -> Captured:
    """``running`` must be stopped (``vm.pause()``); returns with it in QEMU's
    ``postmigrate`` state: continue it (``vm.resume()``) or destroy it."""
    started = time.monotonic()
    memory_mib = running.spec.profile.memory_mib if running.spec is not None else 0
    source_xml = await asyncio.to_thread(running.vm.xml, True)
    if not memory_mib or not captured_ram_backend(source_xml):
        raise ConfigError(
            f"{running.name} was booted cold: its memory cannot be saved",
            hint="start the sandbox from a golden state (the default, not cold=True)",
        )
    ram, state = dest / RAM_FILE, dest / STATE_FILE
    scratch = dest / "converter"
    converter: VM | None = None
    try:
        owner = _owner(running)
        await asyncio.to_thread(_prepare, dest, scratch, ram, memory_mib, owner)
        xml = converter_xml(source_xml, new_vm_name("agentvm-capture"), ram, scratch)
        converter = await asyncio.to_thread(VM.define, connection, xml)
        await asyncio.to_thread(converter.start, True)
        await asyncio.to_thread(migrate_into, running.vm, converter, timeout)
        await asyncio.to_thread(save_device_state, converter, state, timeout)
    except BaseException:
        await asyncio.shield(asyncio.to_thread(_discard, converter, dest))
        raise
    await asyncio.shield(asyncio.to_thread(_discard, converter, None))
    await asyncio.to_thread(_settle_file, ram)
    await asyncio.to_thread(shutil.rmtree, scratch, True)
    used = (await asyncio.to_thread(os.stat, ram)).st_blocks * 512
    return Captured(ram, state, time.monotonic() - started, used)


def _owner(running: RunningVM) -> tuple[int, int]:
    if running.identity is not None:
        return running.identity.uid, running.identity.gid
    pid = running.qemu_pid
    if pid is None:
        raise VMError(f"{running.name} is not running")
    st = Path(f"/proc/{pid}").stat()
    return st.st_uid, st.st_gid


def _prepare(dest: Path, scratch: Path, ram: Path, memory_mib: int, owner: tuple[int, int]) -> None:
    dest.mkdir(parents=True, mode=0o711)
    scratch.mkdir(mode=0o755)
    with open(ram, "wb") as handle:
        handle.truncate(memory_mib << 20)
    os.chown(ram, *owner)
    ram.chmod(0o600)
    console = scratch / "console.log"
    console.touch()
    os.chown(console, *owner)


def converter_xml(source_xml: str, name: str, ram: Path, scratch: Path) -> str:
    """The source's definition with its own name, its RAM shared in ``ram``, waiting for
    migrated state, a tap attached to nothing, and its console and metadata in
    ``scratch`` (a crash leaves a leftover the reaper removes, never the source's files)."""
    root = ET.fromstring(source_xml)
    name_el = root.find("name")
    assert name_el is not None
    name_el.text = name
    for uuid in root.findall("uuid"):
        root.remove(uuid)
    args = root.find(f"{{{QEMU_NS}}}commandline")
    if args is None:
        raise ConfigError("the domain has no memory backend of agent-vm's")
    values = [arg.get("value", "") for arg in args]
    for arg in args:
        value = arg.get("value", "")
        if value.startswith("memory-backend-file,"):
            kept = [p for p in value.split(",") if not p.startswith(_RAM_FILE_OPTIONS)]
            arg.set("value", ",".join([*kept, f"mem-path={ram}", "share=on"]))
    if "-incoming" not in values:
        for value in ("-incoming", "defer"):
            ET.SubElement(args, f"{{{QEMU_NS}}}arg", value=value)
    devices = root.find("devices")
    assert devices is not None
    for iface in devices.findall("interface"):
        iface.set("type", "ethernet")
        for child in list(iface):
            if child.tag in ("source", "target", "filterref", "alias"):
                iface.remove(child)
    for channel in devices.findall("channel"):
        source = channel.find("source")
        if source is not None:
            source.attrib.pop("path", None)
    for serial in devices.findall("serial"):
        source = serial.find("source")
        if source is not None and source.get("path"):
            source.set("path", str(scratch / "console.log"))
    ours = root.find(f"metadata/{{{METADATA_URI}}}vm")
    if ours is not None:
        for key, value in (("workdir", str(scratch)), ("pid", str(os.getpid()))):
            element = ours.find(f"{{{METADATA_URI}}}{key}")
            if element is not None:
                element.text = value
        start = ours.find(f"{{{METADATA_URI}}}pid_start")
        if start is not None:
            from agent_vm.host.procs import process_start_time

            start.text = process_start_time(os.getpid())
    return ET.tostring(root, encoding="unicode")


def _discard(converter: VM | None, dest: Path | None) -> None:
    if converter is not None:
        try:
            converter.destroy()
            converter.undefine()
        except VMError as exc:  # the reaper removes it (its owner pid is ours)
            log.error("converter_not_removed", vm=converter.name, error=str(exc))
    if dest is not None:
        shutil.rmtree(dest, ignore_errors=True)


def _settle_file(path: Path) -> None:
    """Write the RAM file out and drop it from the page cache: a paused sandbox or an
    unused snapshot costs disk, not memory."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
