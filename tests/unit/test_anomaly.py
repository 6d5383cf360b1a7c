"""The anomaly rules and z-scores on given figures (the real-guest run is in
tests/integration/test_monitoring.py)."""

from __future__ import annotations

from agent_vm.monitoring.anomaly import AnomalyDetector, Thresholds, Tick
from agent_vm.monitoring.metrics import DomainFigures, reason_class


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_of_blocked_attempts_alerts_once_per_interval() -> None:
    clock = Clock()
    detector = AnomalyDetector(Thresholds(blocked_burst=5, blocked_window=10,
                                          alert_interval=30), clock)  # fmt: skip
    assert detector.tick("sb", Tick(blocked_total=3)) == []
    clock.now = 5
    alerts = detector.tick("sb", Tick(blocked_total=6))
    assert [a.rule for a in alerts] == ["blocked_burst"] and alerts[0].value == 6
    clock.now = 6
    assert detector.tick("sb", Tick(blocked_total=12)) == []  # rate-limited
    clock.now = 40  # the old ones left the window; the new burst alerts again
    assert detector.tick("sb", Tick(blocked_total=12)) == []
    assert [a.rule for a in detector.tick("sb", Tick(blocked_total=20))] == ["blocked_burst"]


def test_slowly_blocked_attempts_never_add_up_to_a_burst() -> None:
    clock = Clock()
    detector = AnomalyDetector(Thresholds(blocked_burst=5, blocked_window=10), clock)
    for second in range(0, 100, 5):
        clock.now = second
        assert detector.tick("sb", Tick(blocked_total=second // 5)) == []


def test_z_scores_against_the_sandboxs_own_window() -> None:
    clock = Clock()
    detector = AnomalyDetector(Thresholds(zscore=4, min_samples=10), clock)
    for n in range(20):
        assert detector.execution("sb", 1.0 + (n % 3) * 0.1, 100) == []
    alerts = detector.execution("sb", 30.0, 100)
    assert [a.rule for a in alerts] == ["duration_zscore"]
    cpu = 0.0
    for _ in range(20):
        cpu += 0.01
        assert detector.tick("other", Tick(cpu_seconds=cpu)) == []
    cpu += 1.0  # a busy second after idling
    assert [a.rule for a in detector.tick("other", Tick(cpu_seconds=cpu))] == ["cpu_zscore"]


def test_flood_storm_and_disk_rules() -> None:
    detector = AnomalyDetector(Thresholds(output_bytes=1000, load1=10, disk_fraction=0.5))
    assert [a.rule for a in detector.execution("sb", 1, 5000)] == ["output_flood"]
    rules = {a.rule for a in detector.tick("sb", Tick(load1=50, disk_used=9, disk_cap=10))}
    assert rules == {"process_storm", "disk_filling"}
    detector.forget("sb")
    assert [a.rule for a in detector.execution("sb", 1, 5000)] == ["output_flood"]  # anew


def test_bulk_stats_are_summed_per_domain_and_reasons_bounded() -> None:
    figures = DomainFigures.from_stats({
        "state.state": 1, "cpu.time": 2_500_000_000, "balloon.rss": 1024,
        "balloon.current": 2048, "net.count": 2, "net.0.rx.bytes": 10, "net.1.rx.bytes": 5,
        "net.0.tx.bytes": 7, "block.count": 1, "block.0.rd.bytes": 3, "block.0.wr.bytes": 4,
        "block.0.allocation": 100, "block.0.capacity": 1000,
    })  # fmt: skip
    assert (figures.cpu_seconds, figures.rss_bytes, figures.memory_bytes) == (2.5, 1 << 20, 2 << 20)
    assert (figures.net_rx_bytes, figures.net_tx_bytes) == (15, 7)
    assert (figures.disk_allocation_bytes, figures.disk_capacity_bytes) == (100, 1000)
    assert reason_class("port 8080 not allowed") == "port N not allowed"
    assert reason_class("spoofed source address 10.1.2.3") == "spoofed source address N"
    assert reason_class("name not allowed") == "name not allowed"
    assert reason_class("") == "other"


def test_the_grafana_dashboard_reads_only_metrics_we_export() -> None:
    """Every series the shipped dashboard queries is one the collector exposes."""
    import json
    import re
    from pathlib import Path

    from prometheus_client.parser import text_string_to_metric_families

    from agent_vm.execution.shells import PoolStats
    from agent_vm.monitoring.metrics import GuestFigures, MetricsCollector, Sources, Target

    dashboard = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "agent-vm.json"
    exprs = [t["expr"] for p in json.loads(dashboard.read_text())["panels"] for t in p["targets"]]
    wanted = {name for e in exprs for name in re.findall(r"agentvm_[a-z0-9_]+", e)}

    class Domain:  # what getAllDomainStats hands back, for this pure test
        def name(self) -> str:
            return "agentvm-1"

    class Connection:
        def getAllDomainStats(self, stats: int, flags: int) -> list[tuple[Domain, dict[str, int]]]:
            return [(Domain(), {"cpu.time": 10**9, "net.count": 1, "net.0.rx.bytes": 5})]

    collector = MetricsCollector(Sources(
        connection=lambda: Connection(),
        targets=lambda: [Target("sb-1", "agentvm-1", "tok")],
        pools=lambda: {"pool": PoolStats(1, 0, 0, 0, 1, 0, [0.5])},
        guest={"agentvm-1": GuestFigures(0.5, 1000)},
    ))  # fmt: skip
    collector.observe_execution("ok", 0.2)
    collector.acquire_seconds.labels("pool").observe(0.01)
    collector.release_seconds.observe(0.1)
    collector.blocked.labels("tcp", "port N not allowed").inc()
    collector.alerts.labels("blocked_burst", "log").inc()
    collector.auth_failures.inc()
    exposed = {s.name for f in text_string_to_metric_families(collector.scrape().decode())
               for s in f.samples}  # fmt: skip
    assert wanted <= exposed, wanted - exposed
    assert ("agentvm_pool_start_seconds_count" in exposed) and len(wanted) >= 15
