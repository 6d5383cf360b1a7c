"""KVM vs TCG from prepared host facts (files standing in for /proc and /sys)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent_vm.host.accel import Accel, HostPaths, detect_accel


def host(tmp_path: Path, *, flags: str, modules: list[str], dev_kvm: bool) -> HostPaths:
    (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: fpu {flags} sse2\n")
    for module in modules:
        (tmp_path / "module" / module).mkdir(parents=True)
    (tmp_path / "module").mkdir(exist_ok=True)
    if dev_kvm:
        (tmp_path / "kvm").touch()
    return HostPaths(tmp_path / "cpuinfo", tmp_path / "module", tmp_path / "kvm")


def test_intel_with_kvm_intel_uses_kvm(tmp_path: Path) -> None:
    choice = detect_accel(
        "auto", host(tmp_path, flags="vmx", modules=["kvm", "kvm_intel"], dev_kvm=True)
    )
    assert choice.accel is Accel.KVM and "vmx" in choice.reason


def test_amd_with_kvm_amd_uses_kvm(tmp_path: Path) -> None:
    choice = detect_accel(
        "auto", host(tmp_path, flags="svm", modules=["kvm", "kvm_amd"], dev_kvm=True)
    )
    assert choice.accel is Accel.KVM


def test_pvm_backed_dev_kvm_uses_tcg(tmp_path: Path) -> None:
    choice = detect_accel(
        "auto", host(tmp_path, flags="", modules=["kvm", "kvm_pvm"], dev_kvm=True)
    )
    assert choice.accel is Accel.TCG and "PVM" in choice.reason


def test_no_dev_kvm_uses_tcg(tmp_path: Path) -> None:
    choice = detect_accel("auto", host(tmp_path, flags="vmx", modules=["kvm_intel"], dev_kvm=False))
    assert choice.accel is Accel.TCG and "no /dev/kvm" in choice.reason


def test_flag_without_module_uses_tcg(tmp_path: Path) -> None:
    choice = detect_accel("auto", host(tmp_path, flags="vmx", modules=["kvm"], dev_kvm=True))
    assert choice.accel is Accel.TCG


@pytest.mark.parametrize("forced", ["kvm", "tcg"])
def test_forced_accelerator_wins(tmp_path: Path, forced: str) -> None:
    paths = host(tmp_path, flags="", modules=["kvm_pvm"], dev_kvm=True)
    choice = detect_accel(forced, paths)
    assert choice.accel.value == forced and choice.forced


def test_bad_forced_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        detect_accel("hvf", host(tmp_path, flags="", modules=[], dev_kvm=False))


def test_domain_types() -> None:
    assert Accel.KVM.domain_type == "kvm" and Accel.TCG.domain_type == "qemu"


def test_a_missing_tun_node_is_made_once(tmp_path: Path) -> None:
    """Without udev /dev/net/tun may be missing: libvirt's NAT networks need it."""
    import os
    import stat

    from agent_vm.host.daemons import ensure_tun

    node = tmp_path / "net" / "tun"
    assert ensure_tun(node)
    info = node.stat()
    assert stat.S_ISCHR(info.st_mode) and os.major(info.st_rdev) == 10
    assert os.minor(info.st_rdev) == 200
    assert not ensure_tun(node)  # there now: nothing to do
