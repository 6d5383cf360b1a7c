"""Network modes and egress policy, on real VMs against test hosts in namespaces.

Every sandbox here is started from the NAT_FILTERED golden state with the session's
NetworkGuard. Destinations are only the test host (198.51.100.10 and .11, namespace
``agvtest1``), the host's end of its veth (198.51.100.1), the network gateway and other
test VMs. Each blocked case is probed next to an allowed one in the same VM, so a probe
that cannot reach anything fails the test instead of passing it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from ipaddress import IPv4Interface
from typing import Any

import pytest
import pytest_asyncio

from agent_vm.config import Settings
from agent_vm.core.connection import LibvirtConnection
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.golden import GoldenState
from agent_vm.execution.running import RunningVM
from agent_vm.execution.runtime import Runtime
from agent_vm.host.daemons import ensure_daemons, stop_libvirtd
from agent_vm.image.store import Image
from agent_vm.network import ipsets, l2filter, l3filter
from agent_vm.network.guard import NetworkGuard
from agent_vm.network.ipsets import LOCAL_SET
from agent_vm.network.orphans import reap_network
from agent_vm.network.policy import EgressPolicy
from agent_vm.network.vmnet import VMNetwork
from tests.integration.conftest import TEST_HOST_IP
from tests.integration.guest_probe import hammer_code, parse, probe_code
from tests.integration.helpers import eventually, network_leftovers
from tests.integration.testnet import TestHost, exclusive

OTHER_IP = "198.51.100.11"  # the test host's second address
HOST_SIDE_IP = "198.51.100.1"  # the host's end of the test host's veth

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(scope="module")
async def nat_golden(
    runtime: Runtime, image: Image, guard: NetworkGuard, test_host: TestHost
) -> GoldenState:
    return await runtime.golden(image, runtime.spec())


@pytest.fixture
def sandbox(
    runtime: Runtime, image: Image, guard: NetworkGuard, nat_golden: GoldenState
) -> Callable[..., Any]:
    """``async with sandbox(policy) as vm``: a NAT_FILTERED VM, removed afterwards."""

    @asynccontextmanager
    async def make(policy: EgressPolicy | None = None) -> AsyncIterator[RunningVM]:
        vm = await runtime.vm(image=image, policy=policy)
        try:
            yield vm
        finally:
            await vm.close()

    return make


async def probe(
    executor: AgentExecutor, vm: RunningVM, probes: dict[str, list[Any]], timeout: float = 2.0
) -> dict[str, str]:
    result = await executor.execute(vm, code=probe_code(probes, timeout), timeout=60)
    assert result.exit_code == 0, result.stderr
    return parse(result.stdout)


def network_of(vm: RunningVM) -> VMNetwork:
    assert vm.nic is not None and vm.nic.vm_network is not None
    return vm.nic.vm_network


@contextmanager
def host_listeners(*addresses: tuple[str, int]) -> Iterator[None]:
    """TCP listeners on the host itself (the kernel completes handshakes from the backlog)."""
    sockets = [socket.create_server(address) for address in addresses]
    try:
        yield
    finally:
        for sock in sockets:
            sock.close()


def assert_blocked(outcome: str) -> None:
    assert outcome in ("timeout", "no reply") or outcome.startswith("error:"), outcome


def assert_refused_by_name(outcome: str, name: str) -> None:
    """Web traffic refused by the egress proxy: a 403 that says why (docs/security.md)."""
    assert outcome == f"ok:agent-vm: {name} is not in this sandbox's allowlist", outcome


async def test_default_policy_allows_only_dns_and_web_ports(
    sandbox: Callable[..., Any], executor: AgentExecutor, guard: NetworkGuard, settings: Settings
) -> None:
    gateway = str(guard.definition.gateway)
    async with sandbox() as vm:
        with host_listeners((gateway, 80), (gateway, 2222), (HOST_SIDE_IP, 80)):
            out = await probe(
                executor,
                vm,
                {
                    "http80": ["http", TEST_HOST_IP, 80],
                    "ssh22": ["tcp", TEST_HOST_IP, 22],
                    "http8080": ["http", TEST_HOST_IP, 8080],
                    "udp443": ["udp", TEST_HOST_IP, 443],
                    "udp5000": ["udp", TEST_HOST_IP, 5000],
                    "icmp": ["icmp", TEST_HOST_IP],
                    "resolver": ["resolve", "web.allowed.test"],
                    "dns_gateway_tcp": ["dns", "web.allowed.test", gateway, True],
                    "dns_foreign_udp": ["dns", "web.allowed.test", TEST_HOST_IP],
                    "dns_foreign_tcp": ["dns", "web.allowed.test", TEST_HOST_IP, True],
                    "host_gateway_80": ["tcp", gateway, 80],
                    "host_gateway_2222": ["tcp", gateway, 2222],
                    "host_veth_80": ["tcp", HOST_SIDE_IP, 80],
                },
            )
        assert out["http80"] == f"ok:hello from port 80 to {HOST_SIDE_IP}", out  # NATed
        assert out["ssh22"] == "open:SSH-2.0-agentvm-testhost", out
        assert out["resolver"] == f"ok:{TEST_HOST_IP}", out
        assert out["dns_gateway_tcp"] == "answer:1", out
        for blocked in (
            "http8080", "udp443", "udp5000", "icmp", "dns_foreign_udp", "dns_foreign_tcp",
            "host_gateway_80", "host_gateway_2222", "host_veth_80",
        ):  # fmt: skip
            assert_blocked(out[blocked])

        def seen() -> set[tuple[str, str, int | None]]:
            return {(b.kind, b.destination, b.port) for b in guard.blocked(vm.name)}

        expected = {
            ("tcp", TEST_HOST_IP, 8080),
            ("udp", TEST_HOST_IP, 443),
            ("udp", TEST_HOST_IP, 5000),
            ("udp", TEST_HOST_IP, 53),
            ("tcp", gateway, 80),
            ("tcp", HOST_SIDE_IP, 80),
        }
        await eventually(lambda: expected <= seen(), 5, f"blocked attempts {expected} in {seen()}")
        assert ("tcp", TEST_HOST_IP, 80) not in seen()
        reasons = {b.destination + ":" + str(b.port): b.reason for b in guard.blocked(vm.name)}
        assert reasons[f"{TEST_HOST_IP}:8080"] == "port 8080 not allowed"
        assert reasons[f"{gateway}:80"] == "host service"
        assert guard.blocked_count(vm.name) >= len(expected)
    # detached with its VM: nothing of a gone sandbox is kept (no per-VM series forever)
    assert guard.blocked(vm.name) == [] and guard.blocked_count(vm.name) == 0


async def test_sandboxes_cannot_reach_each_other(
    sandbox: Callable[..., Any], executor: AgentExecutor
) -> None:
    async with sandbox() as first, sandbox() as second:
        listening = asyncio.Event()
        server = asyncio.create_task(
            executor.execute(
                second,
                code="import socket, time\n"
                "s = socket.create_server(('0.0.0.0', 80))\n"
                "print('listening', flush=True)\n"
                "time.sleep(8)\n",
                timeout=30,
                on_stdout=lambda _: listening.set(),
            )
        )
        await asyncio.wait_for(listening.wait(), 20)
        second_ip = second.address
        assert second_ip is not None
        across = await probe(
            executor,
            first,
            {
                "tcp80": ["tcp", second_ip, 80],
                "icmp": ["icmp", second_ip],
                "internet": ["http", TEST_HOST_IP, 80],
            },
        )
        itself = await probe(executor, second, {"own": ["tcp", second_ip, 80]})
        await server
    assert across["internet"].startswith("ok:"), across
    assert itself["own"].startswith("open"), itself  # the listener was really there
    assert_blocked(across["tcp80"])
    assert_blocked(across["icmp"])


async def test_spoofed_mac_or_ip_gets_nothing_out(
    sandbox: Callable[..., Any], executor: AgentExecutor, guard: NetworkGuard
) -> None:
    gateway = str(guard.definition.gateway)
    bridge = guard.definition.bridge
    spoof_mac, spoof_ip = "52:54:00:66:66:66", "10.213.0.250"
    async with sandbox() as vm:
        addressing = network_of(vm).addressing
        web = {"web": ["http", TEST_HOST_IP, 80]}

        async def set_mac(mac: str) -> None:
            result = await executor.execute(
                vm,
                f"ip link set eth0 down && ip link set eth0 address {mac} && "
                f"ip link set eth0 up && ip route replace default via {gateway}",
            )
            assert result.exit_code == 0, result.stderr

        mac_frames = FrameCounter(bridge, ETH_P_ALL, from_mac(spoof_mac))
        await set_mac(spoof_mac)
        spoofed_mac = await probe(executor, vm, web)
        await set_mac(addressing.mac)
        leaked_mac = mac_frames.stop()
        restored = await probe(executor, vm, web)
        added = await executor.execute(vm, f"ip addr add {spoof_ip}/24 dev eth0")
        assert added.exit_code == 0, added.stderr
        ip_frames = FrameCounter(bridge, ETH_P_ALL, from_ipv4(spoof_ip))
        sources = await probe(
            executor,
            vm,
            {
                "spoofed": ["http", TEST_HOST_IP, 80, spoof_ip],
                "own": ["http", TEST_HOST_IP, 80, str(addressing.address)],
            },
        )
        leaked_ip = ip_frames.stop()
    assert_blocked(spoofed_mac["web"])
    assert leaked_mac == 0  # not one frame with the changed MAC reached the bridge
    assert restored["web"].startswith("ok:"), restored
    assert_blocked(sources["spoofed"])
    assert leaked_ip == 0  # nor one packet or ARP message from the added address
    assert sources["own"].startswith("ok:"), sources


class FrameCounter:
    """Counts Ethernet frames of one ethertype arriving on an interface that match a test.

    On the bridge device this sees what the filter let through to the host: ebtables
    drops happen before a frame reaches it, so a spoofed frame that "gets nothing back"
    but still leaves would be counted here.
    """

    def __init__(self, interface: str, ethertype: int, match: Callable[[bytes], bool]) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
        self.sock.bind((interface, 0))
        self.sock.settimeout(0.2)
        self.match = match
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self.sock.recv(65535)
            except TimeoutError:
                continue
            if self.match(frame):
                self.count += 1

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.sock.close()
        return self.count


def from_mac(mac: str) -> Callable[[bytes], bool]:
    raw = bytes.fromhex(mac.replace(":", ""))
    return lambda frame: frame[6:12] == raw


def from_ipv4(address: str) -> Callable[[bytes], bool]:
    """IPv4 packets or ARP messages whose sender is ``address``."""
    raw = socket.inet_aton(address)
    return lambda frame: (
        (frame[12:14] == b"\x08\x00" and frame[26:30] == raw)
        or (frame[12:14] == b"\x08\x06" and frame[28:32] == raw)
    )


ETH_P_ALL = 0x0003


IPV6_CHATTER = (
    "echo 0 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6; sleep 2; "
    'python3 -c "import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); '
    "[s.sendto(b'x', ('ff02::1%eth0', 9)) for _ in range(5)]\"; "
    "ip -6 addr show dev eth0 | grep -c inet6"
)


async def test_no_ipv6_frame_leaves_unless_allowed(
    sandbox: Callable[..., Any], executor: AgentExecutor, guard: NetworkGuard
) -> None:
    async with sandbox() as vm:
        network = network_of(vm)
        counter = FrameCounter(guard.definition.bridge, 0x86DD, from_mac(network.addressing.mac))
        chatter = await executor.execute(vm, IPV6_CHATTER)
        await asyncio.sleep(0.5)
        denied = counter.stop()
        assert chatter.stdout.strip() not in ("", "0"), chatter  # the guest did speak IPv6

        await vm.set_policy(EgressPolicy(allow_ipv6=True))  # the control: now it may
        counter = FrameCounter(guard.definition.bridge, 0x86DD, from_mac(network.addressing.mac))
        await executor.execute(vm, IPV6_CHATTER)
        await asyncio.sleep(0.5)
        allowed = counter.stop()
    assert denied == 0
    assert allowed > 0


async def test_isolated_has_no_interface_and_no_route(
    runtime: Runtime, image: Image, executor: AgentExecutor
) -> None:
    vm = await runtime.vm(image=image, spec=runtime.spec(network="isolated"), cold=True)
    try:
        links = await executor.execute(vm, "ls /sys/class/net")
        routes = await executor.execute(vm, "ip -4 route; ip -6 route")
        reach = await probe(executor, vm, {"web": ["tcp", TEST_HOST_IP, 80]})
        assert "<interface" not in vm.vm.xml()
    finally:
        await vm.close()
    assert links.stdout.split() == ["lo"]
    assert routes.exit_code == 0 and routes.stdout.strip() == "", routes.stdout
    assert reach["web"].startswith("error:"), reach  # no route at all, not even a timeout


async def test_domain_allowlist_is_enforced_on_the_host(
    sandbox: Callable[..., Any], executor: AgentExecutor, guard: NetworkGuard
) -> None:
    policy = EgressPolicy(allow_domains=("web.allowed.test",))
    async with sandbox(policy) as vm:
        before = await probe(executor, vm, {"direct": ["http", TEST_HOST_IP, 80]})
        names = await probe(
            executor,
            vm,
            {"allowed": ["resolve", "web.allowed.test"], "other": ["resolve", "evil.test"]},
        )
        after = await probe(
            executor,
            vm,
            {
                "allowed": ["http", "web.allowed.test", 80],
                "by_address": ["http", TEST_HOST_IP, 80],  # the address, without the name
                "allowed_8080": ["http", TEST_HOST_IP, 8080],  # not an allowed port
                "other_address": ["http", OTHER_IP, 80],  # same host, not resolved
                "other_ssh": ["tcp", OTHER_IP, 22],  # not web: the address sets decide
            },
        )
        dns_blocked = {(b.kind, b.destination) for b in guard.blocked(vm.name)}
    # web traffic is checked by name (Host here) by the egress proxy, and refused readably
    assert_refused_by_name(before["direct"], TEST_HOST_IP)
    assert names["allowed"] == f"ok:{TEST_HOST_IP}", names
    assert names["other"].startswith("error:"), names
    assert after["allowed"].startswith("ok:hello from port 80"), after
    assert_refused_by_name(after["by_address"], TEST_HOST_IP)
    assert_blocked(after["allowed_8080"])
    assert_refused_by_name(after["other_address"], OTHER_IP)
    assert_blocked(after["other_ssh"])
    assert ("dns", "evil.test") in dns_blocked
    assert ("http", OTHER_IP) in dns_blocked


async def test_policy_change_on_a_running_sandbox(
    sandbox: Callable[..., Any], executor: AgentExecutor
) -> None:
    ports = {"p80": ["http", TEST_HOST_IP, 80], "p8080": ["http", TEST_HOST_IP, 8080]}
    async with sandbox() as vm:
        default = await probe(executor, vm, ports)
        await vm.set_policy(EgressPolicy(tcp_ports=(8080,)))
        changed = await probe(executor, vm, ports)
        await vm.set_policy(EgressPolicy(allow_domains=("api.allowed.test",)))
        listed = await probe(executor, vm, {"direct": ["http", TEST_HOST_IP, 80]})
    assert default["p80"].startswith("ok:"), default
    assert_blocked(default["p8080"])
    assert changed["p8080"].startswith("ok:"), changed
    assert_blocked(changed["p80"])  # a port the policy no longer allows: not proxied either
    assert_refused_by_name(listed["direct"], TEST_HOST_IP)


async def test_policy_holds_across_a_libvirtd_restart_and_a_firewall_flush(
    sandbox: Callable[..., Any], executor: AgentExecutor, guard: NetworkGuard
) -> None:
    ports = {"p80": ["http", TEST_HOST_IP, 80], "p8080": ["http", TEST_HOST_IP, 8080]}
    async with sandbox() as vm:
        network = network_of(vm)
        tap = network.tap

        def problems() -> list[str]:
            return guard.enforcement_problems(vm.name)

        assert await asyncio.to_thread(problems) == []
        await asyncio.to_thread(stop_libvirtd)
        await asyncio.to_thread(ensure_daemons)
        after_restart = await probe(executor, vm, ports)
        # A firewall reload or a flush wipes one layer or a shared part; the guard notices
        # and writes it again. Flushed and checked without yielding to the event loop, so
        # the guard cannot repair it in between.
        for flush in (
            ["iptables", "-w", "-t", "mangle", "-F", l3filter.vm_chain(tap)],
            ["iptables", "-w", "-t", "mangle", "-F", l3filter.EGRESS],
            ["ip6tables", "-w", "-t", "mangle", "-F", "INPUT"],
            ["nft", "flush", "chain", "bridge", l2filter.TABLE, l2filter.vm_chain(tap)],
            ["nft", "flush", "chain", "bridge", l2filter.TABLE, "prerouting"],
            ["nft", "delete", "table", "bridge", l2filter.TABLE],
        ):
            subprocess.run(flush, check=True)  # noqa: ASYNC221
            assert problems(), flush
            await eventually(lambda: not problems(), 20, f"the guard to repair {flush}")
        reconciled = await probe(executor, vm, ports)
    assert after_restart["p80"].startswith("ok:"), after_restart
    assert_blocked(after_restart["p8080"])
    assert reconciled["p80"].startswith("ok:"), reconciled
    assert_blocked(reconciled["p8080"])


async def test_each_layer_holds_when_the_other_is_flushed(
    sandbox: Callable[..., Any], executor: AgentExecutor, guard: NetworkGuard
) -> None:
    """With repairs paused: layer 3 flushed, layer 2 still allows only the policy's ports;
    layer 2 flushed, the sandbox gets nothing out at all (it fails closed)."""
    ports = {"p80": ["http", TEST_HOST_IP, 80], "p8080": ["http", TEST_HOST_IP, 8080]}
    watch = guard._watch
    assert watch is not None
    watch.cancel()
    try:
        async with sandbox() as vm:
            tap = network_of(vm).tap
            flush_l3 = ["iptables", "-w", "-t", "mangle", "-F", l3filter.vm_chain(tap)]
            await asyncio.to_thread(subprocess.run, flush_l3, check=True)
            without_l3 = await probe(executor, vm, ports)
            await guard.reconcile(vm.name)
            flush_l2 = ["nft", "flush", "chain", "bridge", l2filter.TABLE, l2filter.vm_chain(tap)]
            await asyncio.to_thread(subprocess.run, flush_l2, check=True)
            without_l2 = await probe(executor, vm, ports)
            await guard.reconcile(vm.name)
            restored = await probe(executor, vm, ports)
    finally:
        guard._watch = asyncio.create_task(guard.reconciler.watch())
    assert without_l3["p80"].startswith("ok:"), without_l3
    assert_blocked(without_l3["p8080"])
    assert_blocked(without_l2["p80"])
    assert_blocked(without_l2["p8080"])
    assert restored["p80"].startswith("ok:") and not restored["p8080"].startswith("ok:")


async def test_no_moment_without_a_filter_while_libvirt_rebuilds_them(
    sandbox: Callable[..., Any], executor: AgentExecutor, guard: NetworkGuard
) -> None:
    """libvirt 9 re-creates its base jumps (delete, then insert) whenever it instantiates a
    filter: when a VM starts and, for every VM, when libvirtd starts. For those ~50 ms
    no running VM had a filter (found by CI). A VM opens connections to a blocked port,
    a host port and an allowed port every 10 ms meanwhile. agent-vm no longer uses
    libvirt's filters, but libvirtd restarts and VM starts must still change nothing."""
    seconds = 25.0
    gateway = str(guard.definition.gateway)
    blocked, host_port, allowed = f"{TEST_HOST_IP}:8080", f"{gateway}:2222", f"{TEST_HOST_IP}:80"
    async with sandbox() as vm:

        async def churn() -> None:
            await asyncio.sleep(3)
            await asyncio.to_thread(stop_libvirtd)
            await asyncio.to_thread(ensure_daemons)
            await asyncio.sleep(2)
            async with sandbox():
                await asyncio.sleep(1)

        code = hammer_code([(TEST_HOST_IP, 8080), (gateway, 2222), (TEST_HOST_IP, 80)], seconds)
        with host_listeners((gateway, 2222)):
            result, _ = await asyncio.gather(
                executor.execute(vm, code=code, timeout=seconds + 60), churn()
            )
    assert result.exit_code == 0, result.stderr
    counts = json.loads(result.stdout)
    assert counts["opened"][blocked] > 500, counts  # the guest really kept trying
    assert counts["connected"][allowed] > 500, counts  # and the network worked throughout
    assert counts["connected"][blocked] == 0, counts
    assert counts["connected"][host_port] == 0, counts


async def test_leftovers_of_a_crashed_process_are_removed(
    connection: LibvirtConnection, settings: Settings, guard: NetworkGuard
) -> None:
    other = Runtime(settings)  # plays a process that then crashed
    try:
        network = await (await other.guard()).attach("agentvm-crashed01")
    finally:
        await other.close()  # no detach: its pieces stay, as after a SIGKILL
    assert ipsets.exists(network.ipset) and ipsets.exists(network.cidr_set)
    assert network.tap in l3filter.taps_in(l3filter.read_tables())
    assert network.tap in l2filter.taps_in(l2filter.read_table())
    assert guard.directory.lookup(network.addressing.address) is not None
    removed = await asyncio.to_thread(reap_network, connection, guard.directory, min_age=0)
    assert f"network of {network.vm_name}" in removed
    assert network_leftovers(settings, {network.vm_name}) == []
    assert guard.directory.lookup(network.addressing.address) is None


@pytest.fixture
def test_bridge() -> Iterator[TestHost]:
    """A host bridge with a DHCP server and a test host on it (for BRIDGE mode)."""
    with exclusive("extra-networks"):
        yield from _bridged_host()


def _bridged_host() -> Iterator[TestHost]:
    bridge = "agvtbr1"
    subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    subprocess.run(["ip", "addr", "add", "203.0.113.1/24", "dev", bridge], check=True)
    subprocess.run(["ip", "link", "set", bridge, "up"], check=True)
    host = TestHost(
        name="agvtest2",
        host_side=IPv4Interface("203.0.113.1/24"),
        addresses=(IPv4Interface("203.0.113.10/24"),),
        bridge=bridge,
        dhcp_range=("203.0.113.100", "203.0.113.150"),
    )
    try:
        host.start()
        yield host
    finally:
        host.stop()
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)


async def test_bridge_mode_joins_a_user_bridge(
    runtime: Runtime, image: Image, executor: AgentExecutor, test_bridge: TestHost
) -> None:
    vm = await runtime.vm(image=image, spec=runtime.spec(network="bridge:agvtbr1"), cold=True)
    try:
        address = await executor.execute(vm, "ip -4 -o addr show dev eth0")
        reach = await probe(executor, vm, {"web": ["http", test_bridge.ip, 8080]})
    finally:
        await vm.close()
    assert " inet 203.0.113.1" in address.stdout, address.stdout  # leased from .100-.150
    assert reach["web"].startswith("ok:hello from port 8080"), reach  # BRIDGE: unfiltered


async def test_firewall_reads_survive_sets_coming_and_going(guard: NetworkGuard) -> None:
    """iptables-save fails ("Set with index N in kernel doesn't exist") when it lists a
    rule whose ipset another process destroys at that moment: seen as a leaked ipset and
    backstop chain after 30 pooled VMs were released at once. Here other writers churn
    chains and sets as fast as they can (raw iptables/ipset, as libvirt and other agent-vm
    processes would) while agent-vm reads the tables and adds and removes sandbox chains
    of its own; none of agent-vm's operations may fail or leave anything."""
    errors: list[BaseException] = []
    done = threading.Event()

    def foreign_churn(worker: int) -> None:
        name, chain = f"agvchurn{worker}", f"AGVCHURN{worker}"
        rule = f"-A {chain} -p tcp -m set --match-set {name} dst,dst -j RETURN"
        add = f"*mangle\n:{chain} - [0:0]\n{rule}\nCOMMIT\n"
        remove = f"*mangle\n-F {chain}\n-X {chain}\nCOMMIT\n"
        restore = ["iptables-restore", "-w", "--noflush"]
        while not done.is_set():
            subprocess.run(["ipset", "create", name, "hash:net,port", "-exist"], check=True)
            subprocess.run(restore, input=add, text=True, check=True)
            subprocess.run(restore, input=remove, text=True, check=True)
            subprocess.run(["ipset", "destroy", name], check=True)

    def ours(worker: int) -> None:
        for round_ in range(25):
            name = f"agentvm-churn{worker}{round_:03d}"
            rules = l3filter.VMRules(
                tap=f"agvm-churn{worker}{round_:02d}",
                ipset=ipsets.set_name(name),
                cidr_set=ipsets.cidr_set_name(name),
                local_set=LOCAL_SET,
            )
            try:
                l3filter.read_tables()
                ipsets.create(rules.ipset)
                ipsets.create(rules.cidr_set)
                l3filter.add_vm(rules)
                l3filter.remove_vm(rules.tap)
                ipsets.destroy(rules.ipset)
                ipsets.destroy(rules.cidr_set)
            except BaseException as exc:
                errors.append(exc)

    churners = [threading.Thread(target=foreign_churn, args=(w,)) for w in range(3)]
    for churner in churners:
        churner.start()
    try:
        await asyncio.gather(*(asyncio.to_thread(ours, w) for w in range(2)))
    finally:
        done.set()
        for churner in churners:
            churner.join()
    assert errors == []
    assert [n for n in ipsets.names() if "churn" in n] == []
    assert [t for t in l3filter.taps_in(l3filter.read_tables()) if "churn" in t] == []
