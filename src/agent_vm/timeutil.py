"""The single place where agent-vm makes timestamps.

The project's rule (from its seeds) is that every timestamp is timezone-aware and expressed
in America/New_York; going through these helpers keeps that true everywhere, including
daylight-saving transitions, instead of each module calling ``datetime.now()``.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from agent_vm.errors import ConfigError

ET = ZoneInfo("America/New_York")


def now() -> datetime:
    """Current time as an aware datetime in America/New_York."""
    return datetime.now(ET)


def from_timestamp(seconds: float) -> datetime:
    """POSIX timestamp (as libvirt reports creation times) to an aware ET datetime."""
    return datetime.fromtimestamp(seconds, ET)


def to_et(moment: datetime) -> datetime:
    """Convert an aware datetime to ET; naive datetimes are refused, not guessed."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ConfigError("naive datetime: agent-vm only accepts timezone-aware datetimes")
    return moment.astimezone(ET)


def isoformat(moment: datetime | None = None) -> str:
    """ISO 8601 with offset in ET, e.g. ``2026-11-23T10:15:00.123456-05:00``."""
    return to_et(moment if moment is not None else now()).isoformat()
