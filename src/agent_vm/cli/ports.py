"""``agent-vm port SANDBOX PORT``: a URL on the server's host for a port inside one of
its sandboxes (a web app an agent started, its WebSocket too), while the sandbox runs."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from agent_vm.cli.common import fail
from agent_vm.cli.snapshots import Server, Token
from agent_vm.errors import AgentVMError, ConfigError
from agent_vm.sandbox.base import ExposedPort


def port(
    sandbox: Annotated[str, typer.Argument(help="the sandbox's id (agent-vm top lists them)")],
    number: Annotated[int, typer.Argument(metavar="PORT", help="a TCP port inside it")],
    server: Server = None,
    token: Token = None,
) -> None:
    """Print a URL that reaches PORT inside a server's sandbox, and the port token every
    connection's first request must carry (header X-Agent-VM-Port-Token)."""
    from agent_vm.cli.run import server_for
    from agent_vm.sandbox import AsyncSandbox

    async def expose(where: str) -> ExposedPort:
        sb = await AsyncSandbox.connect(sandbox, server=where, token=token)
        return await sb.expose(number)

    try:
        where = server_for(server, token)
        if where is None:
            raise ConfigError(
                "agent-vm port needs a server (a sandbox lives in the process that made it)",
                hint="start one with `agent-vm serve`, or use sb.get_host(port) in the SDK",
            )
        exposed = asyncio.run(expose(where))
    except AgentVMError as exc:
        raise fail(exc) from exc
    typer.echo(exposed.url)
    if exposed.token:
        typer.echo(f"token: {exposed.token}")
        typer.echo(f"  curl -H 'X-Agent-VM-Port-Token: {exposed.token}' {exposed.url}")
        typer.echo(f"  browser: {exposed.url}?agentvm_token={exposed.token}")
