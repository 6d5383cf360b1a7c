"""Serving: ``serve``, ``service install`` (systemd) and ``token create|list|revoke``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from agent_vm.cli.common import fail
from agent_vm.errors import AgentVMError, ConfigError

if TYPE_CHECKING:
    from agent_vm.api.tokens import TokenStore

service_app = typer.Typer(help="Run `agent-vm serve` as a systemd service.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens for `agent-vm serve`.", no_args_is_help=True)


def serve(
    socket: Annotated[
        Path | None,
        typer.Option(
            help="the Unix socket to listen on, root's, 0600 (default: $AGENT_VM_SOCKET, "
            "else /run/agent-vm/api.sock)"
        ),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="listen on TCP at this address instead (e.g. 127.0.0.1)")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="listen on TCP on this port (default 8177; alone: 127.0.0.1)")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate (PEM), TCP only")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="TLS private key (PEM)")] = None,
    pool: Annotated[
        list[str] | None,
        typer.Option(help="a warm pool, IMAGE:PROFILE:NETWORK:MIN:MAX (IMAGE empty: default)"),
    ] = None,
    workspace_root: Annotated[
        Path | None,
        typer.Option(help="clients may share directories below this one (else none)"),
    ] = None,
    e2b_port: Annotated[
        int | None,
        typer.Option(help="also speak E2B's API on this port (on --host, default 127.0.0.1)"),
    ] = None,
    e2b_network: Annotated[
        str, typer.Option(help="E2B sandboxes that want the internet get: nat, or isolated")
    ] = "nat",
) -> None:
    """Serve the HTTP API in the foreground (Ctrl-C or SIGTERM stops it and its sandboxes).

    Clients need a token: `agent-vm token create NAME`. OpenAPI at /openapi.json.
    """
    from agent_vm.api.admission import PoolSpec
    from agent_vm.api.server import serve as run_server
    from agent_vm.config import load_settings

    try:
        specs = [PoolSpec.parse(item) for item in pool or []]
        run_server(
            load_settings(), specs, socket=socket, host=host, port=port, tls_cert=tls_cert,
            tls_key=tls_key, workspace_root=workspace_root, e2b_port=e2b_port,
            e2b_network=e2b_network,
        )  # fmt: skip
    except AgentVMError as exc:
        raise fail(exc) from exc


def mcp(
    server: Annotated[
        str | None, typer.Option(help="an agent-vm server (default: the local one, else VMs here)")
    ] = None,
    token: Annotated[str | None, typer.Option(help="its token (default $AGENT_VM_TOKEN)")] = None,
    image: Annotated[str | None, typer.Option(help="the image sandboxes start from")] = None,
) -> None:
    """Serve sandboxes as MCP tools on stdin/stdout (e.g. `claude mcp add agent-vm --
    agent-vm mcp`): create, run, read, write, list, remove."""
    import asyncio
    import os

    from agent_vm.api.mcptools import run_stdio
    from agent_vm.cli.run import server_for

    token = token or os.environ.get("AGENT_VM_TOKEN")
    try:
        asyncio.run(run_stdio(server_for(server, token), token, image))
    except AgentVMError as exc:
        raise fail(exc) from exc


@service_app.command("install")
def service_install(
    pool: Annotated[
        list[str] | None, typer.Option(help="warm pools, as for serve (IMAGE:PROFILE:NET:MIN:MAX)")
    ] = None,
    print_only: Annotated[
        bool, typer.Option("--print", help="print the unit, change nothing")
    ] = False,
) -> None:
    """Install /etc/systemd/system/agent-vm.service (and enable it) on a host with systemd."""
    import subprocess

    from agent_vm.api.admission import PoolSpec
    from agent_vm.api.systemd import UNIT_PATH, has_systemd, render_unit

    try:
        for item in pool or []:
            PoolSpec.parse(item)
    except AgentVMError as exc:
        raise fail(exc) from exc
    launcher = Path(__file__).resolve().parents[3] / "agent-vm"
    args = [part for item in pool or [] for part in ("--pool", item)]
    unit = render_unit(launcher, args)
    if print_only:
        typer.echo(unit, nl=False)
        return
    if not has_systemd():
        raise fail(
            ConfigError(
                "this host does not run systemd",
                hint="run `./agent-vm serve` in the foreground (or under your supervisor)",
            )
        )
    UNIT_PATH.write_text(unit)
    subprocess.run(["systemctl", "daemon-reload"], check=True)
    subprocess.run(["systemctl", "enable", "--now", "agent-vm.service"], check=True)
    typer.echo(f"installed and started {UNIT_PATH}")


def _tokens() -> TokenStore:
    from agent_vm.api.server import token_store
    from agent_vm.config import load_settings

    return token_store(load_settings())


@token_app.command("create")
def token_create(
    name: str,
    max_sandboxes: Annotated[int, typer.Option(help="sandboxes at once")] = 8,
    max_executions: Annotated[int, typer.Option(help="executions running at once")] = 16,
    max_snapshot_gib: Annotated[
        float, typer.Option(help="GiB of disk its snapshots may hold")
    ] = 20.0,
    metrics: Annotated[
        bool, typer.Option("--metrics", help="may read /metrics (every tenant's figures)")
    ] = False,
    e2b: Annotated[
        bool, typer.Option("--e2b", help="print it in E2B's key form too (for E2B_API_KEY)")
    ] = False,
) -> None:
    """Create a token; it is printed once and stored only as a hash."""
    try:
        _, token = _tokens().create(
            name, max_sandboxes=max_sandboxes, max_executions=max_executions, metrics=metrics,
            max_snapshot_gib=max_snapshot_gib,
        )  # fmt: skip
    except AgentVMError as exc:
        raise fail(exc) from exc
    if e2b:
        from agent_vm.api.tokens import e2b_key

        typer.echo(f"export AGENT_VM_TOKEN={token}\nexport E2B_API_KEY={e2b_key(token)}")
        return
    typer.echo(token)


@token_app.command("list")
def token_list() -> None:
    """List tokens (never their values)."""
    table = Table("id", "name", "created", "sandboxes", "executions", "metrics", "state")
    for record in _tokens().all():
        table.add_row(
            record.id, record.name, record.created_at.isoformat(timespec="seconds"),
            str(record.max_sandboxes), str(record.max_executions),
            "yes" if record.metrics else "no", "revoked" if record.revoked else "active",
        )  # fmt: skip
    Console().print(table)


@token_app.command("revoke")
def token_revoke(name_or_id: str) -> None:
    """Revoke a token: requests with it get 401 from then on."""
    try:
        record = _tokens().revoke(name_or_id)
    except AgentVMError as exc:
        raise fail(exc) from exc
    typer.echo(f"revoked {record.id} ({record.name})")
