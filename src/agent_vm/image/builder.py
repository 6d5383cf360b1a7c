"""Build an image, reusing every stage whose inputs did not change.

Three caches: the debootstrap tree (keyed by suite, mirror, packages), the unpacked kernel
(keyed by its package version), and the finished image (keyed by all inputs, including a
hash of the guest code). Changing the agent therefore rebuilds in seconds, and asking
for an unchanged image costs only the input resolution.
"""

from __future__ import annotations

import fcntl
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from agent_vm import timeutil
from agent_vm.config import Settings
from agent_vm.errors import ImageError
from agent_vm.host import egress
from agent_vm.image import disk, kernel, rootfs
from agent_vm.image.initramfs import build_initramfs
from agent_vm.image.manifest import BuildInputs, ImageManifest
from agent_vm.image.mirror import detect_distro, image_sources
from agent_vm.image.store import DISK_FILE, INITRD_FILE, MANIFEST_FILE, Image, ImageStore
from agent_vm.logs import get_logger

log = get_logger(__name__)

# cryptomgr.notests: the kernel's crypto self-tests cost ~0.25 s of every TCG boot; they
# check implementations, they are not a security boundary.
BASE_CMDLINE = "console=ttyS0 quiet panic=-1 cryptomgr.notests"

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ImageBuilder:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = ImageStore(settings.images_dir)

    def resolve_inputs(self) -> BuildInputs:
        distro = detect_distro()
        spec = kernel.resolve_kernel(distro.id)
        suite = self.settings.suite or distro.codename
        mirror = self.settings.mirror or distro.mirror
        return BuildInputs(
            distro=distro.id,
            suite=suite,
            mirror=mirror,
            apt_sources=[s.line() for s in image_sources(distro, suite, mirror)],
            packages=sorted(rootfs.GUEST_PACKAGES),
            kernel_package=spec.package,
            kernel_version=spec.version,
            kernel_extra_packages=list(spec.extra_packages),
            boot_modules=kernel.BOOT_MODULES,
            late_modules=kernel.LATE_MODULES,
            guest_code=rootfs.guest_code_hash(),
            cmdline=BASE_CMDLINE,
            egress_ca=egress.ca_fingerprint(self.settings.state_dir),
        )

    def ensure(self, name: str | None = None, progress: Progress = _quiet) -> Image:
        """A bootable image without querying apt when possible.

        The current image is used as long as its guest code matches this host's (the
        agent protocol must match); a newer kernel or package set is picked up by an
        explicit :meth:`build`, which resolves every input (~1.3 s of apt queries here).
        """
        current = self.store.get(name or self.settings.image)
        if (
            current is not None
            and current.manifest.inputs.guest_code == rootfs.guest_code_hash()
            and current.manifest.inputs.cmdline == BASE_CMDLINE
            and current.manifest.inputs.egress_ca == egress.ca_fingerprint(self.settings.state_dir)
        ):
            return current
        if current is not None and current.manifest.layer is not None:
            recipe = current.manifest.layer.recipe_path
            raise ImageError(
                f"image {current.name!r} was built on a base image this agent-vm no longer "
                "boots (its guest code changed)",
                hint=f"rebuild it: agent-vm image build --recipe {recipe}",
            )
        return self.build(name, force=False, progress=progress)

    def build(
        self, name: str | None = None, *, force: bool = False, progress: Progress = _quiet
    ) -> Image:
        name = name or self.settings.image
        progress("resolving inputs")
        inputs = self.resolve_inputs()
        key = inputs.key()
        with _locked(self.settings.images_dir / ".build.lock"):
            if not force and (image := self.store.get(name, key)) is not None:
                self.store.make_current(image)  # built earlier, or by another process
                return image
            return self._build(name, inputs, progress)

    def _build(self, name: str, inputs: BuildInputs, progress: Progress) -> Image:
        started = time.monotonic()
        cache = self.settings.build_cache_dir
        spec = kernel.KernelSpec(
            inputs.kernel_package, inputs.kernel_version, tuple(inputs.kernel_extra_packages)
        )
        progress(f"kernel {spec.package} {spec.version}")
        kfiles = kernel.fetch_kernel(spec, cache / "kernel" / f"{spec.package}_{spec.version}")

        tree = cache / "rootfs" / inputs.rootfs_key() / "tree"
        if not (tree.parent / ".complete").exists():
            progress(f"debootstrap {inputs.suite} from {inputs.mirror}")
            rootfs.debootstrap(inputs.suite, inputs.mirror, tree, progress)
            progress("apt upgrade from " + ", ".join(inputs.apt_sources))
            rootfs.upgrade(tree, inputs.apt_sources, progress)
            rootfs.trim(tree)
            rootfs.configure(tree)
            (tree.parent / ".complete").write_text(timeutil.isoformat() + "\n")

        progress("installing the guest agent")
        boot = kernel.module_closure(kfiles.modules_dir, inputs.boot_modules)
        boot_names = {n for n, _ in boot}
        late = [
            (n, p)
            for n, p in kernel.module_closure(kfiles.modules_dir, inputs.late_modules)
            if n not in boot_names
        ]
        rootfs.install_guest_code(tree, [(n, kernel.decompressed_module(p)) for n, p in late])
        rootfs.install_egress_ca(tree, egress.ensure_ca(self.settings.state_dir).read_bytes())

        base = self.settings.images_dir / name
        staged = base / f".tmp-{inputs.key()}"
        if staged.exists():
            shutil.rmtree(staged)
        staged.mkdir(parents=True)
        progress("writing the root disk (ext4 -> qcow2)")
        disk.build_base_disk(tree, staged / "rootfs.raw", staged / DISK_FILE)
        progress("writing the initramfs")
        build_initramfs([(n, kernel.decompressed_module(p)) for n, p in boot], staged / INITRD_FILE)
        if kfiles.vmlinux is not None:
            kernel_file = "vmlinux"
            shutil.copyfile(kfiles.vmlinux, staged / kernel_file)
        else:
            kernel_file = "vmlinuz"
            shutil.copyfile(kfiles.bzimage, staged / kernel_file)
            log.warning("no_pvh_kernel", consequence="boots a compressed bzImage, ~2 s slower")
        for path in staged.iterdir():
            path.chmod(0o644)
        staged.chmod(0o755)
        for directory in (self.settings.state_dir, self.settings.images_dir, base):
            directory.chmod(0o755)
        manifest = ImageManifest(
            name=name,
            key=inputs.key(),
            created_at=timeutil.now(),
            build_seconds=round(time.monotonic() - started, 2),
            inputs=inputs,
            kernel_release=kfiles.release,
            kernel_file=kernel_file,
            cmdline=inputs.cmdline,
            installed_packages=rootfs.installed_packages(tree),
            sizes={p.name: p.stat().st_size for p in sorted(staged.iterdir())},
        )
        manifest.save(staged / MANIFEST_FILE)
        image = self.store.publish(name, staged, inputs.key())
        progress(f"built {name} {image.key} in {manifest.build_seconds:.1f} s")
        log.info("image_built", name=name, key=image.key, seconds=manifest.build_seconds)
        return image
