"""The image cache layout: publish, current, pruning, removal (files only, no VMs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent_vm import timeutil
from agent_vm.errors import ImageError
from agent_vm.image.manifest import BuildInputs, ImageManifest
from agent_vm.image.store import MANIFEST_FILE, ImageStore


def stage(root: Path, key: str) -> Path:
    staged = root / "default" / f".tmp-{key}"
    staged.mkdir(parents=True)
    inputs = BuildInputs(
        distro="debian",
        suite="bookworm",
        mirror="m",
        packages=["p"],
        kernel_package="k",
        kernel_version="1",
        boot_modules=[],
        late_modules=[],
        guest_code=key,
        cmdline="console=ttyS0",
    )
    ImageManifest(
        name="default",
        key=key,
        created_at=timeutil.now(),
        build_seconds=1.0,
        inputs=inputs,
        kernel_release="6.1",
        kernel_file="vmlinux",
        cmdline="console=ttyS0",
        installed_packages=[],
        sizes={},
    ).save(staged / MANIFEST_FILE)
    return staged


def test_publish_makes_current_and_keeps_one_previous(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    for key in ("aaa", "bbb", "ccc"):
        image = store.publish("default", stage(tmp_path, key), key)
        assert store.get("default") == image
    assert sorted(img.key for img, _ in store.all()) == ["bbb", "ccc"]
    assert [img.key for img, current in store.all() if current] == ["ccc"]


def test_make_current_switches_back_to_an_existing_version(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    store.publish("default", stage(tmp_path, "aaa"), "aaa")
    store.publish("default", stage(tmp_path, "bbb"), "bbb")
    older = store.get("default", "aaa")
    assert older is not None
    store.make_current(older)
    current = store.get("default")
    assert current is not None and current.key == "aaa"


def test_outdated_manifest_counts_as_not_built(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    store.publish("default", stage(tmp_path, "aaa"), "aaa")
    (tmp_path / "default" / "aaa" / MANIFEST_FILE).write_text('{"name": "default"}')
    assert store.get("default") is None
    with pytest.raises(ImageError, match=r"no image named .* has been built"):
        store.require("default")


def test_remove(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    store.publish("default", stage(tmp_path, "aaa"), "aaa")
    with pytest.raises(ImageError, match="no version"):
        store.remove("default", "zzz")
    store.remove("default", "aaa")
    assert store.get("default") is None and store.all() == []
