"""Golden-state bookkeeping on disk (no VMs): keys, completeness, pruning."""

from __future__ import annotations

from pathlib import Path

from agent_vm import timeutil
from agent_vm.core.template import ResourceProfile
from agent_vm.execution.golden import GoldenKey, GoldenMeta, GoldenStore
from agent_vm.execution.spec import MachineSpec
from agent_vm.host.accel import Accel


def make(store: GoldenStore, image_key: str, spec: MachineSpec) -> str:
    key = GoldenKey(image_key=image_key, spec=spec)
    golden = store.locate(key)
    golden.directory.mkdir(parents=True)
    golden.ram.parent.mkdir(parents=True, exist_ok=True)
    for path in (golden.disk, golden.state, golden.ram):
        path.write_bytes(b"x")
    meta = GoldenMeta(
        key=key, created_at=timeutil.now(), boot_seconds=1, capture_seconds=0.1, state_bytes=1
    )
    golden.meta_path.write_text(meta.model_dump_json())
    assert golden.exists() and golden.meta() == meta
    return golden.digest


def test_key_depends_on_image_and_hardware() -> None:
    base = GoldenKey(image_key="a", spec=MachineSpec(accel=Accel.TCG))
    assert base.digest() == GoldenKey(image_key="a", spec=MachineSpec(accel=Accel.TCG)).digest()
    assert base.digest() != GoldenKey(image_key="b", spec=MachineSpec(accel=Accel.TCG)).digest()
    bigger = MachineSpec(accel=Accel.TCG, profile=ResourceProfile(memory_mib=1024))
    assert base.digest() != GoldenKey(image_key="a", spec=bigger).digest()


def test_prune_removes_states_of_vanished_images(tmp_path: Path) -> None:
    store = GoldenStore(tmp_path / "state", tmp_path / "vms", tmp_path / "shm")
    keep = make(store, "live", MachineSpec(accel=Accel.TCG))
    gone = make(store, "removed", MachineSpec(accel=Accel.TCG))
    assert store.prune({"live"}) == [gone]
    assert [g.digest for g in store.all()] == [keep]
    assert not (tmp_path / "shm" / f"{gone}.ram").exists()


def test_incomplete_state_is_not_used(tmp_path: Path) -> None:
    store = GoldenStore(tmp_path / "state", tmp_path / "vms", tmp_path / "shm")
    digest = make(store, "img", MachineSpec(accel=Accel.TCG))
    (tmp_path / "shm" / f"{digest}.ram").unlink()  # e.g. /dev/shm cleared by a reboot
    golden = store.all()[0]
    assert not golden.exists()
