"""The services of a test host; run inside its network namespace by ``testnet.py``.

HTTP on 80 and 8080 (``/`` names the port and the client, ``/bytes/N`` sends N bytes),
a TCP listener on 22 that sends an SSH-like banner, UDP echo on 443 and 5000, and a DNS
server on 53 (UDP and TCP) answering the names of a zone given as JSON. Prints "ready"
once everything listens. Only ever answers; it never opens a connection itself.
"""

from __future__ import annotations

import json
import socket
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dnslib import QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSRecord, DNSServer

HTTP_PORTS = (80, 8080)
BANNER_PORT = 22
UDP_ECHO_PORTS = (443, 5000)
CHUNK = b"x" * 65536


class _HTTP(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.startswith("/bytes/"):
            size = int(self.path.removeprefix("/bytes/"))
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            while size > 0:
                chunk = CHUNK[: min(size, len(CHUNK))]
                self.wfile.write(chunk)
                size -= len(chunk)
            return
        port = self.server.server_port  # type: ignore[attr-defined]  # an HTTPServer
        body = f"hello from port {port} to {self.client_address[0]}\n"
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        return


class _Banner(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(b"SSH-2.0-agentvm-testhost\r\n")


class _Zone(BaseResolver):  # type: ignore[misc]
    def __init__(self, zone: dict[str, str]) -> None:
        self.zone = {name.lower().rstrip("."): address for name, address in zone.items()}

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()
        name = str(request.q.qname).lower().rstrip(".")
        if name not in self.zone:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype == QTYPE.A:
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(self.zone[name]), ttl=60))
        return reply


def _udp_echo(port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(data, peer)


class _TCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main() -> None:
    zone = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    servers: list[socketserver.BaseServer] = []
    for port in HTTP_PORTS:
        http = ThreadingHTTPServer(("0.0.0.0", port), _HTTP)
        http.daemon_threads = True
        servers.append(http)
    servers.append(_TCPServer(("0.0.0.0", BANNER_PORT), _Banner))
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    for port in UDP_ECHO_PORTS:
        threading.Thread(target=_udp_echo, args=(port,), daemon=True).start()
    resolver = _Zone(zone)
    for tcp in (False, True):
        quiet = DNSLogger(logf=lambda _: None)
        dns = DNSServer(resolver, port=53, address="0.0.0.0", tcp=tcp, logger=quiet)
        dns.start_thread()
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes our stdin (or dies)


if __name__ == "__main__":
    main()
