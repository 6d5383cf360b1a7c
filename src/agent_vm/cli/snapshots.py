"""``agent-vm snapshot list|rm``: snapshots of sandboxes (taken with the SDK or the API:
``sb.snapshot(name)``), here or on a server; ``agent-vm run --snapshot NAME`` starts
from one."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from agent_vm.cli.common import fail
from agent_vm.errors import AgentVMError

snapshot_app = typer.Typer(
    help="Snapshots: running sandboxes captured (memory and disk) to start new ones from.",
    no_args_is_help=True,
)
Server = Annotated[
    str | None, typer.Option(help="an `agent-vm serve` (URL or socket; default: this host)")
]
Token = Annotated[str | None, typer.Option(help="the server's token (default: $AGENT_VM_TOKEN)")]


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


@snapshot_app.command("list")
def list_snapshots(server: Server = None, token: Token = None) -> None:
    """Snapshots you can start sandboxes from (agent-vm run --snapshot NAME)."""
    from agent_vm.cli.run import server_for
    from agent_vm.sandbox import AsyncSandbox

    try:
        where = server_for(server, token)
        found = asyncio.run(AsyncSandbox.list_snapshots(server=where, token=token))
    except AgentVMError as exc:
        raise fail(exc) from exc
    table = Table(show_header=True, header_style="bold")
    for column in ("name", "created", "image", "profile", "network", "from", "memory", "disk"):
        table.add_column(column)
    for info in found:
        table.add_row(
            info.name, info.created_at.isoformat(timespec="seconds"), info.image, info.profile,
            info.network, info.source, _mib(info.memory_bytes), _mib(info.disk_bytes),
        )  # fmt: skip
    Console().print(table)


@snapshot_app.command("rm")
def remove(
    name: Annotated[str, typer.Argument(help="the snapshot's name")],
    server: Server = None,
    token: Token = None,
) -> None:
    """Remove a snapshot (refused while sandboxes started from it exist)."""
    from agent_vm.cli.run import server_for
    from agent_vm.sandbox import AsyncSandbox

    try:
        where = server_for(server, token)
        asyncio.run(AsyncSandbox.remove_snapshot(name, server=where, token=token))
    except AgentVMError as exc:
        raise fail(exc) from exc
    typer.echo(f"removed snapshot {name}")
