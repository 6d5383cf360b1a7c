"""A thread-safe libvirt connection that reopens itself when libvirtd goes away.

Objects handed out by an old connection (``virDomain``) die with it; :attr:`generation`
increases on every reopen so holders (``VM``) know to look their domain up again.
"""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from types import TracebackType

import libvirt

from agent_vm.core.events import ensure_event_loop
from agent_vm.errors import LibvirtUnavailableError
from agent_vm.logs import get_logger

log = get_logger(__name__)

DEFAULT_URI = "qemu:///system"


class LibvirtConnection:
    """Context-managed libvirt connection.

    >>> with LibvirtConnection() as conn:
    ...     conn.connection.getLibVersion()
    """

    def __init__(self, uri: str = DEFAULT_URI) -> None:
        self.uri = uri
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.RLock()
        self._generation = 0
        self._alive = False
        self._on_open: list[Callable[[libvirt.virConnect], None]] = []

    # -- lifecycle --

    def open(self) -> None:
        with self._lock:
            if self._conn is not None and self._alive:
                return
            ensure_event_loop()
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise LibvirtUnavailableError(
                    f"cannot connect to libvirt at {self.uri}: {exc.get_error_message()}",
                    hint="is libvirtd running? `./agent-vm doctor` checks and starts it",
                ) from exc
            conn.registerCloseCallback(self._on_close, None)
            self._conn = conn
            self._alive = True
            self._generation += 1
            log.debug("libvirt_connected", uri=self.uri, generation=self._generation)
            for hook in list(self._on_open):
                hook(conn)

    def on_open(self, hook: Callable[[libvirt.virConnect], None]) -> None:
        """Call ``hook`` with every new connection (now, if open, and after each reconnect):
        event registrations die with the connection that made them."""
        with self._lock:
            self._on_open.append(hook)
            if self._conn is not None and self._alive:
                hook(self._conn)

    def close(self) -> None:
        with self._lock:
            conn, self._conn, self._alive = self._conn, None, False
        if conn is not None:
            try:
                conn.unregisterCloseCallback()
                conn.close()
            except libvirt.libvirtError:
                pass

    def _on_close(self, _conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
        log.warning("libvirt_connection_closed", uri=self.uri, reason=reason)
        self._alive = False

    def __enter__(self) -> LibvirtConnection:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- access --

    def is_connected(self) -> bool:
        with self._lock:
            if self._conn is None or not self._alive:
                return False
            try:
                return bool(self._conn.isAlive())
            except libvirt.libvirtError:
                return False

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def connection(self) -> libvirt.virConnect:
        """The live ``virConnect``, reopened first if libvirtd dropped the old one."""
        with self._lock:
            if self._conn is None or not self._alive or not self._conn.isAlive():
                if self._conn is not None:
                    log.info("libvirt_reconnecting", uri=self.uri)
                    self._alive = False
                    self._conn = None
                self.open()
            assert self._conn is not None
            return self._conn

    def qemu_user(self) -> tuple[int, int]:
        """uid and gid QEMU runs as (libvirt's DAC base label, e.g. libvirt-qemu)."""
        root = ET.fromstring(self.connection.getCapabilities())
        for model in root.findall("host/secmodel"):
            if model.findtext("model") == "dac":
                for label in model.findall("baselabel"):
                    user, _, group = (label.text or "").partition(":")
                    if user.startswith("+") and group.startswith("+"):
                        return int(user[1:]), int(group[1:])
        return 0, 0  # no DAC driver: QEMU runs as root

    def versions(self) -> tuple[str, str]:
        """(libvirt version, hypervisor version) as dotted strings."""
        conn = self.connection

        def dotted(number: int) -> str:
            return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"

        return dotted(conn.getLibVersion()), dotted(conn.getVersion())
