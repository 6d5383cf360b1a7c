"""The image cache layout: publish, current, pruning, removal (files only, no VMs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent_vm import timeutil
from agent_vm.errors import ImageError
from agent_vm.image.manifest import BuildInputs, ImageManifest, LayerInfo
from agent_vm.image.store import MANIFEST_FILE, Image, ImageStore


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


def stage_layer(root: Path, key: str, base: Image) -> Path:
    staged = root / "tools" / f".tmp-{key}"
    staged.mkdir(parents=True)
    manifest = base.manifest.model_copy(
        update={
            "name": "tools",
            "key": key,
            "layer": LayerInfo(
                base_name=base.name, base_key=base.key, base_build=base.build_id,
                base_disk=str(base.disk), recipe_path="/r.toml",
                recipe={"allowlist": ["pypi.org"]}, tar_bytes=1, entries=1, removed=0,
                disk_gib=3,
            ),
        }
    )  # fmt: skip
    manifest.save(staged / MANIFEST_FILE)
    return staged


def test_a_layer_keeps_its_base_and_goes_stale_when_the_base_is_rebuilt(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    base = store.publish("default", stage(tmp_path, "aaa"), "aaa")
    base.disk.write_bytes(b"qcow2")
    layer = store.publish("tools", stage_layer(tmp_path, "lll", base), "lll")
    assert (layer.min_disk_gib, layer.allowlist) == (3, ("pypi.org",))
    # newer bases do not prune the one a layer stands on, and it cannot be removed
    for key in ("bbb", "ccc"):
        store.publish("default", stage(tmp_path, key), key)
    assert store.get("default", "aaa") is not None
    with pytest.raises(ImageError, match="is the base of tools"):
        store.remove("default", "aaa")
    # a forced rebuild of the base with the same key is another disk: the layer is stale
    store.publish("default", stage(tmp_path, "aaa"), "aaa")
    (tmp_path / "default" / "aaa" / "rootfs.qcow2").write_bytes(b"other")
    assert store.get("tools") is None
