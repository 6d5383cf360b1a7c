"""Layer 2's checks against nft's JSON listing (what the reconciler compares)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Any

from agent_vm.network import l2filter
from agent_vm.network.l2filter import LOCAL, NONPUBLIC, TAPS, VMRules, vm_chain

VM = VMRules(
    tap="agvm-0123456789",
    mac="52:54:00:12:34:56",
    address=IPv4Address("10.213.0.10"),
    gateway=IPv4Address("10.213.0.1"),
    tcp_ports=(80, 443),
)
LOCAL_NETS = [IPv4Network("10.213.0.0/21"), IPv4Network("192.0.2.2/32")]
NONPUBLIC_NETS = [IPv4Network("10.0.0.0/8"), IPv4Network("169.254.0.0/16")]


def listing(*, with_vm: bool = True, prerouting_rules: int = 2) -> dict[str, Any]:
    """A table as read_table() returns it, complete unless told otherwise."""
    rules: list[dict[str, Any]] = [{"expr": []} for _ in VM.rules()]
    rules[-1]["comment"] = VM.rules()[-1].split('"')[1]
    table: dict[str, Any] = {
        "sets": {
            LOCAL: [{"prefix": {"addr": "10.213.0.0", "len": 21}}, "192.0.2.2"],
            NONPUBLIC: [
                {"prefix": {"addr": "10.0.0.0", "len": 8}},
                {"range": ["169.254.0.0", "169.254.255.255"]},
            ],
        },
        "maps": {TAPS: []},
        "chains": {"prerouting": {"hook": "prerouting", "prio": l2filter.PRIORITY}},
        "rules": {"prerouting": [{"expr": []}] * prerouting_rules},
    }
    if with_vm:
        table["maps"][TAPS] = [[VM.tap, {"jump": {"target": vm_chain(VM.tap)}}]]
        table["chains"][vm_chain(VM.tap)] = {}
        table["rules"][vm_chain(VM.tap)] = rules
    return table


def test_a_complete_table_has_no_problems() -> None:
    table = listing()
    assert l2filter.base_problems(table, LOCAL_NETS, NONPUBLIC_NETS) == []
    assert l2filter.vm_problems(table, VM) == []
    assert l2filter.taps_in(table) == {VM.tap}


def test_damage_is_named() -> None:
    assert l2filter.base_problems(None, LOCAL_NETS, NONPUBLIC_NETS) == [
        "nft table bridge agentvm_l2 is missing"
    ]
    flushed = listing(prerouting_rules=0)
    assert "chain prerouting does not dispatch" in l2filter.base_problems(
        flushed, LOCAL_NETS, NONPUBLIC_NETS
    )
    stale = listing()
    assert "set nonpublic4 differs" in l2filter.base_problems(
        stale, LOCAL_NETS, [IPv4Network("10.0.0.0/8")]
    )
    gone = listing(with_vm=False)
    assert l2filter.vm_problems(gone, VM) == [
        f"no dispatch of {VM.tap} to {vm_chain(VM.tap)}",
        f"chain {vm_chain(VM.tap)} is missing",
    ]
    changed = VMRules(**{**VM.__dict__, "tcp_ports": (22,)})
    assert l2filter.vm_problems(listing(), changed) == [
        f"chain {vm_chain(VM.tap)} differs from the policy"
    ]
