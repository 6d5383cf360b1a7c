"""The reaper shares the VM directory with every other agent-vm process: an entry that
another process removes while the reaper looks is skipped, never a crash (it was:
a `Sandbox()` starting beside a server tearing a VM down failed with FileNotFoundError)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from agent_vm.execution import reaper


def test_an_entry_removed_meanwhile_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vms = tmp_path / "vms"
    (vms / "agentvm-going").mkdir(parents=True)
    (vms / "agentvm-old").mkdir()
    old = time.time() - 3600
    os.utime(vms / "agentvm-old", (old, old))
    monkeypatch.setattr(reaper, "owned_domains", lambda connection: [])
    real_iterdir = Path.iterdir

    def iterdir(self: Path):  # type: ignore[no-untyped-def]
        for entry in real_iterdir(self):
            if entry.name == "agentvm-going":
                entry.rmdir()  # another process removes it between listing and stat
            yield entry

    monkeypatch.setattr(Path, "iterdir", iterdir)
    removed = reaper.reap(None, vms)  # type: ignore[arg-type]
    assert removed == ["agentvm-old"] and not (vms / "agentvm-old").exists()
