"""`agent-vm doctor`: what this host offers, what is missing, and the exact remedy."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from agent_vm.errors import AgentVMError
from agent_vm.execution.runtime import Runtime
from agent_vm.host import daemons
from agent_vm.host.accel import vsock_available
from agent_vm.host.packages import missing_packages

MIN_FREE_GIB = 3.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    remedy: str = ""
    required: bool = True


def run_checks(runtime: Runtime, *, start_daemons: bool = True) -> list[Check]:
    settings = runtime.settings
    checks: list[Check] = []
    root = os.geteuid() == 0
    checks.append(
        Check("root", root, "running as root" if root else "not root", "run as root (sudo)")
    )
    missing = missing_packages("core")
    checks.append(
        Check(
            "packages",
            not missing,
            "all installed" if not missing else "missing: " + " ".join(missing),
            "run ./agent-vm once (it installs them) or: apt-get install " + " ".join(missing),
        )
    )
    missing_bench = missing_packages("bench")
    checks.append(
        Check(
            "bench peers",
            not missing_bench,
            "bubblewrap, runsc installed"
            if not missing_bench
            else "missing: " + " ".join(missing_bench),
            "apt-get install " + " ".join(missing_bench),
            required=False,
        )
    )
    choice = runtime.accel
    checks.append(Check("accelerator", True, f"{choice.accel.value.upper()}: {choice.reason}"))
    checks.append(
        Check(
            "vsock",
            True,
            "available (/dev/vhost-vsock), but not chosen automatically: the control "
            "channel is virtio-serial unless a MachineSpec asks for channel='vsock'"
            if vsock_available()
            else "not available (no /dev/vhost-vsock): the control channel is virtio-serial",
            required=False,
        )
    )
    if root and start_daemons:
        try:
            actions = daemons.ensure_daemons()
            checks.append(
                Check("daemons", True, "; ".join(actions) if actions else "virtlogd, libvirtd up")
            )
        except AgentVMError as exc:
            checks.append(Check("daemons", False, exc.message, exc.hint or ""))
    reaper = (
        "systemd" if daemons.has_service_manager() else ("tini" if shutil.which("tini") else "")
    )
    checks.append(
        Check(
            "reaper",
            bool(reaper),
            f"QEMU processes are reaped by {reaper}" if reaper else "no subreaper for libvirtd",
            "apt-get install tini (VM destroy otherwise waits for PID 1 to reap QEMU)",
            required=False,
        )
    )
    try:
        runtime.connection.open()
        libvirt_version, qemu_version = runtime.connection.versions()
        checks.append(
            Check(
                "libvirt",
                True,
                f"{settings.libvirt_uri}: libvirt {libvirt_version}, QEMU {qemu_version}",
            )
        )
    except AgentVMError as exc:
        checks.append(Check("libvirt", False, exc.message, exc.hint or ""))
    checks += confinement_checks(runtime)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(settings.state_dir).free / 2**30
    checks.append(
        Check(
            "disk",
            free >= MIN_FREE_GIB,
            f"{free:.1f} GiB free in {settings.state_dir}",
            f"free space: images need ~{MIN_FREE_GIB:.0f} GiB (set AGENT_VM_STATE_DIR elsewhere)",
        )
    )
    image = runtime.images.get(settings.image)
    checks.append(
        Check(
            "image",
            True,
            f"{settings.image}: {image.key}, built {image.manifest.created_at:%Y-%m-%d %H:%M %Z}"
            if image
            else f"{settings.image}: not built yet (built on first `agent-vm run`)",
            required=False,
        )
    )
    return checks


def confinement_checks(runtime: Runtime) -> list[Check]:
    """How sandboxes' QEMUs are confined on this host (after the runtime started)."""
    try:
        confinement = runtime.confine()
    except AgentVMError as exc:
        return [Check("confinement", False, exc.message, exc.hint or "")]
    base = confinement.identities.base
    ram = (
        "read-only to them"
        if confinement.ram_read_only
        else "writable by them (QEMU < 8.2 opens private RAM files read-write; every clone "
        "checks the file's ctime against the capture's first)"
    )
    checks = [
        Check(
            "confinement",
            True,
            f"each QEMU runs as its own user agvm-N (uid = gid = {base} + N; groups kvm, "
            f"libvirt-qemu, agentvm), capabilities dropped, seccomp and no_new_privs on "
            f"(libvirt's sandbox); base images and golden disks root's, read-only; "
            f"kernels through a read-only view; golden RAM {ram}",
        )
    ]
    models = security_models(runtime)
    mac = [m for m in models if m not in ("none", "dac")]
    checks.append(
        Check(
            "MAC (AppArmor/SELinux)",
            True,
            f"libvirt confines QEMU with {', '.join(mac)} too"
            if mac
            else "none on this host (libvirt's security models: "
            + ", ".join(models or ["?"])
            + "); confinement is by user, capabilities and seccomp",
            required=False,
        )
    )
    return checks


def security_models(runtime: Runtime) -> list[str]:
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(runtime.connection.connection.getCapabilities())
    except AgentVMError:
        return []
    return [m.findtext("model") or "?" for m in root.findall("host/secmodel")]
