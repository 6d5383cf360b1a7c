"""The E2B door: one ASGI app on its own listener (``serve --e2b-port``), E2B's control
plane and every sandbox's envd, told apart by whether the request names a sandbox.
It runs in the server's process, over the server's service: a second front door, not
a second implementation. ``E2BListener`` runs it beside the main app (started and
stopped by the main app's lifespan, so one Ctrl-C or SIGTERM stops both).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import uvicorn
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from agent_vm.api.e2b import snapshots
from agent_vm.api.e2b.control import create_control
from agent_vm.api.e2b.envd import Envd, sandbox_of
from agent_vm.api.service import SandboxService
from agent_vm.api.tokens import TokenStore
from agent_vm.logs import get_logger

log = get_logger(__name__)


class E2BApp:
    def __init__(
        self, service: Callable[[], SandboxService], tokens: TokenStore,
        on_auth_failure: Callable[[str, str], None], internet: str = "nat",
    ) -> None:  # fmt: skip
        self.control = create_control(
            service, tokens, on_auth_failure, (snapshots.router,), internet
        )
        self.envd = Envd(service, tokens)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and sandbox_of(Headers(scope=scope)) is not None:
            await self.envd(scope, receive, send)
        elif scope["type"] == "http" and scope["path"] == "/files" and _signed(scope):
            await self.envd.signed(scope, receive, send)
        else:
            await self.control(scope, receive, send)


def _signed(scope: Scope) -> bool:
    return b"signature=" in scope.get("query_string", b"")


class _Quiet(uvicorn.Server):
    """A uvicorn server that leaves signals to the main one."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """The door's listening socket, bound before anything starts (a port in use is
    one clear line, not a server half up)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(128)
    listener.set_inheritable(True)
    return listener


class E2BListener:
    def __init__(
        self, app: E2BApp, listener: socket.socket,
        tls_cert: Path | None = None, tls_key: Path | None = None,
    ) -> None:  # fmt: skip
        host, port = listener.getsockname()[:2]
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", lifespan="off",
            ssl_certfile=tls_cert, ssl_keyfile=tls_key, timeout_graceful_shutdown=5,
        )  # fmt: skip
        self.listener = listener
        self.server = _Quiet(config)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.listener]))
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises what stopped it (the port is taken, ...)
                raise OSError("the E2B listener stopped at once")
            await asyncio.sleep(0.05)
        log.info("e2b_listening", host=self.server.config.host, port=self.server.config.port)

    async def stop(self) -> None:
        if self.task is not None:
            self.server.should_exit = True
            with contextlib.suppress(Exception):
                await self.task
