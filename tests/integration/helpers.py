"""Small helpers shared by integration tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from agent_vm.config import Settings
from agent_vm.core.connection import LibvirtConnection
from agent_vm.execution.reaper import owned_domains


def vm_dirs(settings: Settings) -> set[Path]:
    """Work directories now (the directory itself appears with the first VM)."""
    return set(settings.vms_dir.iterdir()) if settings.vms_dir.is_dir() else set()


async def eventually(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def domains_of(connection: LibvirtConnection, pid: int) -> set[str]:
    """Names of the agent-vm domains a process made."""
    return {d.vm.name for d in owned_domains(connection) if d.metadata.get("pid") == str(pid)}
