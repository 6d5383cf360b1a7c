"""What a paused sandbox or a snapshot keeps alive: its golden disk and its image.

A VM's overlay names its backing file by path: the golden state's disk, which a later
capture of that golden state (after a reboot emptied /dev/shm, or a changed RAM file)
replaces by another disk at the same path. So the golden disk is hard-linked next to the
saved overlay as ``base.qcow2`` and the overlay's header is pointed at it by that
relative name (``qemu-img rebase -u``): wherever the overlay is linked (a work directory
on resume), ``base.qcow2`` goes beside it. A snapshot's disk as backing is left by path:
``SnapshotStore.users`` keeps such a snapshot from removal.

An image build prunes older builds; one that a paused sandbox or a snapshot stands on
carries ``held/<holder>`` and is skipped (``ImageStore.publish``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from agent_vm.errors import ImageError
from agent_vm.image.store import HELD_DIR, Image

BASE = "base.qcow2"


def pin_base(overlay: Path, golden_root: Path) -> None:
    """Make ``overlay``'s golden backing a link beside it (no-op when it is not one)."""
    backing = backing_of(overlay)
    if backing is None:
        return
    here = overlay.parent / BASE
    if backing == BASE:  # pinned before: the link travelled with it
        return
    source = Path(backing)
    if golden_root.resolve() not in source.resolve().parents:
        return  # a snapshot's disk: kept by path
    if not here.exists():
        os.link(source, here)
    done = subprocess.run(
        ["qemu-img", "rebase", "-u", "-F", "qcow2", "-b", BASE, str(overlay)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise ImageError(f"qemu-img rebase of {overlay} failed: {done.stderr.strip()[-300:]}")


def carry_base(source_dir: Path, target_dir: Path) -> None:
    """The pinned base goes where the overlay is linked to (a resume's work directory)."""
    base = source_dir / BASE
    if base.exists() and not (target_dir / BASE).exists():
        os.link(base, target_dir / BASE)


def hold(image: Image, holder: str) -> None:
    held = image.path / HELD_DIR
    held.mkdir(exist_ok=True)
    (held / holder).touch()


def release(image_path: Path, holder: str) -> None:
    (image_path / HELD_DIR / holder).unlink(missing_ok=True)


def backing_of(disk: Path) -> str | None:
    """The backing file named in a qcow2 overlay's header (None: none, or not qcow2)."""
    try:
        with open(disk, "rb") as handle:
            header = handle.read(32)
            if len(header) < 20 or header[:4] != b"QFI\xfb":
                return None
            offset = int.from_bytes(header[8:16], "big")
            size = int.from_bytes(header[16:20], "big")
            if not offset or not 0 < size <= 4096:
                return None
            handle.seek(offset)
            return handle.read(size).decode(errors="replace")
    except OSError:
        return None
