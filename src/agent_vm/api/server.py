"""``agent-vm serve``: the API on a Unix socket (default) or TCP, in the foreground.

The runtime, the warm pools and the service live for the server's lifespan; uvicorn's
graceful shutdown (SIGTERM, Ctrl-C) runs the service's close, which releases every
sandbox. A server killed with SIGKILL leaves its VMs behind: the next start's runtime
reaps domains of agent-vm processes that are gone (as every agent-vm process does).
"""

from __future__ import annotations

import contextlib
import os
import socket as socket_module
from collections.abc import AsyncIterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from agent_vm.api.app import create_app
from agent_vm.api.local import default_socket, write_local_token
from agent_vm.api.service import LocalSource, PoolSpec, SandboxService
from agent_vm.api.tokens import TokenStore
from agent_vm.api.watch import Watch
from agent_vm.config import Settings
from agent_vm.errors import ConfigError
from agent_vm.execution.pool import VMPool
from agent_vm.execution.runtime import Runtime
from agent_vm.logs import get_logger
from agent_vm.monitoring.audit import AuditLogger

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
    return TokenStore(settings.state_dir / "tokens.json")


def build_app(
    settings: Settings,
    pool_specs: list[PoolSpec],
    workspace_root: Path | None = None,
    tokens: TokenStore | None = None,
) -> FastAPI:
    holder: dict[str, SandboxService] = {}

    def current() -> SandboxService:
        return holder["service"]

    app = create_app(current, tokens or token_store(settings))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings)
        await runtime.start()
        pools: dict[PoolSpec, VMPool] = {}
        try:
            for spec in pool_specs:
                pool = runtime.pool(
                    spec.min_size, spec.max_size, image=spec.image, profile=spec.profile,
                    network=spec.network,
                )  # fmt: skip
                await pool.initialize()
                pools[spec] = pool
            audit = AuditLogger(
                settings.audit_path, max_bytes=settings.audit_max_bytes, keep=settings.audit_keep
            )
            service = SandboxService(
                runtime, LocalSource(runtime, pools), workspace_root,
                Watch(settings, audit=audit),
            )  # fmt: skip
            service.start()
            holder["service"] = service
            log.info("server_ready", pools=len(pools))
            yield
            await service.close()
        finally:
            for pool in pools.values():
                with contextlib.suppress(Exception):
                    await pool.shutdown()
            await runtime.close()
            log.info("server_stopped")

    app.router.lifespan_context = lifespan
    return app


def serve(
    settings: Settings,
    pool_specs: list[PoolSpec],
    *,
    socket: Path | None = None,
    host: str | None = None,
    port: int = 8177,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    workspace_root: Path | None = None,
) -> None:
    """Run until SIGTERM/SIGINT. TCP when ``host`` is given (TLS with cert and key)."""
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if workspace_root is not None and not workspace_root.is_dir():
        raise ConfigError(f"--workspace-root {workspace_root}: not a directory")
    tokens = token_store(settings)
    app = build_app(settings, pool_specs, workspace_root, tokens)
    if host is not None:
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", ssl_certfile=tls_cert,
            ssl_keyfile=tls_key,
        )  # fmt: skip
        uvicorn.Server(config).run()
        return
    socket = socket or Path(default_socket())
    socket.parent.mkdir(parents=True, exist_ok=True)
    if _listening(socket):
        raise ConfigError(
            f"a server is already listening on {socket}", hint="stop it, or use --socket"
        )
    with contextlib.suppress(FileNotFoundError):
        socket.unlink()  # a dead server's
    listener = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is root's only from its first moment (tokens still apply)
    try:
        listener.bind(str(socket))
    finally:
        os.umask(old)
    # Root on this host may use the server without a token of its own (see issue_local).
    token_file = write_local_token(socket, tokens.issue_local())
    try:
        config = uvicorn.Config(app, log_level="warning")
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        token_file.unlink(missing_ok=True)
