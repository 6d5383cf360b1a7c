"""Disk images: the ext4/qcow2 base built from a tree, and per-VM copy-on-write overlays."""

from __future__ import annotations

import subprocess
from pathlib import Path

from agent_vm.errors import ImageError

ROOTFS_SIZE = "2G"


def _run(argv: list[str]) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise ImageError(f"{argv[0]} is not installed", hint="run ./agent-vm doctor") from exc
    if proc.returncode != 0:
        raise ImageError(f"{argv[0]} failed: {proc.stderr.strip()[-500:]}")


def build_base_disk(tree: Path, raw: Path, out: Path, size: str = ROOTFS_SIZE) -> None:
    """ext4 filled straight from the tree (no loop mount, no root-only tricks), as qcow2.

    No journal: every VM writes to a throw-away overlay, so the journal would only cost.
    """
    _run(
        [
            "mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-L", "agentvm-root",
            "-E", "root_owner=0:0", "-d", str(tree), str(raw), size,
        ]
    )  # fmt: skip
    _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out)])
    raw.unlink()


def create_overlay(base: Path, overlay: Path, size_gib: int | None = None) -> None:
    """A qcow2 overlay backed by ``base`` (the base is never written), of ``size_gib``
    (default: the base's size); the guest grows its file system into a larger one."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay)]
    if size_gib is not None:
        argv.append(f"{size_gib}G")
    _run(argv)
