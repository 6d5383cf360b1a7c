"""``agent-vm serve``: the API on a Unix socket (default) or TCP, in the foreground.

The runtime, the warm pools (a ``LocalBackend``) and the service live for the server's
lifespan; uvicorn's graceful shutdown (SIGTERM, Ctrl-C) runs the service's close, which
releases every sandbox, and the lifespan's end removes the socket and the local token
(uvicorn re-raises the signal afterwards, so nothing after ``run()`` would run). A server
killed with SIGKILL leaves its VMs behind: the next start's runtime reaps domains of
agent-vm processes that are gone (as every agent-vm process does).

One server per audit log: the log's lock is taken before anything else, so a second
server on the same state directory refuses to start instead of interleaving its chain.
"""

from __future__ import annotations

import contextlib
import os
import socket as socket_module
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from agent_vm.api.admission import PoolSpec
from agent_vm.api.app import create_app
from agent_vm.api.e2b.app import E2BApp, E2BListener, bind
from agent_vm.api.local import default_socket, local_token_path, write_local_token
from agent_vm.api.service import SandboxService
from agent_vm.api.tokens import TokenStore
from agent_vm.api.watch import Watch
from agent_vm.config import Settings
from agent_vm.errors import ConfigError
from agent_vm.execution.pool import VMPool
from agent_vm.execution.runtime import Runtime
from agent_vm.logs import get_logger
from agent_vm.monitoring.audit import AuditLogger
from agent_vm.sandbox.localbackend import LocalBackend, PoolKey

log = get_logger(__name__)


def _listening(path: Path) -> bool:
    probe = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


@dataclass(frozen=True)
class E2BDoor:
    """``serve --e2b-port``: the door's socket, bound early, and its TLS files."""

    listener: socket_module.socket
    tls_cert: Path | None = None
    tls_key: Path | None = None
    internet: str = "nat"  # the network of an E2B sandbox that wants the internet

    @classmethod
    def open(
        cls, host: str, port: int, cert: Path | None, key: Path | None, internet: str = "nat"
    ) -> E2BDoor:
        if internet not in ("nat", "isolated"):
            raise ConfigError(f"--e2b-network {internet!r}: nat or isolated")
        try:
            return cls(bind(host, port), cert, key, internet)
        except OSError as exc:
            raise ConfigError(
                f"the E2B door cannot listen on {host}:{port}: {exc.strerror}",
                hint="pick another --e2b-port",
            ) from None


def token_store(settings: Settings) -> TokenStore:
    return TokenStore(settings.tokens_path)


def build_app(
    settings: Settings,
    pool_specs: list[PoolSpec],
    workspace_root: Path | None = None,
    tokens: TokenStore | None = None,
    audit: AuditLogger | None = None,
    leftovers: tuple[Path, ...] = (),
    e2b: E2BDoor | None = None,
    ports_host: str = "127.0.0.1",
) -> FastAPI:
    """The app over a local backend. ``audit``: the log, already locked (else opened
    here); ``leftovers``: files the lifespan's end removes (socket, local token);
    ``e2b``: the E2B door's bound socket (and TLS files), served beside the app."""
    holder: dict[str, SandboxService] = {}

    def current() -> SandboxService:
        return holder["service"]

    tokens = tokens or token_store(settings)
    app = create_app(current, tokens)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings)
        pools: dict[PoolKey, VMPool] = {}
        listener: E2BListener | None = None
        log_file = audit or AuditLogger(
            settings.audit_path, max_bytes=settings.audit_max_bytes, keep=settings.audit_keep
        )
        try:
            await runtime.start()
            for spec in pool_specs:
                pool = VMPool(
                    spec.min_size, spec.max_size, image=spec.image, profile=spec.profile,
                    network=spec.network, runtime=runtime,
                )  # fmt: skip
                await pool.initialize()
                pools[PoolKey(spec.image, spec.profile, spec.network)] = pool
            backend = LocalBackend(runtime, pools=pools)
            watch = Watch(
                settings, audit=log_file, connection=lambda: runtime.connection.connection,
                pools=backend.pool_stats,
                held=backend.held_figures,
            )  # fmt: skip
            service = SandboxService(backend, watch, workspace_root, ports_host)
            service.start()
            holder["service"] = service
            guard = await runtime.guard()  # its proxy's reports: audit log and metrics
            guard.proxy_listeners.append(service.egress_event)
            if e2b is not None:
                door = E2BApp(current, tokens, app.state.on_auth_failure, e2b.internet)
                listener = E2BListener(door, e2b.listener, e2b.tls_cert, e2b.tls_key)
                await listener.start()
            log.info("server_ready", pools=len(pools))
            yield
            if listener is not None:
                await listener.stop()
            await service.close()
            await backend.close()
        finally:
            if listener is not None:
                await listener.stop()
            log_file.close()
            for pool in pools.values():
                with contextlib.suppress(Exception):
                    await pool.shutdown()
            await runtime.close()
            for path in leftovers:
                path.unlink(missing_ok=True)
            log.info("server_stopped")

    app.router.lifespan_context = lifespan
    return app


def serve(
    settings: Settings,
    pool_specs: list[PoolSpec],
    *,
    socket: Path | None = None,
    host: str | None = None,
    port: int | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    workspace_root: Path | None = None,
    e2b_port: int | None = None,
    e2b_network: str = "nat",
) -> None:
    """Run until SIGTERM/SIGINT. TCP when ``host`` or ``port`` is given (``port`` alone:
    127.0.0.1; TLS with cert and key), else the Unix socket. ``e2b_port``: the E2B door
    too, on ``host`` (default 127.0.0.1) with the same TLS."""
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if workspace_root is not None and not workspace_root.is_dir():
        raise ConfigError(f"--workspace-root {workspace_root}: not a directory")
    if socket is not None and (host is not None or port is not None):
        raise ConfigError("--socket, or --host/--port: one of them")
    audit = AuditLogger(
        settings.audit_path, max_bytes=settings.audit_max_bytes, keep=settings.audit_keep
    )  # locked here: a second server on this log stops now, before it touches anything
    tokens = token_store(settings)
    e2b = None
    if e2b_port is not None:
        try:
            e2b = E2BDoor.open(host or "127.0.0.1", e2b_port, tls_cert, tls_key, e2b_network)
        except ConfigError:
            audit.close()
            raise
    if host is not None or port is not None:
        app = build_app(
            settings, pool_specs, workspace_root, tokens, audit, e2b=e2b,
            ports_host=host or "127.0.0.1",
        )  # fmt: skip
        config = uvicorn.Config(
            app, host=host or "127.0.0.1", port=port or 8177, log_level="warning",
            ssl_certfile=tls_cert, ssl_keyfile=tls_key,
        )  # fmt: skip
        log.info("server_listening", host=config.host, port=config.port)
        uvicorn.Server(config).run()
        return
    path = socket or Path(default_socket())
    path.parent.mkdir(parents=True, exist_ok=True)
    if _listening(path):
        audit.close()
        raise ConfigError(
            f"a server is already listening on {path}", hint="stop it, or use --socket"
        )
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a dead server's
    listener = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is root's only from its first moment (tokens still apply)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    # Root on this host may use the server without a token of its own (see issue_local).
    token_file = write_local_token(path, tokens.issue_local())
    app = build_app(
        settings,
        pool_specs,
        workspace_root,
        tokens,
        audit,
        leftovers=(path, token_file),
        e2b=e2b,
    )
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listener])
    finally:
        for leftover in (path, local_token_path(path)):
            leftover.unlink(missing_ok=True)
