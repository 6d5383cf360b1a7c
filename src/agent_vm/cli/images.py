"""The host's things: ``version``, ``doctor``, ``image build|list|rm``, ``golden list|rm``
and ``gc``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from agent_vm.cli.common import fail, progress
from agent_vm.errors import AgentVMError, ConfigError
from agent_vm.version import __version__

if TYPE_CHECKING:
    from agent_vm.execution.runtime import Runtime
    from agent_vm.image.recipe import LoadedRecipe
    from agent_vm.image.store import Image

image_app = typer.Typer(help="Build, list and remove guest images.", no_args_is_help=True)
golden_app = typer.Typer(
    help="Golden states (booted once; VMs start from them). Their RAM lives in /dev/shm.",
    no_args_is_help=True,
)


def runtime() -> Runtime:
    from agent_vm.config import load_settings
    from agent_vm.execution.runtime import Runtime

    try:
        return Runtime(load_settings())
    except AgentVMError as exc:
        raise fail(exc) from exc


def version() -> None:
    """Print the agent-vm version."""
    typer.echo(__version__)


def doctor() -> None:
    """Check the host: packages, daemons, accelerator (KVM or TCG), libvirt, disk, image."""
    from agent_vm.doctor import run_checks

    host = runtime()
    try:
        checks = run_checks(host)
    finally:
        host.connection.close()
    table = Table(show_header=True, header_style="bold")
    for column in ("check", "status", "detail"):
        table.add_column(column)
    failed = False
    for check in checks:
        if check.ok:
            status = "[green]ok[/]"
        elif check.required:
            status, failed = "[red]FAIL[/]", True
        else:
            status = "[yellow]warn[/]"
        detail = (
            check.detail if check.ok or not check.remedy else f"{check.detail}\n→ {check.remedy}"
        )
        table.add_row(check.name, status, detail)
    Console().print(table)
    raise typer.Exit(1 if failed else 0)


@image_app.command("build")
def image_build(
    name: Annotated[str | None, typer.Option(help="image name (default: settings)")] = None,
    recipe: Annotated[
        Path | None,
        typer.Option(help="a recipe (TOML): build a layer on the base image instead"),
    ] = None,
    force: Annotated[bool, typer.Option(help="rebuild even if cached")] = False,
) -> None:
    """Build the guest image, or with --recipe an image layered on it (each reused when
    its inputs did not change)."""
    from agent_vm.image.recipe import load_recipe

    host = runtime()
    try:
        with progress() as shown:
            if recipe is not None:
                loaded = load_recipe(recipe)
                image = asyncio.run(_build_recipe(host, loaded, name, force, shown))
            else:
                shown("image: resolving inputs")
                image = host.build_image(name, force=force, progress=shown)
    except AgentVMError as exc:
        raise fail(exc) from exc
    m = image.manifest
    typer.echo(f"{image.name} {image.key} ({m.build_seconds:.1f} s to build) at {image.path}")


async def _build_recipe(
    host: Runtime,
    loaded: LoadedRecipe,
    name: str | None,
    force: bool,
    shown: Callable[[str], None],
) -> Image:
    async with host:
        return await host.build_recipe(loaded, name=name, force=force, progress=shown)


@image_app.command("list")
def image_list() -> None:
    """List built images; a recipe image shows the base it is layered on."""
    table = Table("name", "key", "current", "created", "layer on", "disk MiB", "recipe/kernel")
    for image, current in runtime().images.all():
        m = image.manifest
        layer = m.layer
        table.add_row(
            image.name,
            image.key,
            "*" if current else "",
            m.created_at.isoformat(timespec="seconds"),
            f"{layer.base_name} {layer.base_key}" if layer else "",
            f"{m.sizes.get('rootfs.qcow2', 0) / 2**20:.0f}",
            layer.recipe_path if layer else m.kernel_release,
        )
    Console().print(table)


@image_app.command("rm")
def image_rm(
    name: str,
    key: Annotated[str | None, typer.Option(help="remove only this version")] = None,
) -> None:
    """Remove an image (all versions, or one with --key)."""
    try:
        for path in runtime().images.remove(name, key):
            typer.echo(f"removed {path}")
    except AgentVMError as exc:
        raise fail(exc) from exc


@golden_app.command("list")
def golden_list() -> None:
    """List golden states with their size in shared memory."""
    table = Table("digest", "image", "vcpu", "MiB", "created", "RAM in /dev/shm", "status")
    for golden in runtime().golden_store.all():
        meta = golden.meta()
        ram = golden.ram.stat().st_blocks * 512 / 2**20 if golden.ram.exists() else 0
        if meta is None:
            table.add_row(golden.digest, "?", "", "", "", f"{ram:.0f} MiB", "incomplete")
            continue
        profile = meta.key.spec.profile
        table.add_row(
            golden.digest,
            meta.key.image_key,
            str(profile.vcpu),
            str(profile.memory_mib),
            meta.created_at.isoformat(timespec="seconds"),
            f"{ram:.0f} MiB",
            "ready" if golden.exists() else "incomplete",
        )
    Console().print(table)


@golden_app.command("rm")
def golden_rm(
    digest: Annotated[str | None, typer.Argument(help="digest (all if omitted)")] = None,
) -> None:
    """Remove golden states (they are captured again when next needed)."""
    store = runtime().golden_store
    matched = [g for g in store.all() if digest is None or g.digest.startswith(digest)]
    if digest is not None and not matched:
        raise fail(
            ConfigError(f"no golden state {digest!r}", hint="`agent-vm golden list` shows them")
        )
    for golden in matched:
        store.remove(golden)
        typer.echo(f"removed {golden.digest}")


def gc(
    all_owners: Annotated[
        bool, typer.Option("--all", help="also VMs of agent-vm processes still running")
    ] = False,
) -> None:
    """Remove VMs left by agent-vm processes that died, and golden states of removed images."""
    host = runtime()

    async def collect() -> list[str]:
        async with host:
            return await host.collect_garbage(all_owners=all_owners)

    try:
        removed = asyncio.run(collect())
    except AgentVMError as exc:
        raise fail(exc) from exc
    typer.echo("\n".join(removed) if removed else "nothing to remove")
