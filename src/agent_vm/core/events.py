"""libvirt's default event loop, run once per process in a daemon thread.

It must be registered before the first connection is opened; without it libvirt can
deliver neither close callbacks (used to notice libvirtd going away) nor domain events.
"""

from __future__ import annotations

import threading

import libvirt

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
