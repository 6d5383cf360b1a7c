"""What an image was built from and what it contains, stored next to it as JSON."""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, Field

BUILDER_VERSION = "2"


class BuildInputs(BaseModel):
    """Everything that, when changed, must produce a different image."""

    builder_version: str = BUILDER_VERSION
    distro: str
    suite: str
    mirror: str
    packages: list[str]
    kernel_package: str
    kernel_version: str
    kernel_extra_packages: list[str] = []
    boot_modules: list[str]
    late_modules: list[str]
    guest_code: str
    cmdline: str

    def key(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    def rootfs_key(self) -> str:
        parts = [self.builder_version, self.suite, self.mirror, *self.packages]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


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

    @classmethod
    def load(cls, path: Path) -> ImageManifest:
        return cls.model_validate_json(path.read_text())

    def save(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2) + "\n")
