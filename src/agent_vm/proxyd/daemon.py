"""agent-vm's egress proxy: mitmproxy as a library, in a process of its own.

Run by ``network/egress.py`` with the interpreter of the proxy's own environment
(``host/egress.py``); it imports nothing of agent-vm. The host's redirection (``nat``
PREROUTING) sends a sandbox's TCP to ports 80 and 443 here, so clients that ignore
``HTTP_PROXY`` are covered; mitmproxy's transparent mode finds the original destination.

For every connection, by the sandbox's address (its tap is checked by the kernel):

* TLS: the ClientHello's SNI must be allowed and must resolve to the address the guest
  connected to. A connection that needs nothing more is spliced (bytes passed on, no
  interception, no CA needed). One whose name carries a secret, or is refused, is
  terminated with a certificate of our CA, so a refusal is a readable HTTP 403;
* plain HTTP: the same checks on the Host header;
* a request to a secret's host gets the placeholder replaced by the value in its
  headers (only over TLS, with the upstream certificate verified); anywhere else the
  placeholder goes out as it is.

The owner speaks JSON lines: on stdin ``{"op": "vm", "address", ...}`` / ``{"op":
"drop", "address"}``; on stdout ``ready``, ``request``, ``denied`` and ``splice`` events.
Secret values arrive on stdin and are kept in memory only; no event carries one. EOF on
stdin ends the proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import ipaddress
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dnslib import QTYPE, DNSRecord
from mitmproxy import http, master, options, tls  # type: ignore[import-not-found]
from mitmproxy.addons import (  # type: ignore[import-not-found]
    core,
    disable_h2c,
    next_layer,
    proxyserver,
    tlsconfig,
)

DNS_TTL = 60.0  # seconds an answer counts (answers seen within it are all accepted)
DNS_TIMEOUT = 2.0
DENIED_HEADER = "X-Agent-VM-Denied"


@dataclass(frozen=True)
class Secret:
    name: str
    placeholder: str
    value: str
    hosts: tuple[str, ...]
    header: str | None


@dataclass(frozen=True)
class Sandbox:
    """What the proxy knows of one sandbox (by its address)."""

    vm: str
    allow: tuple[str, ...] | None  # None: any name
    cidrs: tuple[ipaddress.IPv4Network, ...] = ()
    nonpublic: tuple[ipaddress.IPv4Network, ...] = ()
    local: tuple[ipaddress.IPv4Network, ...] = ()  # the host and the sandbox subnet
    secrets: tuple[Secret, ...] = field(default=())

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Sandbox:
        def nets(key: str) -> tuple[ipaddress.IPv4Network, ...]:
            return tuple(ipaddress.IPv4Network(n) for n in data.get(key, ()))

        allow = data.get("allow")
        return cls(
            vm=str(data["vm"]),
            allow=None if allow is None else tuple(str(a) for a in allow),
            cidrs=nets("cidrs"),
            nonpublic=nets("nonpublic"),
            local=nets("local"),
            secrets=tuple(
                Secret(s["name"], s["placeholder"], s["value"], tuple(s["hosts"]), s.get("header"))
                for s in data.get("secrets", ())
            ),
        )


def _names_module() -> Any:
    """agent-vm's ``names.py`` (stdlib only), loaded by its path: this interpreter has
    mitmproxy's packages, and agent-vm's others must not shadow them."""
    path = Path(__file__).resolve().parents[1] / "names.py"
    spec = importlib.util.spec_from_file_location("agentvm_names", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


matches = _names_module().matches


class Names:
    """Addresses of names, asked of the sandbox resolver's upstreams (never the host's
    own resolvers); every answer seen within DNS_TTL counts, as a CDN rotates them."""

    def __init__(self, upstreams: list[tuple[str, int]]) -> None:
        self.upstreams = upstreams
        self._seen: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()

    def _ask(self, name: str) -> set[str]:
        for host, port in self.upstreams:
            try:
                reply = DNSRecord.parse(
                    DNSRecord.question(name, "A").send(host, port, timeout=DNS_TIMEOUT)
                )
            except Exception:  # noqa: S112 - unreachable or garbled: the next upstream
                continue
            return {str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A}
        return set()

    async def resolves_to(self, name: str, address: str) -> bool:
        now = time.monotonic()
        with self._lock:
            seen = {a: t for a, t in self._seen.get(name, {}).items() if t > now}
        if address not in seen:
            for found in await asyncio.to_thread(self._ask, name):
                seen[found] = now + DNS_TTL
            with self._lock:
                self._seen[name] = seen
        return address in seen


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class Gate:
    """The mitmproxy addon: name checks, splicing, injection, readable refusals."""

    def __init__(self, names: Names) -> None:
        self.names = names
        self.sandboxes: dict[str, Sandbox] = {}
        # client id -> (SNI, (rule, sentence) when refused)
        self.tls: dict[str, tuple[str | None, tuple[str, str] | None]] = {}

    # ------------------------------------------------------------ decisions

    async def refusal(self, box: Sandbox, address: str, name: str | None) -> tuple[str, str] | None:
        """(rule, sentence) when ``name`` at ``address`` is refused, else None."""
        dst = ipaddress.IPv4Address(address)
        if any(dst in n for n in box.local):
            return "host", f"{address} is the host or another sandbox"
        if any(dst in n for n in box.cidrs):
            return None
        if any(dst in n for n in box.nonpublic):
            return "non-public", f"{address} is not a public address"
        if box.allow is None:
            return None
        if not name:
            return "no-name", f"a connection to {address} names no host (SNI or Host)"
        if not matches(box.allow, name):
            return "allowlist", f"{name} is not in this sandbox's allowlist"
        if not await self.names.resolves_to(name.lower().rstrip("."), address):
            return "name-mismatch", f"{name} does not resolve to {address}, the address used"
        return None

    def box(self, peer: tuple[str, int] | None) -> Sandbox | None:
        return self.sandboxes.get(peer[0]) if peer else None

    # ------------------------------------------------------------ mitmproxy hooks

    async def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        client = data.context.client
        box = self.box(client.peername)
        address, port = data.context.server.address
        sni = data.client_hello.sni
        if box is None:
            self.tls[client.id] = (sni, ("host", "no sandbox has this address"))
            return
        refused = await self.refusal(box, address, sni)
        secret_host = sni is not None and any(matches(s.hosts, sni) for s in box.secrets)
        self.tls[client.id] = (sni, refused)
        if refused is not None:
            emit({"ev": "denied", "vm": box.vm, "kind": "tls", "host": sni or address,
                  "port": port, "rule": refused[0], "reason": refused[1]})  # fmt: skip
        elif not secret_host:
            data.ignore_connection = True  # spliced: the guest's TLS end to end
            emit({"ev": "splice", "vm": box.vm, "host": sni, "port": port})

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Checked and injected on the headers, before any of them goes upstream: a large
        body is streamed (past ``stream_large_bodies``) and a late hook would be too late."""
        box = self.box(flow.client_conn.peername)
        address, port = flow.server_conn.address
        host = (flow.request.host_header or "").rsplit(":", 1)[0].strip("[]") or None
        sni, tls_refusal = self.tls.get(flow.client_conn.id, (None, None))
        refused: tuple[str, str] | None = None
        if box is None:
            refused = ("host", "no sandbox has this address")
        elif tls_refusal is not None:
            refused = tls_refusal
        elif flow.client_conn.tls and host and sni and host.lower() != sni.lower():
            refused = ("sni-mismatch", f"Host {host} differs from the TLS name {sni}")
        else:
            refused = await self.refusal(box, address, host)
        if refused is not None:
            rule, sentence = refused
            flow.response = http.Response.make(
                403, f"agent-vm: {sentence}\n",
                {"Content-Type": "text/plain; charset=utf-8", DENIED_HEADER: f"{rule}: {sentence}"},
            )  # fmt: skip
            flow.metadata["agentvm_denied"] = rule
            flow.request.stream = False  # its body is read and dropped (killed past 1 MiB)
            if box is not None and not (flow.client_conn.tls and tls_refusal):
                emit({"ev": "denied", "vm": box.vm, "kind": "http", "host": host or address,
                      "port": port, "rule": rule, "reason": sentence})  # fmt: skip
            return
        assert box is not None
        injected = []
        if flow.client_conn.tls and host:
            for secret in box.secrets:
                if not matches(secret.hosts, host):
                    continue
                for key, value in list(flow.request.headers.items(multi=True)):
                    if secret.placeholder in value and (
                        secret.header is None or key.lower() == secret.header.lower()
                    ):
                        flow.request.headers[key] = value.replace(secret.placeholder, secret.value)
                        injected.append(secret.name)
        flow.metadata["agentvm_injected"] = sorted(set(injected))

    def _record(self, flow: http.HTTPFlow, status: int, size: int) -> None:
        box = self.box(flow.client_conn.peername)
        if box is None:
            return
        emit({
            "ev": "request", "vm": box.vm, "method": flow.request.method,
            "host": flow.request.pretty_host, "path": flow.request.path.split("?", 1)[0],
            "status": status, "bytes": size, "tls": bool(flow.client_conn.tls),
            "injected": flow.metadata.get("agentvm_injected", []),
            "denied": flow.metadata.get("agentvm_denied"),
        })  # fmt: skip

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Every upstream response streamed to the guest as it comes (an agent's SSE
        tokens), its bytes counted on the way."""
        if flow.response is None or flow.metadata.get("agentvm_denied"):
            return
        counted = [0]

        def count(data: bytes) -> bytes:
            counted[0] += len(data)
            return data

        flow.response.stream = count
        flow.metadata["agentvm_bytes"] = counted

    def response(self, flow: http.HTTPFlow) -> None:
        assert flow.response is not None
        counted = flow.metadata.get("agentvm_bytes")
        size = counted[0] if counted else len(flow.response.raw_content or b"")
        self._record(flow, flow.response.status_code, size)

    def error(self, flow: http.HTTPFlow) -> None:
        self._record(flow, 502, 0)

    def client_disconnected(self, client: Any) -> None:
        self.tls.pop(client.id, None)


def follow_owner(gate: Gate, stop: Any) -> None:
    """Commands from the owner (a thread: stdin is a pipe); EOF stops the proxy."""
    for line in sys.stdin:
        try:
            data = json.loads(line)
            if data["op"] == "vm":
                gate.sandboxes[str(data["address"])] = Sandbox.parse(data)
            elif data["op"] == "drop":
                gate.sandboxes.pop(str(data["address"]), None)
        except (ValueError, KeyError, TypeError) as exc:
            print(f"agent-vm proxy: bad command ignored: {type(exc).__name__}", file=sys.stderr)
    stop()


class Ready:
    def __init__(self, port: int) -> None:
        self.port = port

    def running(self) -> None:
        emit({"ev": "ready", "port": self.port})


async def serve(args: argparse.Namespace) -> None:
    upstreams = [(h, int(p)) for h, _, p in (u.partition(":") for u in args.dns)]
    gate = Gate(Names(upstreams))
    opts = options.Options()
    proxy = master.Master(opts, event_loop=asyncio.get_running_loop(), with_termlog=False)
    # only what a transparent proxy needs: every addon is asked on every event
    proxy.addons.add(
        core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig(),
        disable_h2c.DisableH2C(), gate, Ready(args.port),
    )  # fmt: skip
    opts.update(
        mode=[f"transparent@{args.listen}:{args.port}"],
        confdir=args.confdir,
        connection_strategy="lazy",
        upstream_cert=False,
        ssl_verify_upstream_trusted_ca=args.upstream_ca,
        stream_large_bodies="1m",
    )
    threading.Thread(target=follow_owner, args=(gate, proxy.shutdown), daemon=True).start()
    await proxy.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--confdir", required=True)
    parser.add_argument("--upstream-ca", required=True)
    parser.add_argument("--dns", action="append", default=[])
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
