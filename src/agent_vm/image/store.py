"""The image cache on disk: ``<state>/images/<name>/<key>/`` plus a ``current`` link."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from agent_vm.errors import ImageError, ImageNotFoundError
from agent_vm.image.manifest import ImageManifest
from agent_vm.logs import get_logger

log = get_logger(__name__)

DISK_FILE = "rootfs.qcow2"
INITRD_FILE = "initramfs.cpio"
MANIFEST_FILE = "manifest.json"


HELD_DIR = "held"  # <image>/held/<holder>: a paused sandbox or snapshot stands on it


def held(path: Path) -> bool:
    try:
        return any((path / HELD_DIR).iterdir())
    except OSError:
        return False


@dataclass(frozen=True)
class Image:
    """A built image ready to boot."""

    name: str
    path: Path
    manifest: ImageManifest

    @property
    def key(self) -> str:
        return self.manifest.key

    @property
    def build_id(self) -> str:
        """This build of the image: a forced rebuild keeps the key but is another disk, so
        states captured on the old one (golden states) must not be used with it."""
        return f"{self.key}.{self.manifest.created_at:%Y%m%d%H%M%S%f}"

    @property
    def disk(self) -> Path:
        return self.path / DISK_FILE

    @property
    def kernel(self) -> Path:
        return self.path / self.manifest.kernel_file

    @property
    def initrd(self) -> Path:
        return self.path / INITRD_FILE

    @property
    def cmdline(self) -> str:
        return self.manifest.cmdline

    @property
    def min_disk_gib(self) -> int:
        """A VM's disk may not be smaller than the file system its image holds."""
        layer = self.manifest.layer
        return layer.disk_gib if layer is not None else 2

    @property
    def allowlist(self) -> tuple[str, ...] | None:
        """The names a recipe image's sandboxes may reach by default (None: no limit)."""
        layer = self.manifest.layer
        names = layer.recipe.get("allowlist") if layer is not None else None
        return tuple(names) if names else None


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _load(self, name: str, path: Path) -> Image | None:
        """The image at ``path``; None if absent, or built by an older, incompatible agent-vm
        (its manifest does not validate), so that it gets rebuilt instead of failing."""
        manifest = path / MANIFEST_FILE
        if not manifest.is_file():
            return None
        try:
            loaded = ImageManifest.load(manifest)
        except ValidationError as exc:
            log.info("image_manifest_outdated", path=str(manifest), errors=exc.error_count())
            return None
        if loaded.layer is not None and not self._base_intact(loaded.layer.base_disk, loaded):
            log.info("image_base_changed", image=name, base=loaded.layer.base_disk)
            return None  # its backing file went or was rebuilt: rebuilt from the recipe
        return Image(name, path, loaded)

    def _base_intact(self, base_disk: str, layer_manifest: ImageManifest) -> bool:
        base = self._load("base", Path(base_disk).parent)
        layer = layer_manifest.layer
        return (
            base is not None
            and layer is not None
            and base.disk.is_file()
            and base.build_id == layer.base_build
        )

    def get(self, name: str, key: str | None = None) -> Image | None:
        base = self.root / name
        path = base / key if key else base / "current"
        if not path.exists():
            return None
        return self._load(name, path.resolve())

    def require(self, name: str) -> Image:
        """The current image called ``name``; ImageNotFoundError naming the build command."""
        image = self.get(name)
        if image is None:
            raise ImageNotFoundError(
                f"no image named {name!r} has been built",
                hint=f"build it first: agent-vm image build --name {name}",
            )
        return image

    def all(self) -> list[tuple[Image, bool]]:
        """All images with whether each is its name's current one."""
        out: list[tuple[Image, bool]] = []
        if not self.root.is_dir():
            return out
        for base in sorted(p for p in self.root.iterdir() if p.is_dir()):
            current = (base / "current").resolve() if (base / "current").exists() else None
            for path in sorted(p for p in base.iterdir() if p.is_dir() and not p.is_symlink()):
                image = self._load(base.name, path)
                if image is not None:
                    out.append((image, path == current))
        return out

    def make_current(self, image: Image) -> None:
        """Point ``<name>/current`` at ``image`` (atomically)."""
        base = self.root / image.name
        tmp_link = base / ".current.tmp"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(image.path.name)
        tmp_link.replace(base / "current")

    def publish(self, name: str, staged: Path, key: str, keep: int = 2) -> Image:
        """Move a fully built image into place, point ``current`` at it, prune old ones."""
        base = self.root / name
        final = base / key
        if final.exists():
            shutil.rmtree(final)
        staged.rename(final)
        image = self._load(name, final)
        assert image is not None
        self.make_current(image)
        backing = self.backing_dirs()
        versions = sorted(
            (
                p
                for p in base.iterdir()
                if p.is_dir() and not p.is_symlink() and p != final and not p.name.startswith(".")
            ),
            key=lambda p: p.stat().st_mtime,
        )
        versions = [p for p in versions if p not in backing and not held(p)]  # in use
        for old in versions[: max(0, len(versions) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
        return image

    def holders(self, image: Image) -> list[str]:
        """Paused sandboxes and snapshots that stand on this build (``held/``)."""
        held_dir = image.path / HELD_DIR
        return sorted(p.name for p in held_dir.iterdir()) if held_dir.is_dir() else []

    def backing_dirs(self) -> set[Path]:
        """Image directories whose disk some layer uses as its backing file."""
        return {
            Path(image.manifest.layer.base_disk).parent
            for image, _ in self.all()
            if image.manifest.layer is not None
        }

    def remove(self, name: str, key: str | None = None) -> list[Path]:
        base = self.root / name
        if not base.is_dir():
            raise ImageError(f"no image named {name!r}", hint="see `agent-vm image list`")
        going = base if key is None else base / key
        layers = sorted(
            image.name
            for image, _ in self.all()
            if image.manifest.layer is not None
            and going
            in (
                Path(image.manifest.layer.base_disk).parent,
                *Path(image.manifest.layer.base_disk).parents,
            )
            and image.name != name
        )
        if layers:
            raise ImageError(
                f"image {name!r} is the base of {', '.join(layers)}",
                hint="remove those first: agent-vm image rm NAME",
            )
        holding = sorted(
            f"{p.name}: {h.name}"
            for p in ([going] if key is not None else list(going.glob("*/")))
            for h in (p / HELD_DIR).glob("*")
        )
        if holding:
            raise ImageError(
                f"image {name!r} holds paused sandboxes or snapshots ({', '.join(holding)})",
                hint="remove those first (agent-vm snapshot rm, or kill the sandbox)",
            )
        if key is None:
            shutil.rmtree(base)
            return [base]
        target = base / key
        if not target.is_dir():
            raise ImageError(f"image {name!r} has no version {key!r}")
        shutil.rmtree(target)
        link = base / "current"
        if link.is_symlink() and not link.exists():
            link.unlink()
        return [target]
