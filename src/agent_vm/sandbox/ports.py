"""A TCP port inside a sandbox, reachable from a port on the host (HTTP, WebSocket, any
protocol over one TCP connection), in every network mode.

Each connection accepted on the host's listener becomes a relay command in the guest
(a stdlib Python one-liner connected to ``127.0.0.1:PORT`` there): the client's bytes go
in as the command's stdin, the port's bytes come back as its stdout. So the tunnel runs
over the control channel (no network needed: isolated sandboxes too), through the same
``SandboxHandle.run`` the SDK and the server use (a server's sandbox too), and ends with
the sandbox. The price is one process start in the guest per connection.

With a token (a server's forwarders always have one), the first request of every
connection must carry it: header ``X-Agent-VM-Port-Token``, or ``agentvm_token=`` in the
query (then a cookie carries it for a browser's next requests). Without it the client
gets a 403 and the guest is never asked. The request head is parsed with h11.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import Awaitable, Callable
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlsplit

import h11

from agent_vm.errors import AgentVMError
from agent_vm.logs import get_logger
from agent_vm.sandbox.base import CommandSpec, Exit, Output, SandboxHandle

log = get_logger(__name__)

RELAY = """\
import os, socket, sys, threading
try:
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
except OSError as e:
    sys.exit(f"port {sys.argv[1]}: {e.strerror}")
s.settimeout(None)
def up():
    while (d := os.read(0, 65536)):
        s.sendall(d)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while (d := s.recv(65536)):
    os.write(1, d)
"""
HEAD_LIMIT = 64 * 1024  # a request head bigger than this is refused
HEAD_TIMEOUT = 30.0
TOKEN_HEADER = b"x-agent-vm-port-token"
TOKEN_QUERY = "agentvm_token"  # noqa: S105 - a parameter's name
COOKIE = "agentvm_port_token"


def _reply(status: int, text: str, extra: str = "") -> bytes:
    body = f"agent-vm: {text}\n".encode()
    reason = {403: "Forbidden", 502: "Bad Gateway"}[status]
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\n{extra}"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


async def _head(reader: asyncio.StreamReader) -> tuple[bytes, h11.Request | None]:
    """The bytes of the first request head and the request (None: not HTTP)."""
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_LIMIT)
    seen = b""
    while True:
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError:  # not HTTP, or a head past the limit
            return seen, None
        if isinstance(event, h11.Request):
            return seen, event
        if event is not h11.NEED_DATA or len(seen) > HEAD_LIMIT:
            return seen, None
        data = await reader.read(65536)
        if not data:
            return seen, None
        seen += data
        parser.receive_data(data)


def presented(request: h11.Request) -> tuple[str | None, bool]:
    """The token a request carries, and whether it came in the query (set a cookie)."""
    for name, value in request.headers:
        if name == TOKEN_HEADER:
            return value.decode("latin-1"), False
        if name == b"cookie":
            cookie: SimpleCookie = SimpleCookie()
            with contextlib.suppress(Exception):
                cookie.load(value.decode("latin-1"))
            if COOKIE in cookie:
                return cookie[COOKIE].value, False
    query = parse_qs(urlsplit(request.target.decode("latin-1")).query)
    given = query.get(TOKEN_QUERY)
    return (given[0], True) if given else (None, False)


class PortForwarder:
    """One sandbox port on a host listener; ``close`` ends it and its connections."""

    def __init__(
        self, handle: Callable[[], Awaitable[SandboxHandle]], port: int, token: str | None = None
    ) -> None:
        if not 0 < port < 65536:
            raise AgentVMError(f"port {port} is not a TCP port (1-65535)")
        self._handle = handle
        self.port = port
        self.token = token
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.address: tuple[str, int] = ("", 0)

    async def start(self, host: str = "127.0.0.1") -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, host, 0)
        name = self._server.sockets[0].getsockname()
        self.address = (str(name[0]), int(name[1]))
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            first = b""
            if self.token is not None:
                try:
                    first, request = await asyncio.wait_for(_head(reader), HEAD_TIMEOUT)
                except TimeoutError:
                    return
                given, from_query = presented(request) if request else (None, False)
                if given is None or not hmac.compare_digest(given, self.token):
                    where = f"header X-Agent-VM-Port-Token or ?{TOKEN_QUERY}="
                    writer.write(_reply(403, f"port {self.port}: no valid port token ({where})"))
                    return
                if from_query:  # a browser: the same URL again, the token in a cookie
                    assert request is not None
                    writer.write(_redirect(request.target, self.token))
                    return
            await self._relay(first, reader, writer)
        finally:
            with contextlib.suppress(Exception):
                await writer.drain()
            writer.close()

    async def _relay(
        self, first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            handle = await self._handle()
            command = await handle.run(CommandSpec(
                cmd=("python3", "-c", RELAY, str(self.port)), stdin=first or None,
                stdin_open=True, timeout=None,
            ))  # fmt: skip
        except AgentVMError as exc:
            writer.write(_reply(502, f"sandbox port {self.port}: {exc.message}"))
            return

        async def upstream() -> None:
            while data := await reader.read(65536):
                await command.send_stdin(data)
            await command.close_stdin()

        feeding = asyncio.create_task(upstream())
        failed = b""
        sent = False
        try:
            async for event in command.follow():
                if isinstance(event, Output) and event.stream == "stdout":
                    writer.write(event.data)
                    await writer.drain()
                    sent = True
                elif isinstance(event, Output):
                    failed += event.data[:1024]
                elif isinstance(event, Exit) and event.exit_code and not sent:
                    text = failed.decode(errors="replace").strip().splitlines()
                    writer.write(_reply(502, text[-1] if text else f"port {self.port}: closed"))
        except (ConnectionError, AgentVMError) as exc:
            log.info("port_connection_ended", port=self.port, reason=str(exc))
        finally:
            feeding.cancel()
            with contextlib.suppress(asyncio.CancelledError, AgentVMError, ConnectionError):
                await feeding
            with contextlib.suppress(AgentVMError):
                await command.kill()


def _redirect(target: bytes, token: str) -> bytes:
    """303 to ``target`` without the token, which goes into a cookie for this origin."""
    parts = urlsplit(target.decode("latin-1"))
    query = "&".join(
        f"{k}={v}" for k, values in parse_qs(parts.query, keep_blank_values=True).items()
        if k != TOKEN_QUERY for v in values
    )  # fmt: skip
    location = parts.path + (f"?{query}" if query else "")
    cookie = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
    return (
        f"HTTP/1.1 303 See Other\r\nlocation: {location or '/'}\r\nset-cookie: {cookie}\r\n"
        "content-length: 0\r\nconnection: close\r\n\r\n"
    ).encode()
