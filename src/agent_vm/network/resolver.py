"""DNS for sandboxes, on the network gateway: the only resolver their filter lets them use.

For each query it finds the asking sandbox by source address and its policy:
* a name outside a domain allowlist gets NXDOMAIN (and counts as a blocked attempt);
* AAAA questions get an empty answer unless the policy allows IPv6;
* anything else is forwarded to the upstream resolvers, and for a sandbox with an
  allowlist every IPv4 address in the answer is added to its (address, tcp:port) set
  *before* the answer is returned, so the connection that follows is allowed;
* DNS rebinding: for a sandbox with an allowlist, A records pointing at non-public
  addresses (private, link-local, the host, other sandboxes; not its ``allow_cidrs``)
  are removed from the answer; if nothing is left the answer is REFUSED and counted.

Limits, by design of DNS-based allowlists: several names can share an address (a CDN),
so allowing one name allows that address for its other names too; a program that reuses
an address longer than the set entry lives (TTL, at least ``MIN_TTL``) must resolve the
name again; CNAME targets of an allowed name are followed without their own check.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
from collections.abc import Callable
from ipaddress import IPv4Address

from dnslib import QTYPE, RCODE, DNSError, DNSRecord

from agent_vm.logs import get_logger
from agent_vm.network import ipsets
from agent_vm.network.sandboxes import SandboxDirectory, SandboxRecord

log = get_logger(__name__)

MIN_TTL = 300
UPSTREAM_TIMEOUT = 3.0
BlockedCallback = Callable[..., None]  # (vm, kind, destination, port[, reason])


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.transport: asyncio.DatagramTransport | None = None
        self._pending: set[asyncio.Future[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram endpoint

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        task = asyncio.ensure_future(self._reply(data, addr))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _reply(self, data: bytes, addr: tuple[str | object, int]) -> None:
        answer = await self.resolver.answer(data, IPv4Address(str(addr[0])))
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, addr)


class Resolver:
    def __init__(
        self,
        listen: IPv4Address,
        directory: SandboxDirectory,
        upstreams: list[tuple[str, int]],
        *,
        port: int = 53,
        on_blocked: BlockedCallback | None = None,
    ) -> None:
        self.listen = listen
        self.port = port
        self.directory = directory
        self.upstreams = upstreams
        self.on_blocked = on_blocked
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the resolver's own
        self._thread: threading.Thread | None = None
        self._caller: asyncio.AbstractEventLoop | None = None  # where on_blocked runs

    async def start(self) -> None:
        """Serve UDP and TCP on an event loop of the resolver's own, in a thread.

        SO_REUSEPORT: every agent-vm process on the host serves, and the kernel hands
        each query to any one of them, whichever sandbox it comes from. So a process
        must answer at all times, also while its own event loop is blocked or idle (a
        test runner between async tests, a caller busy in a blocking call): a query
        that lands on a socket nobody reads is lost, and the guest sees its name fail.
        """
        self._caller = asyncio.get_running_loop()
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="agent-vm-dns", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._bind(), loop))
        except BaseException:
            await self.close()
            raise

    async def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(
            lambda: _UDP(self), local_addr=(str(self.listen), self.port), reuse_port=True
        )
        self._tcp = await asyncio.start_server(
            self._tcp_client, str(self.listen), self.port, reuse_port=True
        )

    async def _unbind(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()

    async def close(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._unbind(), loop))
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join, 10)
        if not thread.is_alive():
            loop.close()

    def _blocked(self, *args: object) -> None:
        """Count a refusal on the caller's loop (the guard's counters live there)."""
        if self.on_blocked is None:
            return
        caller = self._caller
        if caller is not None and not caller.is_closed():
            caller.call_soon_threadsafe(self.on_blocked, *args)
        elif caller is None:
            self.on_blocked(*args)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while True:
                (length,) = struct.unpack(">H", await reader.readexactly(2))
                data = await reader.readexactly(length)
                answer = await self.answer(data, IPv4Address(peer[0]))
                if answer is None:
                    break
                writer.write(struct.pack(">H", len(answer)) + answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def answer(self, data: bytes, client: IPv4Address) -> bytes | None:
        """The response to send back, or None to stay silent (unparseable input)."""
        try:
            request = DNSRecord.parse(data)
        except (DNSError, struct.error, IndexError, UnicodeDecodeError):
            return None
        record = self.directory.lookup(client)
        if record is None:
            return _reply(request, RCODE.REFUSED)
        if not request.questions:
            return _reply(request, RCODE.FORMERR)
        question = request.q
        name = str(question.qname).rstrip(".")
        if not record.policy.allows_name(name):
            log.info("dns_blocked", vm=record.vm, name=name)
            self._blocked(record.vm, "dns", name, 53)
            return _reply(request, RCODE.NXDOMAIN)
        if question.qtype == QTYPE.AAAA and not record.policy.allow_ipv6:
            return _reply(request, RCODE.NOERROR)
        upstream = await asyncio.to_thread(self._forward, request)
        if upstream is None:
            return _reply(request, RCODE.SERVFAIL)
        if record.policy.allow_domains is not None and record.ipset is not None:
            upstream, refused = public_only(upstream, record)
            if refused:
                log.info("dns_rebinding_refused", vm=record.vm, name=name, addresses=refused)
                self._blocked(record.vm, "dns", name, 53, "non-public answer")
            if upstream is None:
                return _reply(request, RCODE.REFUSED)
            await asyncio.to_thread(self._remember, upstream, record.ipset, record.policy.tcp_ports)
        return upstream

    def _forward(self, request: DNSRecord) -> bytes | None:
        for host, port in self.upstreams:
            with contextlib.suppress(OSError, DNSError, struct.error):
                reply = request.send(host, port, timeout=UPSTREAM_TIMEOUT)
                if DNSRecord.parse(reply).header.tc:
                    reply = request.send(host, port, tcp=True, timeout=UPSTREAM_TIMEOUT)
                return bytes(reply)
        return None

    @staticmethod
    def _remember(upstream: bytes, ipset: str, ports: tuple[int, ...]) -> None:
        try:
            reply = DNSRecord.parse(upstream)
        except (DNSError, struct.error):
            return
        addresses = [IPv4Address(str(rr.rdata)) for rr in reply.rr if rr.rtype == QTYPE.A]
        if addresses:
            ttl = max(MIN_TTL, max(rr.ttl for rr in reply.rr if rr.rtype == QTYPE.A))
            ipsets.allow(ipset, addresses, ports, ttl)


def public_only(upstream: bytes, record: SandboxRecord) -> tuple[bytes | None, list[str]]:
    """The answer without A records a sandbox must not be handed (see the module
    docstring), the addresses removed; None when it had A records and none is left."""
    try:
        reply = DNSRecord.parse(upstream)
    except (DNSError, struct.error):
        return None, []
    addressing, policy = record.addressing, record.policy
    kept, refused = [], []
    for rr in reply.rr:
        if rr.rtype != QTYPE.A:
            kept.append(rr)
            continue
        address = IPv4Address(str(rr.rdata))
        local = (
            address == addressing.gateway
            or address in addressing.network
            or address in addressing.host_addresses
        )
        if local or (addressing.is_nonpublic(address) and not policy.allows_cidr(address)):
            refused.append(str(address))
        else:
            kept.append(rr)
    if not refused:
        return upstream, []
    if not any(rr.rtype == QTYPE.A for rr in kept):
        return None, refused
    reply.rr = kept
    return bytes(reply.pack()), refused


def _reply(request: DNSRecord, rcode: int) -> bytes:
    response = request.reply()
    response.header.rcode = rcode
    return bytes(response.pack())


def upstreams_from_resolv_conf(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    servers = []
    with contextlib.suppress(OSError), open(path) as handle:
        for line in handle:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    servers.append((str(IPv4Address(parts[1])), 53))
    return servers
