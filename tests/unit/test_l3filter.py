"""Layer 3's rule rendering and its checks against iptables-save text."""

from __future__ import annotations

from ipaddress import IPv6Address

from agent_vm.network import l3filter as backstop
from agent_vm.network.l3filter import EGRESS, HOST, Tables, VMRules

TAP = "agvm-0123456789"
VM = VMRules(tap=TAP, ipset="agentvm-x", cidr_set="agvcidr-x")


def save(*rules: str, chains: tuple[str, ...] = (EGRESS, HOST)) -> str:
    """An iptables-save style mangle table with the base jumps and ``rules``."""
    head = ["*mangle", ":FORWARD ACCEPT [0:0]", ":INPUT ACCEPT [0:0]"]
    head += [f":{chain} - [0:0]" for chain in chains]
    return "\n".join([*head, *backstop.BASE_JUMPS, *rules, "COMMIT"]) + "\n"


def complete(vm: VMRules | None = None) -> Tables:
    shared = backstop.shared_rules("agvm-")
    per_family = {}
    for family in backstop.FAMILIES:
        rules = []
        chains: tuple[str, ...] = (EGRESS, HOST)
        if vm is not None and (own := vm.chain_rules(family)) is not None:
            rules += [vm.dispatch(), *own]
            chains += (backstop.vm_chain(vm.tap),)
        rules += shared[family][EGRESS] + shared[family][HOST]
        per_family[family] = save(*rules, chains=chains)
    return Tables(ipv4=per_family["ipv4"], ipv6=per_family["ipv6"])


def test_ipv4_chain_order_replies_local_cidrs_nonpublic_allowed_drop() -> None:
    assert VM.chain_rules("ipv4") == [
        f"-A E-{TAP} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        f"-A E-{TAP} -m set --match-set agentvm-local dst -j DROP",
        f"-A E-{TAP} -p tcp -m set --match-set agvcidr-x dst,dst -j RETURN",
        f"-A E-{TAP} -m set --match-set agentvm-nonpublic dst -j DROP",
        f"-A E-{TAP} -p tcp -m set --match-set agentvm-x dst,dst -j RETURN",
        f"-A E-{TAP} -j DROP",
    ]


def test_no_ipv6_chain_unless_allowed_and_then_only_global_tcp_ports() -> None:
    assert VM.chain_rules("ipv6") is None
    vm6 = VMRules(TAP, "s", "c", ipv6_ports=(443,), host_addresses6=(IPv6Address("2001:db8::1"),))
    assert vm6.chain_rules("ipv6") == [
        f"-A E-{TAP} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        f"-A E-{TAP} -d 2001:db8::1/128 -j DROP",
        f"-A E-{TAP} -d 2000::/3 -p tcp -m tcp --dport 443 -j RETURN",
        f"-A E-{TAP} -j DROP",
    ]


def test_shared_chains_end_in_a_drop_for_every_sandbox_tap() -> None:
    for chains in backstop.shared_rules("agvm-").values():
        for rules in chains.values():
            assert rules[-1].endswith("-m physdev --physdev-in agvm-+ -j DROP")


def test_complete_tables_have_no_problems() -> None:
    tables = complete(VM)
    assert backstop.base_problems(tables, "agvm-") == []
    assert backstop.vm_problems(tables, VM) == []
    assert backstop.taps_in(tables) == {TAP}


def test_missing_pieces_are_reported() -> None:
    tables = complete(VM)
    no_jump = Tables(tables.ipv4.replace(f"-A FORWARD -j {EGRESS}\n", ""), tables.ipv6)
    assert backstop.base_problems(no_jump, "agvm-")
    flushed = Tables(
        "\n".join(line for line in tables.ipv4.splitlines() if not line.startswith(f"-A {EGRESS}")),
        tables.ipv6,
    )
    assert backstop.base_problems(flushed, "agvm-")
    assert backstop.vm_problems(flushed, VM) == [f"ipv4 {EGRESS}: no dispatch to E-{TAP}"]
    other = VMRules(TAP, "agentvm-other", "agentvm-local")
    assert backstop.vm_problems(tables, other) == [f"ipv4 E-{TAP}: rules differ"]


def test_a_vm_without_its_chain_is_reported_and_orphans_are_found() -> None:
    assert backstop.vm_problems(complete(), VM)
    assert backstop.taps_in(complete()) == set()
