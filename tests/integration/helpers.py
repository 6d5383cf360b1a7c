"""Small helpers shared by integration tests."""

from __future__ import annotations

from pathlib import Path

from agent_vm.config import Settings


def vm_dirs(settings: Settings) -> set[Path]:
    """Work directories now (the directory itself appears with the first VM)."""
    return set(settings.vms_dir.iterdir()) if settings.vms_dir.is_dir() else set()
