"""Questions about host processes, answered from /proc in one place.

A zombie counts as dead everywhere: its work is over, only its exit status waits to be
collected, and QEMU is never reaped by us, so "the pid exists" would call a killed QEMU
alive until someone reaps it.
"""

from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")
DEAD_STATES = frozenset({"Z", "X", "x"})  # zombie, dead


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def process_state(pid: int) -> str | None:
    """The one-letter state (R, S, D, T, Z, ...) or None when there is no such process."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def is_alive(pid: int | None) -> bool:
    """True while the process exists and is not a zombie."""
    if pid is None or pid <= 0:
        return False
    state = process_state(pid)
    return state is not None and state not in DEAD_STATES


def process_start_time(pid: int) -> str:
    """Start time in clock ticks since boot ("" if gone): tells a pid from its reuse."""
    fields = _stat_fields(pid)
    return fields[19] if fields and len(fields) > 19 else ""


def same_process(pid: int, start_time: str) -> bool:
    """Is ``pid`` still the process that had ``start_time`` (and not a zombie)?"""
    return is_alive(pid) and process_start_time(pid) == start_time
