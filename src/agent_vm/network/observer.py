"""Count and log blocked connection attempts, with destination and port.

libvirt's nwfilter can drop but not log, so observation runs beside enforcement: an
nftables table in the bridge family logs the first packet of every new attempt from a
sandbox interface (TCP SYN, any UDP but DNS/DHCP to the gateway, ICMP, other IP
protocols, any IPv6) to the kernel log, rate-limited. A reader thread follows /dev/kmsg,
and each attempt is classified with :func:`agent_vm.network.policy.verdict` against the
sandbox's policy, the same model the filter was rendered from. Retransmissions of one
attempt (same 5-tuple) count once.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address

from agent_vm.logs import get_logger
from agent_vm.network.tools import run_tool

log = get_logger(__name__)

TABLE = "agentvm_observe"
PREFIX = "agentvm-new "
DEDUP_SECONDS = 30.0
MACPROTO_IPV6 = ":86:dd"


@dataclass(frozen=True)
class Attempt:
    tap: str
    protocol: str  # tcp, udp, icmp, ipv6, or another IP protocol name
    source: IPv4Address | None
    destination: IPv4Address | None
    source_port: int | None
    port: int | None


def ruleset(tap_prefix: str, gateway: IPv4Address) -> str:
    """The observation table (replaces any earlier version atomically)."""
    tap = f'iifname "{tap_prefix}*"'
    log_it = f'limit rate 200/second log prefix "{PREFIX}" level info'
    return f"""
table bridge {TABLE}
delete table bridge {TABLE}
table bridge {TABLE} {{
  chain prerouting {{
    type filter hook prerouting priority -300; policy accept;
    {tap} ether type ip ip protocol tcp tcp flags & (syn | ack) == syn {log_it}
    {tap} ether type ip ip protocol udp ip daddr != {gateway} {log_it}
    {tap} ether type ip ip protocol udp ip daddr {gateway} udp dport != {{ 53, 67 }} {log_it}
    {tap} ether type ip ip protocol != {{ tcp, udp }} {log_it}
    {tap} ether type ip6 {log_it}
  }}
}}
"""


def install(tap_prefix: str, gateway: IPv4Address) -> None:
    run_tool(["nft", "-f", "-"], stdin=ruleset(tap_prefix, gateway))


def parse(line: str) -> Attempt | None:
    if PREFIX not in line:
        return None
    tap = re.search(r"IN=(\S+)", line)
    if tap is None:
        return None
    if MACPROTO_IPV6 in line.split(" MAC=", 1)[-1].split(" ", 1)[0] or "SRC=" not in line:
        return Attempt(tap.group(1), "ipv6", None, None, None, None)
    fields = dict(re.findall(r"(\w+)=(\S+)", line))
    proto = fields.get("PROTO", "?").lower()
    return Attempt(
        tap=tap.group(1),
        protocol=proto,
        source=IPv4Address(fields["SRC"]) if "SRC" in fields else None,
        destination=IPv4Address(fields["DST"]) if "DST" in fields else None,
        source_port=int(fields["SPT"]) if "SPT" in fields else None,
        port=int(fields["DPT"]) if "DPT" in fields else None,
    )


class KernelLogFollower:
    """Reads new /dev/kmsg records in a daemon thread and hands attempts to a callback."""

    def __init__(self, callback: Callable[[Attempt], None]) -> None:
        self.callback = callback
        self._seen: dict[tuple[object, ...], float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        fd = os.open("/dev/kmsg", os.O_RDONLY)
        os.lseek(fd, 0, os.SEEK_END)  # only what happens from now on
        self._thread = threading.Thread(target=self._run, args=(fd,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self, fd: int) -> None:
        while not self._stop.is_set():
            try:
                record = os.read(fd, 8192).decode(errors="replace")
            except BrokenPipeError:
                continue  # records were overwritten before we read them
            except OSError:
                return
            attempt = parse(record.split(";", 1)[-1])
            if attempt is None or self._duplicate(attempt):
                continue
            try:
                self.callback(attempt)
            except Exception as exc:  # the follower must outlive one bad callback
                log.warning("observer_callback_failed", error=repr(exc))

    def _duplicate(self, attempt: Attempt) -> bool:
        now = time.monotonic()
        key = (
            attempt.tap,
            attempt.protocol,
            attempt.destination,
            attempt.source_port,
            attempt.port,
        )
        if now - self._seen.get(key, -DEDUP_SECONDS) < DEDUP_SECONDS:
            return True
        self._seen[key] = now
        if len(self._seen) > 10000:
            self._seen = {k: t for k, t in self._seen.items() if now - t < DEDUP_SECONDS}
        return False
