"""structlog set-up: key/value events with ET timestamps from :mod:`agent_vm.timeutil`."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from agent_vm import secrets, timeutil

_configured = False


def _add_timestamp(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event["timestamp"] = timeutil.isoformat()
    return event


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """No secret value in a log line (guest output and errors can carry one)."""
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = secrets.redact(value)
        elif isinstance(value, list | tuple):
            event[key] = [secrets.redact(v) if isinstance(v, str) else v for v in value]
    return event


def _stderr_logger(*_args: Any) -> structlog.PrintLogger:
    """Whatever sys.stderr is when an event is logged (not when logging was configured:
    a test runner or a daemonising caller may replace it, and the old one be closed)."""
    return structlog.PrintLogger(file=sys.stderr)


def configure(level: str = "WARNING", *, json: bool = False) -> None:
    """Route structlog events to stderr; idempotent so libraries and CLI can both call it."""
    global _configured
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _add_timestamp,
            structlog.processors.format_exc_info,
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(name: str) -> Any:
    """A bound logger; configures a quiet default if nobody configured logging yet."""
    if not _configured:
        configure()
    return structlog.get_logger(name)
