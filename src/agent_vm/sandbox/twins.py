"""What the generated blocking API (``_sync*.py``) stands on: one background event loop
for every blocking sandbox, and the map between async objects and their sync twins
(an async object a call returns comes back as its twin; a twin passed in goes to the
async core as the object it wraps)."""

from __future__ import annotations

from typing import Any

from agent_vm.communication.sync import BackgroundLoop

_loop: BackgroundLoop | None = None
_twins: dict[str, Any] = {}  # async class name -> sync class


def shared_loop() -> BackgroundLoop:
    """The event loop sync sandboxes run on (create pools for them on it too)."""
    global _loop
    if _loop is None:
        _loop = BackgroundLoop("agent-vm-sandbox")
    return _loop


def register(async_name: str, twin: Any) -> None:
    _twins[async_name] = twin


def core_of(value: Any) -> Any:
    """The async twin of a sync object passed in (anything else as it is)."""
    return getattr(value, "_core", value)


def wrap(value: Any) -> Any:
    """A returned async object as its sync twin (a list of them as a list of twins;
    anything else as it is)."""
    if isinstance(value, list):
        return [wrap(item) for item in value]
    twin = _twins.get(type(value).__name__)
    return twin._from_core(value) if twin is not None else value
