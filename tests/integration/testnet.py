"""Test hosts in network namespaces: the only destinations network tests talk to.

A ``TestHost`` is a namespace joined to the host by a veth pair (host side ``HOST_SIDE``
address, namespace side two addresses) and running ``testhost_server.py``. Sandbox
traffic reaches it the way it would reach the internet: out of the project's NAT
network, routed by the host. Nothing here sends a packet anywhere else.

Two pytest sessions on one host: a ``shared`` test host (the session's main one) is used
by both and removed by the last one to leave (a shared ``flock`` per session; its server
outlives the session that started it); any other test network is held exclusively
(``exclusive``): a second session waits for it rather than tearing it down under the
first. State lives in ``/run/agent-vm-tests``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Interface
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[2]
STATE = Path("/run/agent-vm-tests")
WAIT = 45 * 60.0  # another session's hold on a test network (a whole module at most)


def _lock_file(name: str) -> IO[str]:
    STATE.mkdir(parents=True, exist_ok=True)
    return (STATE / f"{name}.lock").open("a+")


def _take(handle: IO[str], kind: int, what: str) -> None:
    """``flock`` within WAIT, saying once that another session holds it."""
    deadline = time.monotonic() + WAIT
    said = False
    while True:
        try:
            fcntl.flock(handle, kind | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} stayed held by another test session") from None
            if not said:
                print(f"\nwaiting for another test session to release {what}", flush=True)
                said = True
            time.sleep(1)


# a shared test host another session started is used only if it runs this very code
SERVER_VERSION = hashlib.sha256(
    (REPO / "tests" / "integration" / "testhost_server.py").read_bytes()
).hexdigest()[:12]
TLS = STATE / "tls"  # the test CA and the test hosts' certificate (made once per boot)
TEST_CA = TLS / "ca.pem"
TLS_NAMES = ("*.allowed.test", "allowed.test", "evil.test", "*.evil.test")


def tls_files(addresses: tuple[str, ...] = ("198.51.100.10", "198.51.100.11")) -> tuple[Path, Path]:
    """The test hosts' certificate and key, signed by ``TEST_CA`` (which the egress proxy
    is told to trust upstream; sandboxes never see it)."""
    cert, key = TLS / "host.pem", TLS / "host.key"
    handle = _lock_file("tls")
    try:
        _take(handle, fcntl.LOCK_EX, "the test CA")
        if cert.exists() and key.exists() and TEST_CA.exists():
            return cert, key
        TLS.mkdir(parents=True, exist_ok=True)
        ca_key = TLS / "ca.key"
        run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
            "-keyout", str(ca_key), "-out", str(TEST_CA), "-subj", "/CN=agent-vm test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign")  # fmt: skip
        sans = ",".join([*(f"DNS:{n}" for n in TLS_NAMES), *(f"IP:{a}" for a in addresses)])
        run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=allowed.test",
            "-CA", str(TEST_CA), "-CAkey", str(ca_key),
            "-addext", f"subjectAltName={sans}", "-addext", "extendedKeyUsage=serverAuth",
            "-addext", "basicConstraints=CA:FALSE")  # fmt: skip
        return cert, key
    finally:
        handle.close()


@contextlib.contextmanager
def exclusive(name: str) -> Iterator[None]:
    """Hold a test resource (a network, the scripted model API) alone for a while."""
    handle = _lock_file(name)
    try:
        _take(handle, fcntl.LOCK_EX, name)
        yield
    finally:
        handle.close()


def unused_by_the_host(prefix: str) -> None:
    """Refuse (before any packet) to stand a test host in for a range the host routes:
    traffic meant for it would go to the host's own network."""
    routes = run("ip", "-j", "-4", "route", "show", "table", "all")
    if any(route.get("dst", "").startswith(prefix) for route in json.loads(routes or "[]")):
        raise RuntimeError(f"{prefix} is in use on this host: a test host cannot stand in for it")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class TestHost:
    """A namespace with addresses ``addresses`` (first is the main one) and services."""

    __test__ = False  # not a pytest test class

    name: str
    host_side: IPv4Interface  # the host's end of the veth pair
    addresses: tuple[IPv4Interface, ...]
    zone: dict[str, str] = field(default_factory=dict)  # DNS names it serves
    bridge: str | None = None  # attach the veth to this bridge instead of addressing it
    dhcp_range: tuple[str, str] | None = None  # serve DHCP (dnsmasq) for this range
    shared: bool = False  # used by every test session at once (else held by one)
    _lock: IO[str] | None = None

    @property
    def ip(self) -> str:
        return str(self.addresses[0].ip)

    @property
    def veth(self) -> str:
        return f"{self.name}h"

    def _pids(self) -> Path:
        return STATE / f"{self.name}.json"

    def _spec(self) -> str:
        return json.dumps([self.host_side.with_prefixlen, [a.with_prefixlen for a in
                           self.addresses], self.zone, self.bridge, self.dhcp_range,
                           SERVER_VERSION])  # fmt: skip

    def _running(self) -> bool:
        """Is a healthy host of this very spec up (another session's)?"""
        try:
            record = json.loads(self._pids().read_text())
        except (OSError, ValueError):
            return False
        pids = [pid for pid in record.get("pids", []) if isinstance(pid, int)]
        return record.get("spec") == self._spec() and bool(pids) and all(map(_alive, pids))

    def start(self) -> None:
        """Make it (or, shared, use the one another session made): a short setup lock
        while it is checked or made, then the use lock (shared, or held alone)."""
        setup = _lock_file(f"{self.name}.setup")
        try:
            _take(setup, fcntl.LOCK_EX, f"test host {self.name}")
            self._lock = _lock_file(self.name)
            _take(self._lock, fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX, self.name)
            if not (self.shared and self._running()):
                self._teardown()  # a namespace of a crashed earlier run
                self._create()
        except BaseException:
            self._release()
            raise
        finally:
            setup.close()

    def _create(self) -> None:
        run("ip", "netns", "add", self.name)
        try:
            inner = f"{self.name}n"
            run("ip", "link", "add", self.veth, "type", "veth", "peer", "name", inner)
            run("ip", "link", "set", inner, "netns", self.name)
            if self.bridge is None:
                run("ip", "addr", "add", str(self.host_side), "dev", self.veth)
            else:
                run("ip", "link", "set", self.veth, "master", self.bridge)
            run("ip", "link", "set", self.veth, "up")
            for address in self.addresses:
                self.exec("ip", "addr", "add", str(address), "dev", inner)
            self.exec("ip", "link", "set", inner, "up")
            self.exec("ip", "link", "set", "lo", "up")
            self.exec("ip", "route", "add", "default", "via", str(self.host_side.ip))
            server = subprocess.Popen(
                [
                    "ip", "netns", "exec", self.name, sys.executable,
                    str(REPO / "tests" / "integration" / "testhost_server.py"),
                    json.dumps(self.zone), "--detached", "--tls", *map(str, tls_files()),
                ],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                env={**os.environ, "PYTHONPATH": str(REPO / "src")}, start_new_session=True,
            )  # fmt: skip
            pids = [server.pid]
            self._pids().write_text(json.dumps({"spec": self._spec(), "pids": pids}))
            assert server.stdout is not None
            line = server.stdout.readline().strip()
            server.stdout.close()
            if line != "ready":
                raise RuntimeError(f"test host {self.name} did not start (said {line!r})")
            if self.dhcp_range is not None:
                dhcp = subprocess.Popen(
                    [
                        "ip", "netns", "exec", self.name, "dnsmasq", "--keep-in-foreground",
                        "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--port=0",
                        "--bind-interfaces", f"--interface={inner}", "--pid-file=",
                        f"--dhcp-range={self.dhcp_range[0]},{self.dhcp_range[1]},12h",
                        f"--dhcp-option=option:router,{self.host_side.ip}",
                        f"--dhcp-leasefile=/run/{self.name}.leases",
                    ],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
                pids.append(dhcp.pid)
                self._pids().write_text(json.dumps({"spec": self._spec(), "pids": pids}))
        except BaseException:
            self._teardown()
            raise

    def exec(self, *argv: str) -> str:
        return run("ip", "netns", "exec", self.name, *argv)

    def stop(self) -> None:
        """Leave: a shared host is removed by the last session using it; a held one now."""
        if self._lock is None:
            return
        setup = _lock_file(f"{self.name}.setup")
        try:
            _take(setup, fcntl.LOCK_EX, f"test host {self.name}")
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # another session still uses it
            else:
                self._teardown()
        finally:
            self._release()
            setup.close()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _teardown(self) -> None:
        try:
            record = json.loads(self._pids().read_text())
        except (OSError, ValueError):
            record = {}
        for pid in record.get("pids", []):
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)  # the netns exec and what it started
        self._pids().unlink(missing_ok=True)
        Path(f"/run/{self.name}.leases").unlink(missing_ok=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True, check=False)
