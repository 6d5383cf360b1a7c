"""Recipe images: a qcow2 layer on the base image's disk, built once per input hash.

The host half (``image/layer.py``) runs the recipe's steps and packs what changed. This
half boots the base image with no network, shares the pack read-only, lets the guest's
own kernel apply it (deletions, then ``tar -x``) onto the VM's overlay, and keeps that
overlay: its backing file is the base disk, so a layer holds only what the recipe added.
The layer's directory gets the base's kernel and initramfs as hard links, so it boots
exactly like the base.
"""

from __future__ import annotations

import asyncio
import fcntl
import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from agent_vm import timeutil
from agent_vm.asyncutil import finish_in_thread
from agent_vm.communication.workspace import Workspace
from agent_vm.config import Settings
from agent_vm.errors import ImageError
from agent_vm.execution.confine import harden
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.running import RunningVM
from agent_vm.execution.spec import MachineSpec
from agent_vm.host.mounts import remove_tree
from agent_vm.image import kernel
from agent_vm.image.layer import LayerTree, build_tree
from agent_vm.image.manifest import ImageManifest, LayerInfo
from agent_vm.image.recipe import LoadedRecipe
from agent_vm.image.store import DISK_FILE, INITRD_FILE, MANIFEST_FILE, Image, ImageStore
from agent_vm.logs import get_logger

log = get_logger(__name__)

Progress = Callable[[str], None]
PACK_MOUNT = "/run/agent-vm-layer"
APPLY_TIMEOUT = 3600.0
GIB = 2**30
# deletions first (whiteouts, opaque directories), then the tar; sync so that QEMU has
# every block before it goes
APPLY_SCRIPT = f"""set -e
xargs -0 -r rm -rf -- < {PACK_MOUNT}/deletions
tar -xpf {PACK_MOUNT}/layer.tar --numeric-owner --xattrs --xattrs-include='*' -C /
sync
df -k / | tail -1
"""


def _lock(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def layer_disk_gib(base: Image, tree: LayerTree) -> int:
    """Room for the base's file system plus the layer with a margin (the disk is sparse:
    unused room costs nothing on the host)."""
    return max(base.min_disk_gib, base.min_disk_gib + math.ceil(tree.tar_bytes * 1.3 / GIB))


def _check_qcow2(path: Path) -> None:
    proc = subprocess.run(
        ["qemu-img", "check", "-q", str(path)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise ImageError(f"the layer disk is damaged: {proc.stderr.strip()[-300:]}")


def _publish_files(base: Image, staged: Path) -> None:
    for name in (base.kernel.name, INITRD_FILE):
        target = staged / name
        try:
            os.link(base.path / name, target)
        except OSError:
            shutil.copyfile(base.path / name, target)
    for path in staged.iterdir():
        harden(path, 0o444)
    staged.chmod(0o755)


class LayerHost(Protocol):
    """What a layer build needs of the runtime (``Runtime`` is one; this module cannot
    import it: the runtime builds layers through here)."""

    settings: Settings
    images: ImageStore

    async def image(self, name: str | None, progress: Progress) -> Image: ...

    def spec(self, *, network: str, disk_gib: int | None) -> MachineSpec: ...

    async def vm(
        self, *, image: Image, spec: MachineSpec, cold: bool, progress: Progress
    ) -> RunningVM: ...


async def build_layer(
    runtime: LayerHost,
    loaded: LoadedRecipe,
    *,
    name: str | None = None,
    force: bool = False,
    progress: Progress,
) -> Image:
    """The image of ``loaded`` (built now unless an identical one exists)."""
    base = await runtime.image(None, progress)
    if base.manifest.layer is not None:
        raise ImageError(
            "the default image is itself a recipe image", hint="layers stack on a base"
        )
    name = name or loaded.recipe.name
    if name == base.name:
        raise ImageError(f"a recipe image cannot be called {name!r}: that is the base image")
    key = loaded.key(base.build_id)  # a rebuilt base (even with the same key) is new
    store = runtime.images
    settings = runtime.settings
    lock = await finish_in_thread(_lock, settings.images_dir / f".layer-{name}.lock")
    try:
        if not force and (image := await asyncio.to_thread(store.get, name, key)) is not None:
            await asyncio.to_thread(store.make_current, image)
            progress(f"{name} {key} is up to date (layer on {base.name} {base.key})")
            return image
        return await _build(runtime, loaded, base, name, key, progress)
    finally:
        os.close(lock)


async def _build(
    runtime: LayerHost, loaded: LoadedRecipe, base: Image, name: str, key: str, progress: Progress
) -> Image:
    started = time.monotonic()
    settings = runtime.settings
    work = settings.build_cache_dir / "layers" / name
    base_tree = settings.build_cache_dir / "rootfs" / base.manifest.inputs.rootfs_key() / "tree"
    inputs = base.manifest.inputs
    wanted = loaded.recipe.kernel
    kspec = kernel.KernelSpec(
        inputs.kernel_package, inputs.kernel_version, tuple(inputs.kernel_extra_packages)
    )
    cache = settings.build_cache_dir
    modules = await asyncio.to_thread(
        kernel.extra_modules,
        cache,
        kspec,
        [*inputs.boot_modules, *inputs.late_modules],
        wanted.modules,
    )
    whole = None
    if wanted.all_modules:
        whole = await asyncio.to_thread(kernel.module_tree, cache, kspec)
    tree = await asyncio.to_thread(build_tree, loaded, base_tree, work, progress, modules, whole)
    host_seconds = time.monotonic() - started
    disk_gib = layer_disk_gib(base, tree)
    progress(f"writing the layer into a disk on {base.name} ({tree.tar_bytes / 2**20:.0f} MiB)")
    spec = runtime.spec(network="isolated", disk_gib=disk_gib)
    staged = settings.images_dir / name / f".tmp-{key}"
    await asyncio.to_thread(shutil.rmtree, staged, True)
    await asyncio.to_thread(staged.mkdir, parents=True)
    try:
        vm = await runtime.vm(image=base, spec=spec, cold=True, progress=progress)
        try:
            await vm.attach_workspace(Workspace(path=work, readonly=True, mount=PACK_MOUNT))
            result = await AgentExecutor().execute(
                vm, APPLY_SCRIPT, timeout=APPLY_TIMEOUT, user="root"
            )
            if result.exit_code != 0:
                raise ImageError(
                    f"applying the layer in the guest failed (exit {result.exit_code}): "
                    + result.stderr.strip()[-500:]
                )
            await vm.detach_workspace()
            # the overlay becomes the layer; QEMU flushes the rest of it as it exits
            await asyncio.to_thread(os.link, vm.workdir / "disk.qcow2", staged / DISK_FILE)
        finally:
            await vm.close()
        await asyncio.to_thread(_check_qcow2, staged / DISK_FILE)
        await asyncio.to_thread(_publish_files, base, staged)
        manifest = ImageManifest(
            name=name,
            key=key,
            created_at=timeutil.now(),
            build_seconds=round(time.monotonic() - started, 2),
            inputs=base.manifest.inputs,
            kernel_release=base.manifest.kernel_release,
            kernel_file=base.manifest.kernel_file,
            cmdline=base.manifest.cmdline,
            installed_packages=base.manifest.installed_packages,
            sizes={p.name: p.stat().st_size for p in sorted(staged.iterdir())},
            layer=LayerInfo(
                base_name=base.name,
                base_key=base.key,
                base_build=base.build_id,
                base_disk=str(base.disk),
                recipe_path=str(loaded.path),
                recipe=loaded.recipe.model_dump(),
                tar_bytes=tree.tar_bytes,
                entries=tree.entries,
                removed=tree.removed,
                disk_gib=disk_gib,
            ),
        )
        manifest.save(staged / MANIFEST_FILE)
        (staged / MANIFEST_FILE).chmod(0o644)
        image = await asyncio.to_thread(runtime.images.publish, name, staged, key)
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, staged, True)
        raise
    finally:
        await asyncio.to_thread(remove_tree, work)
    progress(
        f"built {name} {key} in {manifest.build_seconds:.1f} s "
        f"(steps {host_seconds:.1f} s, layer {manifest.sizes[DISK_FILE] / 2**20:.0f} MiB)"
    )
    log.info("layer_built", name=name, key=key, seconds=manifest.build_seconds)
    return image
