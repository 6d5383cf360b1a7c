"""Test hosts in network namespaces: the only destinations network tests talk to.

A ``TestHost`` is a namespace joined to the host by a veth pair (host side ``HOST_SIDE``
address, namespace side two addresses) and running ``testhost_server.py``. Sandbox
traffic reaches it the way it would reach the internet: out of the project's NAT
network, routed by the host. Nothing here sends a packet anywhere else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from ipaddress import IPv4Interface
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


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
    _server: subprocess.Popen[str] | None = None
    _dhcp: subprocess.Popen[bytes] | None = None

    @property
    def ip(self) -> str:
        return str(self.addresses[0].ip)

    @property
    def veth(self) -> str:
        return f"{self.name}h"

    def start(self) -> None:
        self.stop()  # a namespace of a crashed earlier run
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
            self._server = subprocess.Popen(
                [
                    "ip", "netns", "exec", self.name, sys.executable,
                    str(REPO / "tests" / "integration" / "testhost_server.py"),
                    json.dumps(self.zone),
                ],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env={**os.environ, "PYTHONPATH": str(REPO / "src")},
            )  # fmt: skip
            assert self._server.stdout is not None
            line = self._server.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"test host {self.name} did not start (said {line!r})")
            if self.dhcp_range is not None:
                self._dhcp = subprocess.Popen(
                    [
                        "ip", "netns", "exec", self.name, "dnsmasq", "--keep-in-foreground",
                        "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--port=0",
                        "--bind-interfaces", f"--interface={inner}", "--pid-file=",
                        f"--dhcp-range={self.dhcp_range[0]},{self.dhcp_range[1]},12h",
                        f"--dhcp-option=option:router,{self.host_side.ip}",
                        f"--dhcp-leasefile=/run/{self.name}.leases",
                    ],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                )  # fmt: skip
        except BaseException:
            self.stop()
            raise

    def exec(self, *argv: str) -> str:
        return run("ip", "netns", "exec", self.name, *argv)

    def stop(self) -> None:
        if self._dhcp is not None:
            self._dhcp.kill()
            self._dhcp.wait()
            self._dhcp = None
            Path(f"/run/{self.name}.leases").unlink(missing_ok=True)
        if self._server is not None:
            self._server.kill()
            self._server.wait()
            self._server = None
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True, check=False)
