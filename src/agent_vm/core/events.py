"""libvirt's event loop (one daemon thread per process) and domain lifecycle events.

The loop must be registered before the first connection is opened; without it libvirt
delivers neither close callbacks (how we notice libvirtd going away) nor domain events.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import libvirt


class Reopening(Protocol):
    """A connection that calls back on every (re)open (``LibvirtConnection``)."""

    def on_open(self, callback: Callable[[libvirt.virConnect], None]) -> None: ...


_lock = threading.Lock()
_started = False


def _silence(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we raise them as exceptions instead."""


def ensure_event_loop() -> None:
    global _started
    with _lock:
        if _started:
            return
        libvirt.registerErrorHandler(_silence, None)
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _started = True


@dataclass(frozen=True)
class LifecycleEvent:
    """One domain lifecycle event with libvirt's VIR_DOMAIN_EVENT_* values."""

    uuid: str
    name: str
    event: int
    detail: int


LifecycleCallback = Callable[[LifecycleEvent], None]


class LifecycleEvents:
    """Domain lifecycle events (started, stopped, crashed, ...) delivered on asyncio loops.

    Callbacks run on the loop that was running at subscription, never on libvirt's event
    thread. One instance per connection (the runtime's): registrations are renewed on
    every reconnect, because they die with the connection that made them.
    """

    def __init__(self, connection: Reopening) -> None:
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, LifecycleCallback]] = []
        self._lock = threading.Lock()
        connection.on_open(self._register)

    def _register(self, conn: libvirt.virConnect) -> None:
        conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_event, None
        )

    def _on_event(
        self,
        _conn: libvirt.virConnect,
        domain: libvirt.virDomain,
        event: int,
        detail: int,
        _: object,
    ) -> None:
        delivered = LifecycleEvent(domain.UUIDString(), domain.name(), event, detail)
        with self._lock:
            subscribers = list(self._subscribers)
        for loop, callback in subscribers:
            if not loop.is_closed():
                loop.call_soon_threadsafe(callback, delivered)

    def subscribe(self, callback: LifecycleCallback) -> Callable[[], None]:
        """Deliver events to ``callback`` on the running loop; returns an unsubscribe."""
        entry = (asyncio.get_running_loop(), callback)
        with self._lock:
            self._subscribers.append(entry)

        def unsubscribe() -> None:
            with self._lock:
                if entry in self._subscribers:
                    self._subscribers.remove(entry)

        return unsubscribe
