"""Prometheus metrics: what the server (``/metrics``) and ``agent-vm metrics`` export.

Events the server sees are counted as they happen (executions by outcome and duration,
acquire and release latency, blocked attempts, alerts, refused tokens). What the VMs do
is read at scrape time: libvirt's bulk stats for every sandbox in **one** call
(``getAllDomainStats``), the pools' sizes, and the guest's own figures (load, memory
available) from the last PING the server's monitor made. Labels stay bounded: per
sandbox (series gone with the sandbox, as the scrape only reports live ones), pool,
outcome, kind; never a command or a destination.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import libvirt
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agent_vm.execution.shells import PoolStats

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
BULK_STATS = (
    libvirt.VIR_DOMAIN_STATS_STATE
    | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
    | libvirt.VIR_DOMAIN_STATS_BALLOON
    | libvirt.VIR_DOMAIN_STATS_INTERFACE
    | libvirt.VIR_DOMAIN_STATS_BLOCK
)


@dataclass(frozen=True)
class Target:
    """A sandbox to report: its id (the label), its domain, and who owns it."""

    sandbox: str
    vm: str
    owner: str = ""


@dataclass
class GuestFigures:
    load1: float
    mem_available_kib: int


@dataclass
class DomainFigures:
    """One domain's bulk stats, summed over its NICs and disks."""

    state: int = 0
    cpu_seconds: float = 0.0
    rss_bytes: int = 0
    memory_bytes: int = 0
    net_rx_bytes: int = 0
    net_tx_bytes: int = 0
    block_rd_bytes: int = 0
    block_wr_bytes: int = 0
    disk_allocation_bytes: int = 0
    disk_capacity_bytes: int = 0

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any]) -> DomainFigures:
        def total(prefix: str, count: str, item: str) -> int:
            return sum(
                int(stats.get(f"{prefix}.{i}.{item}", 0)) for i in range(int(stats.get(count, 0)))
            )

        return cls(
            state=int(stats.get("state.state", 0)),
            cpu_seconds=int(stats.get("cpu.time", 0)) / 1e9,
            rss_bytes=int(stats.get("balloon.rss", 0)) * 1024,
            memory_bytes=int(stats.get("balloon.current", 0)) * 1024,
            net_rx_bytes=total("net", "net.count", "rx.bytes"),
            net_tx_bytes=total("net", "net.count", "tx.bytes"),
            block_rd_bytes=total("block", "block.count", "rd.bytes"),
            block_wr_bytes=total("block", "block.count", "wr.bytes"),
            disk_allocation_bytes=total("block", "block.count", "allocation"),
            disk_capacity_bytes=total("block", "block.count", "capacity"),
        )


def bulk_stats(connection: libvirt.virConnect, names: set[str]) -> dict[str, DomainFigures]:
    """Figures of the running domains among ``names``, from one libvirt call."""
    if not names:
        return {}
    flags = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
    return {
        domain.name(): DomainFigures.from_stats(stats)
        for domain, stats in connection.getAllDomainStats(BULK_STATS, flags)
        if domain.name() in names
    }


def reason_class(reason: str) -> str:
    """A blocked attempt's reason with its addresses and ports as ``N`` (the reasons come
    from a fixed set of templates, so the labels stay bounded)."""
    words = ["N" if any(c.isdigit() for c in word) else word for word in reason.split()]
    return " ".join(words)[:48] or "other"


@dataclass
class Sources:
    """Where the scrape-time figures come from (set by whoever runs the collector)."""

    connection: Callable[[], libvirt.virConnect] | None = None
    targets: Callable[[], list[Target]] = lambda: []
    pools: Callable[[], Mapping[str, PoolStats]] = lambda: {}
    blocked: Callable[[str], int] = lambda vm: 0
    guest: Mapping[str, GuestFigures] = field(default_factory=dict)
    # paused sandboxes and snapshots: counts and the disk they hold (keys: paused,
    # paused_bytes, snapshots, snapshot_bytes)
    held: Callable[[], Mapping[str, int]] = lambda: {}


class MetricsCollector:
    """The process's metrics on a registry of its own (tests and a server never mix)."""

    def __init__(self, sources: Sources | None = None) -> None:
        self.sources = sources or Sources()
        self.registry = CollectorRegistry()
        r = self.registry
        self._pool_seen: dict[str, int] = {}
        r.register(_PoolStarts(self))  # first: it feeds the start histogram before it is read
        self.executions = Counter("agentvm_executions", "Executions by outcome.",
                                  ["outcome"], registry=r)  # fmt: skip
        self.execution_seconds = Histogram("agentvm_execution_seconds",
                                           "Execution wall time.", buckets=DURATION_BUCKETS,
                                           registry=r)  # fmt: skip
        self.acquire_seconds = Histogram("agentvm_sandbox_acquire_seconds",
                                         "Time to hand out a sandbox.", ["source"],
                                         buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.release_seconds = Histogram("agentvm_sandbox_release_seconds",
                                         "Time to give a sandbox back (reset or destroy).",
                                         buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.start_seconds = Histogram("agentvm_pool_start_seconds",
                                       "Time for a pool to make a ready VM.", ["pool"],
                                       buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.blocked = Counter("agentvm_blocked_connections", "Blocked attempts.",
                               ["kind", "reason"], registry=r)  # fmt: skip
        self.egress = Counter("agentvm_egress_requests",
                              "Web requests and connections through the egress proxy.",
                              ["decision"], registry=r)  # fmt: skip
        self.alerts = Counter("agentvm_anomaly_alerts", "Anomaly alerts and the action taken.",
                              ["rule", "action"], registry=r)  # fmt: skip
        self.auth_failures = Counter("agentvm_api_auth_failures",
                                     "Requests refused for want of a valid token.",
                                     registry=r)  # fmt: skip
        r.register(_Live(self))

    def observe_execution(self, outcome: str, seconds: float) -> None:
        self.executions.labels(outcome).inc()
        self.execution_seconds.observe(seconds)

    def scrape(self) -> bytes:
        """The text exposition (blocking: reads libvirt; run it in a thread)."""
        return bytes(generate_latest(self.registry))

    def _pool_starts(self, name: str, stats: PoolStats) -> None:
        """New pool starts since the last scrape, into the start histogram."""
        seen = self._pool_seen.get(name, 0)
        fresh = min(stats.started - seen, len(stats.start_seconds))
        for seconds in stats.start_seconds[len(stats.start_seconds) - fresh :] if fresh > 0 else []:
            self.start_seconds.labels(name).observe(seconds)
        self._pool_seen[name] = stats.started


class _PoolStarts(Collector):
    def __init__(self, owner: MetricsCollector) -> None:
        self.owner = owner

    def collect(self) -> Iterator[Any]:
        for name, stats in self.owner.sources.pools().items():
            self.owner._pool_starts(name, stats)
        return iter(())


class _Live(Collector):
    def __init__(self, owner: MetricsCollector) -> None:
        self.owner = owner

    def collect(self) -> Iterator[Any]:
        sources = self.owner.sources
        pool = GaugeMetricFamily("agentvm_pool_vms", "VMs of each pool by state.",
                                 labels=["pool", "state"])  # fmt: skip
        for name, stats in sources.pools().items():
            for state in ("idle", "in_use", "starting", "standby"):
                pool.add_metric([name, state], getattr(stats, state))
        yield pool
        held = sources.held()
        for item, metric, text in (
            ("paused", "agentvm_sandboxes_paused", "Sandboxes paused to disk."),
            ("paused_bytes", "agentvm_paused_disk_bytes", "Disk held by paused sandboxes."),
            ("snapshots", "agentvm_snapshots", "Snapshots (fork's included)."),
            ("snapshot_bytes", "agentvm_snapshot_disk_bytes", "Disk held by snapshots."),
        ):
            if item in held:
                yield GaugeMetricFamily(metric, text, value=held[item])
        targets = sources.targets()
        figures: dict[str, DomainFigures] = {}
        if sources.connection is not None and targets:
            figures = bulk_stats(sources.connection(), {t.vm for t in targets})
        labels = ["sandbox", "vm", "owner"]
        cpu = CounterMetricFamily("agentvm_sandbox_cpu_seconds", "QEMU CPU time.", labels=labels)
        rss = GaugeMetricFamily("agentvm_sandbox_memory_rss_bytes", "QEMU resident memory.",
                                labels=labels)  # fmt: skip
        guest_mem = GaugeMetricFamily("agentvm_sandbox_memory_bytes", "Guest RAM.", labels=labels)
        net = CounterMetricFamily("agentvm_sandbox_network_bytes", "NIC bytes (guest's view).",
                                  labels=[*labels, "direction"])  # fmt: skip
        block = CounterMetricFamily("agentvm_sandbox_block_bytes", "Disk bytes.",
                                    labels=[*labels, "direction"])  # fmt: skip
        disk = GaugeMetricFamily("agentvm_sandbox_disk_allocation_bytes",
                                 "Disk space the overlay takes.", labels=labels)  # fmt: skip
        blocked = CounterMetricFamily("agentvm_sandbox_blocked", "Blocked attempts.",
                                      labels=labels)  # fmt: skip
        load = GaugeMetricFamily("agentvm_sandbox_guest_load1", "Guest load (PING).",
                                 labels=labels)  # fmt: skip
        avail = GaugeMetricFamily("agentvm_sandbox_guest_memory_available_bytes",
                                  "Guest MemAvailable (PING).", labels=labels)  # fmt: skip
        for target in targets:
            key = [target.sandbox, target.vm, target.owner]
            found = figures.get(target.vm)
            if found is not None:
                cpu.add_metric(key, found.cpu_seconds)
                rss.add_metric(key, found.rss_bytes)
                guest_mem.add_metric(key, found.memory_bytes)
                net.add_metric([*key, "rx"], found.net_rx_bytes)
                net.add_metric([*key, "tx"], found.net_tx_bytes)
                block.add_metric([*key, "read"], found.block_rd_bytes)
                block.add_metric([*key, "write"], found.block_wr_bytes)
                disk.add_metric(key, found.disk_allocation_bytes)
            blocked.add_metric(key, sources.blocked(target.vm))
            guest = sources.guest.get(target.vm)
            if guest is not None:
                load.add_metric(key, guest.load1)
                avail.add_metric(key, guest.mem_available_kib * 1024)
        yield from (cpu, rss, guest_mem, net, block, disk, blocked, load, avail)
