"""What an image was built from and what it contains, stored next to it as JSON."""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

BUILDER_VERSION = "5"  # 5: E2B's user `user`, sudo, python-is-python3; /etc/profile


class BuildInputs(BaseModel):
    """Everything that, when changed, must produce a different image."""

    builder_version: str = BUILDER_VERSION
    distro: str
    suite: str
    mirror: str
    apt_sources: list[str] = Field(
        default=[], description="the image's sources.list lines (release, updates, security)"
    )
    packages: list[str]
    kernel_package: str
    kernel_version: str
    kernel_extra_packages: list[str] = []
    boot_modules: list[str]
    late_modules: list[str]
    guest_code: str
    cmdline: str
    egress_ca: str = ""  # the egress proxy CA the image trusts (host/egress.py)

    def key(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    def rootfs_key(self) -> str:
        parts = [self.builder_version, self.suite, self.mirror, *self.apt_sources, *self.packages]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


class LayerInfo(BaseModel):
    """A recipe's layer: a qcow2 whose backing file is its base image's disk."""

    base_name: str
    base_key: str
    base_build: str = Field(description="the base's build id: a rebuilt base is another disk")
    base_disk: str = Field(description="the backing file, which must outlive the layer")
    recipe_path: str
    recipe: dict[str, Any] = Field(description="the recipe as built (agent-vm's model dump)")
    tar_bytes: int
    entries: int
    removed: int
    disk_gib: int = Field(description="the layer's virtual size: VMs get at least this")


class ImageManifest(BaseModel):
    name: str
    key: str
    created_at: datetime
    build_seconds: float
    inputs: BuildInputs
    kernel_release: str
    kernel_file: str = Field(description="vmlinux (PVH ELF) or vmlinuz (bzImage)")
    cmdline: str
    installed_packages: list[str]
    sizes: dict[str, int]
    layer: LayerInfo | None = None

    @classmethod
    def load(cls, path: Path) -> ImageManifest:
        return cls.model_validate_json(path.read_text())

    def save(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2) + "\n")
