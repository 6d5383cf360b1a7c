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
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from agent_vm.api.admission import PoolSpec
from agent_vm.api.app import create_app
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


def token_store(settings: Settings) -> TokenStore:
    return TokenStore(settings.tokens_path)


def build_app(
    settings: Settings,
    pool_specs: list[PoolSpec],
    workspace_root: Path | None = None,
    tokens: TokenStore | None = None,
    audit: AuditLogger | None = None,
    leftovers: tuple[Path, ...] = (),
) -> FastAPI:
    """The app over a local backend. ``audit``: the log, already locked (else opened
    here); ``leftovers``: files the lifespan's end removes (socket, local token)."""
    holder: dict[str, SandboxService] = {}

    def current() -> SandboxService:
        return holder["service"]

    app = create_app(current, tokens or token_store(settings))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings)
        pools: dict[PoolKey, VMPool] = {}
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
            service = SandboxService(backend, watch, workspace_root)
            service.start()
            holder["service"] = service
            log.info("server_ready", pools=len(pools))
            yield
            await service.close()
            await backend.close()
        finally:
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
) -> None:
    """Run until SIGTERM/SIGINT. TCP when ``host`` or ``port`` is given (``port`` alone:
    127.0.0.1; TLS with cert and key), else the Unix socket."""
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
    if host is not None or port is not None:
        app = build_app(settings, pool_specs, workspace_root, tokens, audit)
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
        settings, pool_specs, workspace_root, tokens, audit, leftovers=(path, token_file)
    )
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listener])
    finally:
        for leftover in (path, local_token_path(path)):
            leftover.unlink(missing_ok=True)
