"""The watch's judgement, with the kernel tables replaced by snapshots (pure logic).

A 150-cycle pool soak once logged ``egress_rules_vanished`` for a live VM whose rules
were there: its attach finished while the watch was reading the tables, and the watch
judged it by the older snapshot. These tests pin the rule that only VMs settled before a
read are judged by it, and that a finding is confirmed before it is reported.
"""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent_vm.network import l2filter, l3filter
from agent_vm.network.reconcile import Reconciler


@dataclass
class FakeVMNetwork:
    vm_name: str
    tap: str
    ipset: str = "set"
    cidr_set: str = "cidrs"
    rules: list[str] = field(default_factory=list)

    def l3_rules(self) -> list[str]:
        return [self.tap]

    def l2_rules(self) -> list[str]:
        return [self.tap]


class Kernel:
    """Which taps have their rules in the (fake) kernel; a read returns a snapshot."""

    def __init__(self) -> None:
        self.taps: set[str] = set()
        self.during_read: list[Any] = []

    def read(self) -> frozenset[str]:
        snapshot = frozenset(self.taps)
        for action in self.during_read:
            action()
        self.during_read.clear()
        return snapshot


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Kernel:
    k = Kernel()
    monkeypatch.setattr(l3filter, "read_tables", k.read)
    monkeypatch.setattr(l2filter, "read_table", lambda: frozenset(k.taps))
    missing = lambda snapshot, rules: [f"{rules[0]} missing"] if rules[0] not in snapshot else []  # noqa: E731
    monkeypatch.setattr(l3filter, "vm_problems", missing)
    monkeypatch.setattr(l2filter, "vm_problems", missing)
    monkeypatch.setattr(Reconciler, "_shared_problems", lambda self, *a: [])
    monkeypatch.setattr(
        Reconciler,
        "problems",
        lambda self, vm: [] if vm.tap in k.taps else [f"{vm.tap} missing"],
    )
    return k


def reconciler(vms: dict[str, Any]) -> tuple[Reconciler, list[str]]:
    repaired: list[str] = []
    r = Reconciler(None, None, None, vms, lambda **_: None, lambda: None)  # type: ignore[arg-type]

    async def fake_reconcile(vm_name: str) -> list[str]:
        repaired.append(vm_name)
        return ["rewritten"]

    r.reconcile = fake_reconcile  # type: ignore[method-assign]
    return r, repaired


def vanished(events: list[MutableMapping[str, Any]]) -> list[str]:
    return [e["vm"] for e in events if e["event"] == "egress_rules_vanished"]


def test_a_vm_attached_during_the_read_is_not_judged_by_it(kernel: Kernel) -> None:
    vms: dict[str, Any] = {"a": FakeVMNetwork("a", "tap-a")}
    kernel.taps.add("tap-a")
    r, repaired = reconciler(vms)
    late = FakeVMNetwork("b", "tap-b")
    r.hold(late.tap)
    vms["b"] = late

    def attach_finishes() -> None:  # its rules land after the snapshot was taken
        kernel.taps.add("tap-b")
        r.release("tap-b")

    kernel.during_read.append(attach_finishes)
    with capture_logs() as events:
        asyncio.run(r.check_firewall())
    assert vanished(events) == [] and repaired == []


def test_rules_really_gone_are_reported_and_repaired(kernel: Kernel) -> None:
    vms: dict[str, Any] = {"a": FakeVMNetwork("a", "tap-a"), "b": FakeVMNetwork("b", "tap-b")}
    kernel.taps.add("tap-a")  # b's rules were flushed
    r, repaired = reconciler(vms)
    with capture_logs() as events:
        asyncio.run(r.check_firewall())
    assert vanished(events) == ["b"] and repaired == ["b"]


def test_a_finding_not_confirmed_by_a_fresh_read_is_not_reported(kernel: Kernel) -> None:
    vms: dict[str, Any] = {"a": FakeVMNetwork("a", "tap-a")}
    r, repaired = reconciler(vms)
    kernel.during_read.append(lambda: kernel.taps.add("tap-a"))  # rewritten meanwhile
    with capture_logs() as events:
        asyncio.run(r.check_firewall())
    assert vanished(events) == [] and repaired == []


def test_a_vm_whose_teardown_began_during_the_read_is_left_alone(kernel: Kernel) -> None:
    vms: dict[str, Any] = {"a": FakeVMNetwork("a", "tap-a")}
    r, repaired = reconciler(vms)  # a's rules are not in the snapshot: its teardown ...
    kernel.during_read.append(lambda: r.hold("tap-a"))  # ... had begun, as the guard says
    with capture_logs() as events:
        asyncio.run(r.check_firewall())
    assert vanished(events) == [] and repaired == []


@pytest.mark.parametrize(("failing_writes", "stopped"), [(0, False), (2, False), (4, True)])
def test_a_rewrite_failing_because_the_table_went_meanwhile_is_retried(
    kernel: Kernel, monkeypatch: pytest.MonkeyPatch, failing_writes: int, stopped: bool
) -> None:
    """A CI run once flushed the shared table between its repair and the VM's rewrite; the
    reconciler stopped the VM at the first failed write. It now writes again (3 times)."""
    from agent_vm.errors import AgentVMError
    from agent_vm.network import reconcile

    vm = FakeVMNetwork("a", "tap-a")
    writes = {"left_failing": failing_writes}

    def write_rules(vm_network: Any) -> None:
        if writes["left_failing"]:
            writes["left_failing"] -= 1
            raise AgentVMError("nft -f - failed: No such file or directory")
        kernel.taps.add(vm_network.tap)

    stops: list[str] = []

    def stop(self: Reconciler, vm_network: Any, exc: AgentVMError) -> str:
        stops.append(str(exc))
        return "stopped"

    monkeypatch.setattr(reconcile, "fill_sets", lambda vm_network: None)
    monkeypatch.setattr(reconcile, "write_rules", write_rules)
    monkeypatch.setattr(Reconciler, "_repair_shared", lambda self: [])
    monkeypatch.setattr(Reconciler, "_stop", stop)
    vms: dict[str, Any] = {"a": vm}
    r = Reconciler(None, None, None, vms, lambda **_: None, lambda: None)  # type: ignore[arg-type]
    r.directory = type("D", (), {"lookup": lambda self, a: True})()
    vm.addressing = type("A", (), {"address": "10.213.0.2"})()  # type: ignore[attr-defined]
    fixes = r._reconcile_one(vm)  # type: ignore[arg-type]
    assert bool(stops) is stopped, fixes
    assert ("tap-a" in kernel.taps) is not stopped
