"""Timestamps are aware and in America/New_York, across DST."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from agent_vm import timeutil


def test_now_is_aware_eastern() -> None:
    moment = timeutil.now()
    offset = moment.utcoffset()
    assert moment.tzinfo is not None and offset is not None
    assert offset.total_seconds() in (-5 * 3600, -4 * 3600)


def test_dst_offsets() -> None:
    winter = timeutil.to_et(datetime(2026, 1, 15, 12, tzinfo=UTC))
    summer = timeutil.to_et(datetime(2026, 7, 15, 12, tzinfo=UTC))
    assert winter.isoformat().endswith("-05:00") and summer.isoformat().endswith("-04:00")


def test_from_timestamp() -> None:
    assert timeutil.from_timestamp(0).isoformat() == "1969-12-31T19:00:00-05:00"


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError):
        timeutil.to_et(datetime(2026, 1, 1))


def test_isoformat_has_offset() -> None:
    assert timeutil.isoformat()[-6] in "+-"
