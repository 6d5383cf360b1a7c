"""``agent-vm agent NAME``: a coding agent on a project, in a fresh sandbox. The recipe's
image is built on this host first when the sandbox is local or on the local server
(which shares this image store); then it is ``run`` with the agent's command, key (a
secret) and allowlist."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from agent_vm import secrets
from agent_vm.cli.common import fail, progress
from agent_vm.cli.run import Job, Place, execute, existing_dir, profile_of, server_for
from agent_vm.errors import AgentVMError
from agent_vm.exitcodes import EXIT_INTERRUPTED
from agent_vm.network.policy import EgressPolicy


def _build_here(loaded: object, shown: object) -> str:
    """The recipe's image, built (or found) in this host's store; its name."""
    from agent_vm.config import load_settings
    from agent_vm.execution.runtime import Runtime
    from agent_vm.image.recipe import LoadedRecipe

    assert isinstance(loaded, LoadedRecipe)

    async def build() -> str:
        async with Runtime(load_settings()) as runtime:
            image = await runtime.build_recipe(loaded, progress=shown)  # type: ignore[arg-type]
            return image.name

    return asyncio.run(build())


def agent(
    name: Annotated[
        str, typer.Argument(help="claude, aider, codex, or a recipe file with an [agent] table")
    ],
    args: Annotated[
        list[str] | None, typer.Argument(help="the agent's own arguments (after --)")
    ] = None,
    workspace: Annotated[
        Path | None, typer.Option(help="the project to share at /workspace (default: here)")
    ] = None,
    readonly: Annotated[bool, typer.Option("--ro", help="share the workspace read-only")] = False,
    base_url: Annotated[
        str | None,
        typer.Option(
            help="the model API's URL (a proxy; default: the agent's own, or $..._BASE_URL)"
        ),
    ] = None,
    secret: Annotated[
        list[str] | None, typer.Option("--secret", help="more secrets, as for run")
    ] = None,
    allow_domain: Annotated[
        list[str] | None, typer.Option("--allow-domain", help="a name to allow besides the API's")
    ] = None,
    profile: Annotated[str, typer.Option(help="light, standard or intensive")] = "standard",
    memory: Annotated[int | None, typer.Option(help="MiB of RAM (overrides the profile)")] = None,
    timeout: Annotated[float, typer.Option(help="seconds before the agent is stopped")] = 3600,
    cold: Annotated[bool, typer.Option("--cold", help="boot instead of the golden state")] = False,
    server: Annotated[
        str | None,
        typer.Option(help="run it on this `agent-vm serve` (default: the local one if it listens)"),
    ] = None,
    token: Annotated[str | None, typer.Option(help="the server's token")] = None,
) -> None:
    """Run a coding agent on a project in a fresh sandbox: interactive with a terminal,
    headless (``--print``-style) without one. Its image is built on first use (on this
    host: a remote server must have it already)."""
    from agent_vm.communication.workspace import Workspace
    from agent_vm.execution.agents import agent_plan
    from agent_vm.image.recipe import find_recipe

    try:
        loaded = find_recipe(name)
        tty = sys.stdin.isatty() and sys.stdout.isatty()
        plan = agent_plan(loaded, list(args or []), base_url, os.environ, tty=tty)
        hidden = secrets.parse_any(secret or []) | plan.secrets
        policy = EgressPolicy(allow_domains=(*plan.allowlist, *(allow_domain or ())))
        share = Workspace(path=existing_dir(workspace or Path.cwd()), readonly=readonly)
        target = server_for(server, token)
        image = loaded.recipe.name
        if target is None or not target.startswith(("http://", "https://")):
            with progress() as shown:  # a remote server must have the image already
                image = _build_here(loaded, shown)
        place = Place(
            target, token, image, profile_of(profile, None, memory, None), "nat", policy, share,
            cold, hidden,
        )  # fmt: skip
        exit_code = execute(place, Job(plan.command, timeout, plan.env, tty=tty))
    except AgentVMError as exc:
        raise fail(exc) from exc
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    raise typer.Exit(exit_code)
