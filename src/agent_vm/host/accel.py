"""Choose between KVM and TCG from what the host really offers.

"Does /dev/kvm open" is not enough: on PVM-backed hosts (``kvm_pvm`` module, no vmx/svm
CPU flag) /dev/kvm exists and libvirt even advertises ``<domain type='kvm'>``, yet a stock
guest kernel hangs forever under it. KVM is chosen only with a hardware virtualization flag
and the matching ``kvm_intel``/``kvm_amd`` module; otherwise QEMU's TCG emulator is used.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from agent_vm.errors import ConfigError


class Accel(enum.StrEnum):
    KVM = "kvm"
    TCG = "tcg"

    @property
    def domain_type(self) -> str:
        """The libvirt ``<domain type=...>`` value for this accelerator."""
        return "kvm" if self is Accel.KVM else "qemu"


@dataclass(frozen=True)
class AccelChoice:
    accel: Accel
    reason: str
    forced: bool = False
    facts: dict[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class HostPaths:
    """Where the facts come from; tests point these at prepared files."""

    cpuinfo: Path = Path("/proc/cpuinfo")
    sys_module: Path = Path("/sys/module")
    dev_kvm: Path = Path("/dev/kvm")


def _cpu_flags(cpuinfo: Path) -> set[str]:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def host_facts(paths: HostPaths = HostPaths()) -> dict[str, bool]:
    flags = _cpu_flags(paths.cpuinfo)
    return {
        "dev_kvm": paths.dev_kvm.exists(),
        "vmx": "vmx" in flags,
        "svm": "svm" in flags,
        "kvm_intel": (paths.sys_module / "kvm_intel").exists(),
        "kvm_amd": (paths.sys_module / "kvm_amd").exists(),
        "kvm_pvm": (paths.sys_module / "kvm_pvm").exists(),
    }


def detect_accel(forced: str = "auto", paths: HostPaths = HostPaths()) -> AccelChoice:
    """Pick the accelerator; ``forced`` is "kvm", "tcg" or "auto" (from settings/env)."""
    facts = host_facts(paths)
    if forced in ("kvm", "tcg"):
        return AccelChoice(Accel(forced), f"forced by configuration (accel={forced})", True, facts)
    if forced != "auto":
        raise ConfigError(f"accel must be auto, kvm or tcg, not {forced!r}")
    if not facts["dev_kvm"]:
        return AccelChoice(Accel.TCG, "no /dev/kvm on this host", facts=facts)
    hw_intel = facts["vmx"] and facts["kvm_intel"]
    hw_amd = facts["svm"] and facts["kvm_amd"]
    if hw_intel or hw_amd:
        how = "vmx + kvm_intel" if hw_intel else "svm + kvm_amd"
        return AccelChoice(Accel.KVM, f"hardware virtualization ({how})", facts=facts)
    if facts["kvm_pvm"]:
        return AccelChoice(
            Accel.TCG,
            "/dev/kvm is PVM-backed (kvm_pvm, no vmx/svm): stock guest kernels hang under it",
            facts=facts,
        )
    return AccelChoice(
        Accel.TCG,
        "/dev/kvm exists but the CPU shows no vmx/svm flag with kvm_intel/kvm_amd loaded",
        facts=facts,
    )


def vsock_available(dev: Path = Path("/dev/vhost-vsock")) -> bool:
    """QEMU can offer a virtio-vsock device only when the host has vhost-vsock."""
    return dev.exists()
