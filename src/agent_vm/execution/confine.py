"""How sandboxes are kept apart on the host: an identity each, shared files read-only.

The runtime makes one ``Confinement`` and hands it to every VM start:

* each VM's QEMU gets a user of its own (``host/identities.py``), which owns its overlay
  (0600) and nothing else; libvirt's per-domain directory (channel socket, monitor,
  master key) follows the same label;
* the base images and golden disks are root's, 0444; the kernel and initrd are given to
  libvirt through a read-only view of the image store (``host/mounts.py``), so that
  libvirt's chown of them fails and they stay root's;
* golden RAM files are root's and group ``agentvm``'s: 0640 where QEMU can map a private
  RAM file it opened read-only (QEMU >= 8.2), 0660 below, where QEMU opens it read-write
  even for a private mapping. Then a QEMU escape could write it, so its ctime is recorded
  at capture and checked before every clone (``GoldenState.intact``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from agent_vm.host.identities import Identities, Identity
from agent_vm.host.mounts import ensure_readonly_bind
from agent_vm.image.store import Image

SHARED_FILES = ("rootfs.qcow2", "vmlinux", "vmlinuz", "initramfs.cpio")


@dataclass(frozen=True)
class Confinement:
    identities: Identities
    images_dir: Path
    images_view: Path  # a read-only bind mount of images_dir
    ram_read_only: bool  # clones open golden RAM read-only (QEMU >= 8.2 asked to)

    def prepare(self) -> None:
        """The shared group, the read-only view, root-owned read-only image files."""
        self.identities.ensure_shared_group()
        ensure_readonly_bind(self.images_dir, self.images_view)
        for path in self.images_dir.glob("*/*/*"):
            if path.name in SHARED_FILES and path.is_file() and not path.is_symlink():
                harden(path, 0o444)

    def boot_files(self, image: Image) -> tuple[Path, Path]:
        """Kernel and initrd as libvirt gets them: through the read-only view."""
        relative = image.path.relative_to(self.images_dir.resolve())
        base = self.images_view / relative
        return base / image.kernel.name, base / image.initrd.name

    def allocate(self, vm_name: str) -> Identity:
        return self.identities.allocate(vm_name)

    @property
    def ram_mode(self) -> int:
        return 0o640 if self.ram_read_only else 0o660


def harden(path: Path, mode: int, gid: int = 0) -> None:
    """root:gid, ``mode``, unless already so (cheap when nothing changes)."""
    st = path.stat()
    if st.st_uid != 0 or st.st_gid != gid:
        os.chown(path, 0, gid)
    if st.st_mode & 0o7777 != mode:
        path.chmod(mode)


def qemu_opens_private_ram_read_only(qemu_version: str) -> bool:
    """QEMU 8.2 can map a private memory-backend-file from a read-only open
    (``readonly=on,rom=off``); 7.2 opens it read-write even for a private mapping.

    Found on QEMU 10 (Debian 13, nested run of bench/nested.py): without asking for it,
    QEMU still opens read-write and a 0640 file fails with "Permission denied"."""
    try:
        major, minor = (int(part) for part in qemu_version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (8, 2)
