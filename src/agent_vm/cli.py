"""The ``agent-vm`` command line."""

from __future__ import annotations

import asyncio
import os
import signal
import socket as socket_module
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, BinaryIO, TextIO

import typer
from rich.console import Console
from rich.markup import escape
from rich.status import Status
from rich.table import Table

from agent_vm import __version__, logs, secrets, terminal
from agent_vm.api.tokens import TokenStore
from agent_vm.communication.files import FileService
from agent_vm.communication.workspace import Workspace
from agent_vm.config import load_settings
from agent_vm.errors import AgentVMError, ConfigError
from agent_vm.execution.agents import agent_plan
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.running import RunningVM
from agent_vm.execution.runtime import Runtime
from agent_vm.execution.spec import MachineSpec
from agent_vm.image.recipe import LoadedRecipe, find_recipe, load_recipe
from agent_vm.image.store import Image
from agent_vm.monitor_cli import audit_app, metrics_command, top_command
from agent_vm.network.policy import DEFAULT_TCP_PORTS, EgressPolicy
from agent_vm.protocol.messages import Result

if TYPE_CHECKING:
    from agent_vm.sandbox.remote import RemoteClient, RemoteFiles

EXIT_TIMEOUT = 124
EXIT_AGENT_VM_ERROR = 125
EXIT_INTERRUPTED = 130

app = typer.Typer(
    help="Run untrusted commands and coding agents inside real QEMU/KVM virtual machines.",
    no_args_is_help=True,
    add_completion=False,
)
image_app = typer.Typer(help="Build, list and remove guest images.", no_args_is_help=True)
app.add_typer(image_app, name="image")
token_app = typer.Typer(help="API tokens for `agent-vm serve`.", no_args_is_help=True)
app.add_typer(token_app, name="token")
golden_app = typer.Typer(
    help="Golden states (booted once; VMs start from them). Their RAM lives in /dev/shm.",
    no_args_is_help=True,
)
app.add_typer(golden_app, name="golden")
err = Console(stderr=True, soft_wrap=True)  # an error is one line, however long


@app.callback()
def _global(
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "warning",
    json_logs: Annotated[bool, typer.Option(help="JSON log lines on stderr")] = False,
) -> None:
    logs.configure(log_level, json=json_logs)


def _fail(exc: AgentVMError) -> typer.Exit:
    """One line for what happened, one for what to do; never a traceback."""
    first, *rest = exc.message.splitlines() or [""]
    err.print(f"[bold red]agent-vm:[/] {escape(first)}", highlight=False)
    for line in rest:  # e.g. a console log tail: context, printed as it is
        err.print(line, markup=False, highlight=False)
    if exc.hint:
        err.print(f"[yellow]hint:[/] {escape(exc.hint)}", highlight=False)
    return typer.Exit(EXIT_AGENT_VM_ERROR)


def _runtime() -> Runtime:
    try:
        return Runtime(load_settings())
    except AgentVMError as exc:
        raise _fail(exc) from exc


class _Progress:
    """A status line on stderr, shown from the first message on (fast paths show none)."""

    def __init__(self) -> None:
        self._status: Status | None = None

    def __call__(self, message: str) -> None:
        if self._status is None:
            self._status = err.status(message)
            self._status.start()
        else:
            self._status.update(message)

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


@contextmanager
def _progress() -> Iterator[_Progress]:
    progress = _Progress()
    try:
        yield progress
    finally:
        progress.stop()


@app.command()
def version() -> None:
    """Print the agent-vm version."""
    typer.echo(__version__)


@app.command()
def doctor() -> None:
    """Check the host: packages, daemons, accelerator (KVM or TCG), libvirt, disk, image."""
    from agent_vm.doctor import run_checks

    runtime = _runtime()
    try:
        checks = run_checks(runtime)
    finally:
        runtime.connection.close()
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
    runtime = _runtime()
    try:
        with _progress() as progress:
            if recipe is not None:
                loaded = load_recipe(recipe)
                image = asyncio.run(_build_recipe(runtime, loaded, name, force, progress))
            else:
                progress("image: resolving inputs")
                image = runtime.build_image(name, force=force, progress=progress)
    except AgentVMError as exc:
        raise _fail(exc) from exc
    m = image.manifest
    typer.echo(f"{image.name} {image.key} ({m.build_seconds:.1f} s to build) at {image.path}")


async def _build_recipe(
    runtime: Runtime,
    loaded: LoadedRecipe,
    name: str | None,
    force: bool,
    progress: Callable[[str], None],
) -> Image:
    async with runtime:
        return await runtime.build_recipe(loaded, name=name, force=force, progress=progress)


@image_app.command("list")
def image_list() -> None:
    """List built images; a recipe image shows the base it is layered on."""
    table = Table("name", "key", "current", "created", "layer on", "disk MiB", "recipe/kernel")
    for image, current in _runtime().images.all():
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
        for path in _runtime().images.remove(name, key):
            typer.echo(f"removed {path}")
    except AgentVMError as exc:
        raise _fail(exc) from exc


@golden_app.command("list")
def golden_list() -> None:
    """List golden states with their size in shared memory."""
    table = Table("digest", "image", "vcpu", "MiB", "created", "RAM in /dev/shm", "status")
    for golden in _runtime().golden_store.all():
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
    store = _runtime().golden_store
    matched = [g for g in store.all() if digest is None or g.digest.startswith(digest)]
    if digest is not None and not matched:
        raise _fail(
            ConfigError(f"no golden state {digest!r}", hint="`agent-vm golden list` shows them")
        )
    for golden in matched:
        store.remove(golden)
        typer.echo(f"removed {golden.digest}")


@app.command()
def gc(
    all_owners: Annotated[
        bool, typer.Option("--all", help="also VMs of agent-vm processes still running")
    ] = False,
) -> None:
    """Remove VMs left by agent-vm processes that died, and golden states of removed images."""
    runtime = _runtime()

    async def collect() -> list[str]:
        async with runtime:
            return await runtime.collect_garbage(all_owners=all_owners)

    try:
        removed = asyncio.run(collect())
    except AgentVMError as exc:
        raise _fail(exc) from exc
    typer.echo("\n".join(removed) if removed else "nothing to remove")


SHELL_TIMEOUT = 86400.0  # a shell ends when its user leaves, or after a day


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env expects KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    command: Annotated[list[str] | None, typer.Argument(help="command and arguments")] = None,
    code: Annotated[
        Path | None, typer.Option("--code", help="run this Python file instead of a command")
    ] = None,
    image: Annotated[str | None, typer.Option(help="image name")] = None,
    profile: Annotated[str, typer.Option(help="light, standard or intensive")] = "light",
    cpus: Annotated[int | None, typer.Option(help="vCPUs (overrides the profile)")] = None,
    memory: Annotated[int | None, typer.Option(help="MiB of RAM (overrides the profile)")] = None,
    disk: Annotated[
        int | None, typer.Option(help="GiB of root disk, its size cap (overrides the profile)")
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds before the command is killed")] = 600,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE")] = None,
    secret: Annotated[
        list[str] | None,
        typer.Option(
            "--secret",
            help="NAME (its value from this environment) or NAME=@FILE: in the "
            "command's environment only, redacted from what agent-vm logs",
        ),
    ] = None,
    cwd: Annotated[str | None, typer.Option(help="working directory in the VM")] = None,
    user: Annotated[
        str | None, typer.Option(help="root or agent (default: the image's, else root)")
    ] = None,
    interactive: Annotated[
        bool, typer.Option("--interactive", "-i", help="send this process's stdin")
    ] = False,
    tty: Annotated[
        bool, typer.Option("--tty", "-t", help="run in a terminal (this one, in raw mode)")
    ] = False,
    cold: Annotated[
        bool, typer.Option("--cold", help="boot the kernel instead of starting from golden state")
    ] = False,
    network: Annotated[
        str, typer.Option(help="nat (filtered internet), isolated (no NIC) or bridge:NAME")
    ] = "nat",
    allow_domain: Annotated[
        list[str] | None,
        typer.Option("--allow-domain", help="only these names (pypi.org, *.github.com)"),
    ] = None,
    port: Annotated[
        list[int] | None, typer.Option("--port", help="allowed TCP ports (default 80 443 22 9418)")
    ] = None,
    ipv6: Annotated[bool, typer.Option("--ipv6", help="allow IPv6")] = False,
    allow_cidr: Annotated[
        list[str] | None,
        typer.Option("--allow-cidr", help="a non-public IPv4 range to open (10.1.2.0/24)"),
    ] = None,
    workspace: Annotated[
        Path | None,
        typer.Option(help="share this host directory at /workspace (the command starts there)"),
    ] = None,
    readonly: Annotated[bool, typer.Option("--ro", help="share the workspace read-only")] = False,
    upload: Annotated[
        list[str] | None,
        typer.Option("--upload", help="HOST:VM, a file or directory copied in before the command"),
    ] = None,
    download: Annotated[
        list[str] | None,
        typer.Option("--download", help="VM:HOST, a file or directory copied out after it"),
    ] = None,
    server: Annotated[
        str | None,
        typer.Option(
            help="run on this `agent-vm serve` (URL or socket; default: the local one when "
            "it listens and a token is set)"
        ),
    ] = None,
    token: Annotated[
        str | None, typer.Option(help="the server's token (default: $AGENT_VM_TOKEN)")
    ] = None,
) -> None:
    """Start a fresh VM, run a command in it with live output, remove the VM.

    The VM starts from the golden state of its image and hardware (created on first use,
    a few seconds), or boots cold with --cold. Exits with the command's exit code (124 on
    timeout, 125 on an agent-vm error).
    """
    runtime = _runtime()
    try:
        # Everything the user typed is checked before any daemon or VM starts.
        if (not command) == (code is None):
            raise ConfigError("give a command after -- or --code FILE.py (not both)")
        if timeout <= 0:
            raise ConfigError(f"--timeout must be positive, not {timeout:g}")
        source = code.read_text() if code is not None else None
        variables = _parse_env(env or [])
        hidden = secrets.parse(secret or [])
        if clash := sorted(set(hidden) & set(variables)):
            raise ConfigError(f"{clash[0]} is given both as --env and as --secret")
        secrets.register(hidden)
        variables |= hidden
        spec = runtime.spec(
            profile=profile, network=network, cpus=cpus, memory_mib=memory, disk_gib=disk
        )
        policy = (
            EgressPolicy(
                tcp_ports=tuple(port) if port else DEFAULT_TCP_PORTS,
                allow_domains=tuple(allow_domain) if allow_domain else None,
                allow_ipv6=ipv6,
                allow_cidrs=tuple(allow_cidr or ()),
            )
            if port or allow_domain or ipv6 or allow_cidr
            else None  # the image's: a recipe's allowlist, else any name on the usual ports
        )
        if tty and interactive:
            raise ConfigError("-t forwards this terminal itself; drop -i")
        local_only = [
            flag for flag, given in (
                ("--cold", cold), ("--cpus", cpus), ("--memory", memory), ("--disk", disk),
            ) if given
        ]  # fmt: skip
        if readonly and workspace is None:
            raise ConfigError("--ro needs --workspace DIR")
        share = Workspace(path=_existing_dir(workspace), readonly=readonly) if workspace else None
        copies = _Copies([_upload(item) for item in upload or []],
                         [_download(item) for item in download or []])  # fmt: skip
        stdin = sys.stdin.buffer.read() if interactive else None
        request = _Request(command, source, timeout, variables, cwd, user, stdin, tty)
        target = _server_for(server, token, local_only)
        if target is not None:
            exit_code = asyncio.run(
                _run_remote(target, token, image, profile, network, policy, request, share, copies)
            )
            raise typer.Exit(exit_code)
        with _progress() as progress:
            built = runtime.find_image(image, progress=progress)
        exit_code = asyncio.run(_run(runtime, built, spec, policy, cold, request, share, copies))
    except AgentVMError as exc:
        raise _fail(exc) from exc
    except OSError as exc:  # --code FILE unreadable, stdin closed, ...
        raise _fail(ConfigError(str(exc))) from exc
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    raise typer.Exit(exit_code)


def _server_for(server: str | None, token: str | None, local_only: list[str]) -> str | None:
    """The server ``run`` should use: the one asked for, else the local one when it
    listens and this user has a token for it ($AGENT_VM_TOKEN, or root's local token
    file), unless an option needs a local VM; None runs locally."""
    if server is not None:
        if local_only:
            raise ConfigError(f"{', '.join(local_only)} cannot be used with --server")
        return server
    from agent_vm.api.local import default_socket, read_local_token

    if os.environ.get("AGENT_VM_LOCAL") == "1" or local_only:
        return None
    found = default_socket()
    if not (token or os.environ.get("AGENT_VM_TOKEN") or read_local_token(found)):
        return None
    probe = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    try:
        probe.connect(found)
    except OSError:
        return None
    finally:
        probe.close()
    return found


async def _run_remote(
    server: str,
    token: str | None,
    image: str | None,
    profile: str,
    network: str,
    policy: EgressPolicy | None,
    request: _Request,
    workspace: Workspace | None = None,
    copies: _Copies | None = None,
) -> int:
    """``run`` on a server: the same steps as ``_run`` (workspace, copies in, the
    command, copies out), over its API."""
    from agent_vm.sandbox.remote import RemoteClient, RemoteFiles

    client = RemoteClient(server, token)
    shared = (
        {"path": str(workspace.path.absolute()), "readonly": workspace.readonly}
        if workspace is not None
        else None
    )
    await client.create({
        "image": image, "profile": profile, "network": network, "workspace": shared,
        "policy": policy.model_dump(mode="json") if policy is not None else None,
    })  # fmt: skip
    files = RemoteFiles(client)
    try:
        if copies is not None:
            await _copy_in(files, copies)
        if request.tty:
            outcome = await _remote_terminal(client, request)
        else:
            result = await client.run(
                request.command, code=request.code, timeout=request.timeout,
                envs=request.env, cwd=request.cwd, user=request.user, stdin=request.stdin,
                on_stdout=_text_writer(sys.stdout), on_stderr=_text_writer(sys.stderr),
            )  # fmt: skip
            outcome = Result(result.exit_code, result.signal, result.timed_out, 0.0)
        if copies is not None:
            await _copy_out(files, copies)
    finally:
        await asyncio.shield(client.delete())
    if outcome.timed_out:
        err.print(f"\r\nagent-vm: command timed out after {request.timeout:g} s")
        return EXIT_TIMEOUT
    return terminal.exit_status(outcome.exit_code, outcome.signal)


async def _remote_terminal(client: RemoteClient, request: _Request) -> Result:
    """``run -t`` through a server: this terminal in raw mode, the guest PTY over the
    server's WebSocket (window size follows, keys in order)."""
    from agent_vm.sandbox.remote import RemotePty, RemoteTerminal

    fd = sys.stdin.fileno()
    cols, rows = terminal.size_of(fd)
    pty = RemotePty(client)
    with terminal.raw_mode(fd):
        handle = await pty.create(
            cols, rows, _writer(sys.stdout.buffer), cmd=request.command, code=request.code,
            envs=request.env, cwd=request.cwd, user=request.user, timeout=request.timeout,
        )  # fmt: skip
        driver = RemoteTerminal(pty, handle)
        done = asyncio.ensure_future(driver.result())
        return await terminal.attach(driver, handle, done, fd, lambda: terminal.size_of(fd))


def _text_writer(stream: TextIO) -> Callable[[str], None]:
    def write(text: str) -> None:
        stream.write(text)
        stream.flush()

    return write


@dataclass(frozen=True)
class _Copies:
    """--upload and --download pairs: (host path, VM path)."""

    uploads: list[tuple[Path, str]]
    downloads: list[tuple[str, Path]]


def _pair(item: str, option: str) -> tuple[str, str]:
    source, sep, target = item.partition(":")
    if not sep or not source or not target:
        raise ConfigError(f"{option} {item!r}: give SOURCE:DESTINATION")
    return source, target


def _vm_path(path: str, option: str) -> str:
    if not path.startswith("/"):
        raise ConfigError(f"{option}: the VM path {path!r} must be absolute")
    return path


def _existing_dir(path: Path) -> Path:
    if not path.is_dir():
        raise ConfigError(f"--workspace {path}: not a directory", hint="create it first")
    return path


def _upload(item: str) -> tuple[Path, str]:
    host, vm = _pair(item, "--upload")
    if not Path(host).exists():
        raise ConfigError(f"--upload {item!r}: {host} does not exist")
    return Path(host), _vm_path(vm, "--upload")


def _download(item: str) -> tuple[str, Path]:
    vm, host = _pair(item, "--download")
    target = Path(host)
    if not target.absolute().parent.is_dir():
        raise ConfigError(f"--download {item!r}: {target.absolute().parent} is not a directory")
    return _vm_path(vm, "--download"), target


async def _copy_in(files: FileService | RemoteFiles, copies: _Copies) -> None:
    for host, vm in copies.uploads:
        if host.is_dir():
            await files.upload_dir(host, vm)
        else:
            await files.upload(host, vm)


async def _copy_out(files: FileService | RemoteFiles, copies: _Copies) -> None:
    for vm, host in copies.downloads:
        if (await files.stat(vm)).type == "dir":
            report = await files.download_dir(vm, host)
            for name, why in report.skipped:
                err.print(f"agent-vm: --download skipped {escape(name)}: {escape(why)}")
        else:
            await files.download(vm, host)


class _Request:
    """What to run, as the user gave it."""

    def __init__(
        self,
        command: list[str] | None,
        code: str | None,
        timeout: float,
        env: dict[str, str],
        cwd: str | None,
        user: str | None,
        stdin: bytes | None,
        tty: bool = False,
    ) -> None:
        self.command = command
        self.code = code
        self.timeout = timeout
        self.env = env
        self.cwd = cwd
        self.user = user
        self.stdin = stdin
        self.tty = tty


async def _in_terminal(vm: RunningVM, request: _Request) -> Result:
    """The command in a guest PTY wired to this terminal (raw mode while it runs)."""
    fd = sys.stdin.fileno()
    cols, rows = terminal.size_of(fd)
    with terminal.raw_mode(fd):
        channel, rid, done = await AgentExecutor().start_terminal(
            vm, request.command, code=request.code, cols=cols, rows=rows,
            on_output=_writer(sys.stdout.buffer), timeout=request.timeout, env=request.env,
            cwd=request.cwd, user=request.user,
        )  # fmt: skip
        return await terminal.attach(channel, rid, done, fd, lambda: terminal.size_of(fd))


async def _run(
    runtime: Runtime,
    image: Image,
    spec: MachineSpec,
    policy: EgressPolicy | None,
    cold: bool,
    request: _Request,
    workspace: Workspace | None = None,
    copies: _Copies | None = None,
) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    vm: RunningVM | None = None
    try:
        with _progress() as progress:
            vm = await runtime.vm(
                image=image, spec=spec, policy=policy, cold=cold, progress=progress
            )
        if workspace is not None:
            await vm.attach_workspace(workspace)
        files = FileService(vm.channel, vm.staging)
        if copies is not None:
            await _copy_in(files, copies)
        if request.tty:
            outcome = await _in_terminal(vm, request)
            if copies is not None:
                await _copy_out(files, copies)
            if outcome.timed_out:
                err.print(f"\r\nagent-vm: command timed out after {request.timeout:g} s")
                return EXIT_TIMEOUT
            if outcome.error:
                err.print(f"agent-vm: {escape(outcome.error)}", highlight=False)
            return terminal.exit_status(outcome.exit_code, outcome.signal)
        result = await AgentExecutor().execute(
            vm,
            request.command,
            code=request.code,
            timeout=request.timeout,
            env=request.env,
            cwd=request.cwd,
            user=request.user,
            stdin=request.stdin,
            on_stdout=_writer(sys.stdout.buffer),
            on_stderr=_writer(sys.stderr.buffer),
        )
        if copies is not None:
            await _copy_out(files, copies)
        if result.error:
            err.print(f"[bold red]agent-vm:[/] {escape(result.error)}", highlight=False)
        if result.timed_out:
            err.print(f"[bold red]agent-vm:[/] command timed out after {request.timeout:g} s")
            return EXIT_TIMEOUT
        return result.exit_code
    except asyncio.CancelledError:
        return EXIT_INTERRUPTED
    finally:
        if vm is not None:
            await asyncio.shield(vm.close())
        await asyncio.shield(runtime.close())


def _writer(stream: BinaryIO) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        stream.write(data)
        stream.flush()

    return write


@app.command()
def shell(
    image: Annotated[str | None, typer.Option(help="image name")] = None,
    profile: Annotated[str, typer.Option(help="light, standard or intensive")] = "light",
    network: Annotated[
        str, typer.Option(help="nat (filtered internet), isolated (no NIC) or bridge:NAME")
    ] = "nat",
    workspace: Annotated[
        Path | None, typer.Option(help="share this host directory at /workspace")
    ] = None,
    readonly: Annotated[bool, typer.Option("--ro", help="share the workspace read-only")] = False,
    secret: Annotated[
        list[str] | None, typer.Option("--secret", help="NAME or NAME=@FILE (see run)")
    ] = None,
    cold: Annotated[bool, typer.Option("--cold", help="boot instead of the golden state")] = False,
    server: Annotated[
        str | None, typer.Option(help="open it on this `agent-vm serve` (URL or socket)")
    ] = None,
    token: Annotated[str | None, typer.Option(help="the server's token")] = None,
) -> None:
    """An interactive login shell in a fresh sandbox (removed when the shell exits)."""
    run(
        command=["bash", "-l"], image=image, profile=profile, network=network,
        workspace=workspace, readonly=readonly, secret=secret, cold=cold, tty=True,
        timeout=SHELL_TIMEOUT, server=server, token=token,
    )  # fmt: skip


@app.command()
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
        list[str] | None, typer.Option("--secret", help="more secrets: NAME or NAME=@FILE")
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
    runtime = _runtime()
    try:
        loaded = find_recipe(name)
        spec = runtime.spec(profile=profile, memory_mib=memory)
        tty = sys.stdin.isatty() and sys.stdout.isatty()
        plan = agent_plan(loaded, list(args or []), base_url, os.environ, tty=tty)
        hidden = secrets.parse(secret or []) | plan.secrets
        secrets.register(hidden)
        policy = EgressPolicy(allow_domains=(*plan.allowlist, *(allow_domain or ())))
        share = Workspace(path=_existing_dir(workspace or Path.cwd()), readonly=readonly)
        request = _Request(plan.command, None, timeout, plan.env | hidden, None, None, None, tty)
        local_only = [flag for flag, given in (("--cold", cold), ("--memory", memory)) if given]
        target = _server_for(server, token, local_only)
        if target is not None:
            exit_code = asyncio.run(
                _agent_remote(runtime, loaded, target, token, profile, policy, request, share)
            )
        else:
            exit_code = asyncio.run(_agent(runtime, loaded, spec, policy, cold, request, share))
    except AgentVMError as exc:
        raise _fail(exc) from exc
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    raise typer.Exit(exit_code)


async def _agent(
    runtime: Runtime,
    loaded: LoadedRecipe,
    spec: MachineSpec,
    policy: EgressPolicy,
    cold: bool,
    request: _Request,
    share: Workspace,
) -> int:
    try:
        with _progress() as progress:
            image = await runtime.build_recipe(loaded, progress=progress)
    except BaseException:
        await runtime.close()
        raise
    return await _run(runtime, image, spec, policy, cold, request, share)


async def _agent_remote(
    runtime: Runtime,
    loaded: LoadedRecipe,
    server: str,
    token: str | None,
    profile: str,
    policy: EgressPolicy,
    request: _Request,
    share: Workspace,
) -> int:
    """The agent on a server: a server on this host's socket shares this image store,
    so the image is built (or found) here first; a remote one must have it."""
    name = loaded.recipe.name
    if not server.startswith(("http://", "https://")):
        try:
            with _progress() as progress:
                name = (await runtime.build_recipe(loaded, progress=progress)).name
        finally:
            await runtime.close()
    return await _run_remote(server, token, name, profile, "nat", policy, request, share)


@app.command()
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
    port: Annotated[int, typer.Option(help="the TCP port (with --host)")] = 8177,
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
) -> None:
    """Serve the HTTP API in the foreground (Ctrl-C or SIGTERM stops it and its sandboxes).

    Clients need a token: `agent-vm token create NAME`. OpenAPI at /openapi.json.
    """
    from agent_vm.api.server import serve as run_server
    from agent_vm.api.service import PoolSpec

    try:
        specs = [PoolSpec.parse(item) for item in pool or []]
        run_server(
            load_settings(), specs, socket=socket, host=host, port=port, tls_cert=tls_cert,
            tls_key=tls_key, workspace_root=workspace_root,
        )  # fmt: skip
    except AgentVMError as exc:
        raise _fail(exc) from exc


service_app = typer.Typer(help="Run `agent-vm serve` as a systemd service.", no_args_is_help=True)
app.add_typer(service_app, name="service")


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

    from agent_vm.api.service import PoolSpec
    from agent_vm.api.systemd import UNIT_PATH, has_systemd, render_unit

    try:
        for item in pool or []:
            PoolSpec.parse(item)
    except AgentVMError as exc:
        raise _fail(exc) from exc
    launcher = Path(__file__).resolve().parents[2] / "agent-vm"
    args = [part for item in pool or [] for part in ("--pool", item)]
    unit = render_unit(launcher, args)
    if print_only:
        typer.echo(unit, nl=False)
        return
    if not has_systemd():
        raise _fail(
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

    return token_store(load_settings())


@token_app.command("create")
def token_create(
    name: str,
    max_sandboxes: Annotated[int, typer.Option(help="sandboxes at once")] = 8,
    max_executions: Annotated[int, typer.Option(help="executions running at once")] = 16,
    metrics: Annotated[
        bool, typer.Option("--metrics", help="may read /metrics (every tenant's figures)")
    ] = False,
) -> None:
    """Create a token; it is printed once and stored only as a hash."""
    try:
        _, token = _tokens().create(
            name, max_sandboxes=max_sandboxes, max_executions=max_executions, metrics=metrics
        )
    except AgentVMError as exc:
        raise _fail(exc) from exc
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
        raise _fail(exc) from exc
    typer.echo(f"revoked {record.id} ({record.name})")


app.add_typer(audit_app, name="audit")
app.command("metrics")(metrics_command)
app.command("top")(top_command)


def main() -> None:
    app()
