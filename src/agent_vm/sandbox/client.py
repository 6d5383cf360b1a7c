"""One connection to one ``agent-vm serve`` (httpx; the shared half of the HTTP
backend): where the server is, which token to send, errors back as the classes the
server raised (``errors.from_wire``), and events followed across dropped connections.

A command's events are followed with the last sequence number seen: a dropped stream is
picked up again with backoff, and a server that does not come back within
``reconnect_seconds`` ends the wait with ``ServerUnavailableError``, never a spin.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from agent_vm.api.local import default_socket, read_local_token
from agent_vm.errors import ConfigError, ServerUnavailableError, from_wire

RECONNECT_SECONDS = 30.0
BACKOFF = (0.05, 2.0)  # first and longest pause between reconnects


def transport_for(server: str) -> tuple[str, httpx.AsyncHTTPTransport | None]:
    if server.startswith(("http://", "https://")):
        return server.rstrip("/"), None
    path = server.removeprefix("unix://")
    if not path.startswith("/"):
        raise ConfigError(f"server {server!r}: give http(s)://HOST:PORT or a socket path")
    return "http://agent-vm", httpx.AsyncHTTPTransport(uds=path)


def resolve_token(server: str, token: str | None) -> str:
    """The token to send: the caller's, ``$AGENT_VM_TOKEN``, else the local token of a
    server on this host's socket (readable by root only)."""
    found = token or os.environ.get("AGENT_VM_TOKEN")
    if not found and not server.startswith(("http://", "https://")):
        found = read_local_token(server)
    if not found:
        raise ConfigError(
            "a server needs a token",
            hint="token=..., or AGENT_VM_TOKEN=avm_... in the environment",
        )
    return found


def raise_for(response: httpx.Response) -> None:
    """The server's refusal as the error class it raised (``response`` read)."""
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text.strip() or f"HTTP {response.status_code}"}
    raise from_wire(response.status_code, body)


class ServerClient:
    """One connection pool to one server, for every sandbox of a backend."""

    def __init__(
        self, server: str | None, token: str | None, reconnect_seconds: float = RECONNECT_SECONDS
    ) -> None:
        self.server = server or default_socket()
        base, transport = transport_for(self.server)
        self.token = resolve_token(self.server, token)
        self.reconnect_seconds = reconnect_seconds
        self.http = httpx.AsyncClient(
            base_url=base, transport=transport, headers={"Authorization": f"Bearer {self.token}"},
            timeout=httpx.Timeout(60.0, read=None),
        )  # fmt: skip

    def unavailable(self, exc: BaseException, doing: str) -> ServerUnavailableError:
        return ServerUnavailableError(
            f"cannot reach the agent-vm server at {self.server} ({doing}): {exc}",
            hint="is `agent-vm serve` running there?",
        )

    async def call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self.http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise self.unavailable(exc, f"{method} {url}") from exc
        raise_for(response)
        return response

    async def json(self, method: str, url: str, **kwargs: Any) -> Any:
        return (await self.call(method, url, **kwargs)).json()

    async def events(self, url: str, after: int, what: str) -> AsyncIterator[dict[str, Any]]:
        """Server-sent events from ``after`` on, resumed where they broke off; gives up
        after ``reconnect_seconds`` without an answer."""
        pause = BACKOFF[0]
        failing_since: float | None = None
        while True:
            try:
                async with aconnect_sse(self.http, "GET", url, params={"after": after}) as source:
                    if source.response.status_code >= 400:
                        await source.response.aread()
                        raise_for(source.response)
                    async for sse in source.aiter_sse():
                        data = json.loads(sse.data)
                        after = int(data.get("seq", after))
                        failing_since, pause = None, BACKOFF[0]
                        yield data
                # the stream ended before the caller had what it follows: pick it up again
                raise httpx.RemoteProtocolError("the event stream ended early")
            except httpx.HTTPError as exc:
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since >= self.reconnect_seconds:
                    raise ServerUnavailableError(
                        f"lost the agent-vm server at {self.server} during {what}: no answer "
                        f"for {self.reconnect_seconds:g} s ({exc})",
                        hint="the server may have stopped; the command's fate is unknown",
                    ) from exc
                await asyncio.sleep(pause)
                pause = min(pause * 2, BACKOFF[1])

    async def close(self) -> None:
        await self.http.aclose()
