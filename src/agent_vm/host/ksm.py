"""Kernel same-page merging (KSM): idle VMs' identical pages merged copy-on-write.

Off unless the operator asks (``AGENT_VM_KSM=1``): merging pages that VMs wrote at run
time lets one sandbox learn by timing whether another holds a page of known content (a
side channel beyond the golden state's shared, never-written pages; docs/security.md).
QEMU marks guest RAM mergeable itself; this only starts the kernel's scanner.
"""

from __future__ import annotations

from pathlib import Path

KSM = Path("/sys/kernel/mm/ksm")
PAGES_TO_SCAN = 2000  # per wake-up: a full pass over a few hundred idle VMs in minutes
SLEEP_MILLISECS = 50


def available(root: Path = KSM) -> bool:
    return (root / "run").exists()


def running(root: Path = KSM) -> bool:
    try:
        return (root / "run").read_text().strip() == "1"
    except OSError:
        return False


def enable(root: Path = KSM) -> None:
    """Start the scanner (no-op where the kernel has no KSM)."""
    if not available(root):
        return
    (root / "pages_to_scan").write_text(str(PAGES_TO_SCAN))
    (root / "sleep_millisecs").write_text(str(SLEEP_MILLISECS))
    (root / "run").write_text("1")


def disable(root: Path = KSM) -> None:
    """Stop it and split what it merged (``run`` = 2), then leave it off."""
    if available(root):
        (root / "run").write_text("2")
        (root / "run").write_text("0")


def shared_mib(root: Path = KSM) -> float:
    """Memory KSM saves now (pages_sharing: the duplicates it removed)."""
    try:
        return int((root / "pages_sharing").read_text()) * 4096 / 2**20
    except (OSError, ValueError):
        return 0.0
