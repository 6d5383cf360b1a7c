"""KSM switched on and off through its sysfs files (a directory standing in for them)."""

from __future__ import annotations

from pathlib import Path

from agent_vm.host import ksm


def test_enable_and_disable(tmp_path: Path) -> None:
    for name in ("run", "pages_to_scan", "sleep_millisecs", "pages_sharing"):
        (tmp_path / name).write_text("0\n")
    assert ksm.available(tmp_path) and not ksm.running(tmp_path)
    ksm.enable(tmp_path)
    assert ksm.running(tmp_path)
    assert (tmp_path / "pages_to_scan").read_text() == str(ksm.PAGES_TO_SCAN)
    (tmp_path / "pages_sharing").write_text("256\n")
    assert ksm.shared_mib(tmp_path) == 1.0
    ksm.disable(tmp_path)
    assert (tmp_path / "run").read_text() == "0" and not ksm.running(tmp_path)


def test_a_kernel_without_ksm_is_left_alone(tmp_path: Path) -> None:
    ksm.enable(tmp_path)
    ksm.disable(tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert not ksm.running(tmp_path) and ksm.shared_mib(tmp_path) == 0.0
