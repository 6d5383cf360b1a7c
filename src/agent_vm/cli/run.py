"""``agent-vm run`` and ``agent-vm shell``: a short layer over the SDK. The command line
is checked first (nothing starts for a bad one); then one ``AsyncSandbox`` (a local VM,
or the server's: ``server_for`` picks) does the work: uploads, the command with live
output (or a terminal), downloads, removal in every case."""

from __future__ import annotations

import asyncio
import os
import signal
import socket as socket_module
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, BinaryIO

import typer
from rich.markup import escape

from agent_vm import secrets
from agent_vm.cli.common import Progress, err, fail, parse_env, progress
from agent_vm.errors import AgentVMError, ConfigError
from agent_vm.exitcodes import EXIT_INTERRUPTED, EXIT_TIMEOUT
from agent_vm.network.policy import DEFAULT_TCP_PORTS, EgressPolicy

if TYPE_CHECKING:
    from agent_vm.communication.workspace import Workspace
    from agent_vm.core.template import ResourceProfile
    from agent_vm.sandbox import AsyncSandbox

SHELL_TIMEOUT = 86400.0  # a shell ends when its user leaves, or after a day


@dataclass(frozen=True)
class Copies:
    """--upload and --download pairs: (host path, VM path)."""

    uploads: list[tuple[Path, str]] = field(default_factory=list)
    downloads: list[tuple[str, Path]] = field(default_factory=list)


@dataclass(frozen=True)
class Job:
    """What to run and where, as the user gave it (checked)."""

    command: list[str]
    timeout: float
    env: dict[str, str]
    cwd: str | None = None
    user: str | None = None
    stdin: bytes | None = None
    tty: bool = False
    copies: Copies = field(default_factory=Copies)


@dataclass(frozen=True)
class Place:
    """The sandbox to make: on a server (``server``) or here."""

    server: str | None
    token: str | None
    image: str | None
    profile: str | ResourceProfile
    network: str
    policy: EgressPolicy | None
    workspace: Workspace | None
    cold: bool = False
    secrets: dict[str, str | secrets.Secret] = field(default_factory=dict)
    snapshot: str | None = None


def server_for(server: str | None, token: str | None) -> str | None:
    """The server to use: the one asked for, else the local one when it listens and this
    user has a token for it ($AGENT_VM_TOKEN, or root's local token file); None: a VM
    here (also with AGENT_VM_LOCAL=1)."""
    if server is not None:
        return server
    from agent_vm.api.local import default_socket, read_local_token

    if os.environ.get("AGENT_VM_LOCAL") == "1":
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


def profile_of(
    name: str, cpus: int | None, memory: int | None, disk: int | None
) -> str | ResourceProfile:
    """The preset, or the preset with the user's overrides (checked here)."""
    if cpus is None and memory is None and disk is None:
        return name
    from agent_vm.core.template import ResourceProfile

    if cpus is not None and cpus < 1:
        raise ConfigError(f"--cpus must be at least 1, not {cpus}")
    if memory is not None and memory < 128:
        raise ConfigError(f"--memory must be at least 128 MiB, not {memory}")
    if disk is not None and disk < 2:
        raise ConfigError(f"--disk must be at least 2 GiB, not {disk}")
    base = ResourceProfile.preset(name)
    changes = {"vcpu": cpus, "memory_mib": memory, "disk_gib": disk}
    return base.model_copy(update={k: v for k, v in changes.items() if v is not None})


def existing_dir(path: Path) -> Path:
    if not path.is_dir():
        raise ConfigError(f"--workspace {path}: not a directory", hint="create it first")
    return path


def _pair(item: str, option: str) -> tuple[str, str]:
    source, sep, target = item.partition(":")
    if not sep or not source or not target:
        raise ConfigError(f"{option} {item!r}: give SOURCE:DESTINATION")
    return source, target


def _vm_path(path: str, option: str) -> str:
    if not path.startswith("/"):
        raise ConfigError(f"{option}: the VM path {path!r} must be absolute")
    return path


def copies_of(uploads: list[str], downloads: list[str]) -> Copies:
    ups = []
    for item in uploads:
        host, vm = _pair(item, "--upload")
        if not Path(host).exists():
            raise ConfigError(f"--upload {item!r}: {host} does not exist")
        ups.append((Path(host), _vm_path(vm, "--upload")))
    downs = []
    for item in downloads:
        vm, host = _pair(item, "--download")
        target = Path(host)
        if not target.absolute().parent.is_dir():
            raise ConfigError(f"--download {item!r}: {target.absolute().parent} is not a directory")
        downs.append((_vm_path(vm, "--download"), target))
    return Copies(ups, downs)


def sandbox_for(place: Place, shown: Progress) -> AsyncSandbox:
    """The sandbox ``place`` asks for, checked (nothing started yet)."""
    from agent_vm.sandbox import AsyncSandbox

    common = {
        "image": place.image, "profile": place.profile, "network": place.network,
        "policy": place.policy, "workspace": place.workspace, "cold": place.cold,
        "secrets": place.secrets, "on_progress": shown, "snapshot": place.snapshot,
    }  # fmt: skip
    if place.server is not None:
        return AsyncSandbox(server=place.server, token=place.token, **common)  # type: ignore[arg-type]
    from agent_vm.config import load_settings  # the host's part: a client-only install has none

    return AsyncSandbox(settings=load_settings(), **common)  # type: ignore[arg-type]


def _writer(stream: BinaryIO) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        stream.write(data)
        stream.flush()

    return write


async def _copy_in(sb: AsyncSandbox, copies: Copies) -> None:
    for host, vm in copies.uploads:
        if host.is_dir():
            await sb.files.upload_dir(host, vm)
        else:
            await sb.files.upload(host, vm)


async def _copy_out(sb: AsyncSandbox, copies: Copies) -> None:
    for vm, host in copies.downloads:
        if (await sb.files.stat(vm)).type == "dir":
            report = await sb.files.download_dir(vm, host)
            for name, why in report.skipped:
                err.print(f"agent-vm: --download skipped {escape(name)}: {escape(why)}")
        else:
            await sb.files.download(vm, host)


async def run_job(sb: AsyncSandbox, job: Job, shown: Progress) -> int:
    """Start the sandbox, run ``job`` in it, remove it; the exit code for the shell."""
    from agent_vm.cli import terminal
    from agent_vm.exitcodes import exit_status

    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        try:
            await sb.start()
        finally:
            shown.stop()
        await _copy_in(sb, job.copies)
        if job.tty:
            fd = sys.stdin.fileno()
            cols, rows = terminal.size_of(fd)
            with terminal.raw_mode(fd):
                handle = await sb.pty.create(
                    cols, rows, _writer(sys.stdout.buffer), cmd=job.command, envs=job.env,
                    cwd=job.cwd, user=job.user, timeout=job.timeout,
                )  # fmt: skip
                result = await terminal.attach(handle, fd, lambda: terminal.size_of(fd))
        else:
            result = await sb.commands.run(
                job.command, timeout=job.timeout, envs=job.env, cwd=job.cwd, user=job.user,
                stdin=job.stdin, on_stdout_bytes=_writer(sys.stdout.buffer),
                on_stderr_bytes=_writer(sys.stderr.buffer),
            )  # fmt: skip
        await _copy_out(sb, job.copies)
    except asyncio.CancelledError:
        return EXIT_INTERRUPTED
    finally:
        await asyncio.shield(sb.kill())
    if result.error:
        err.print(f"\r[bold red]agent-vm:[/] {escape(result.error)}", highlight=False)
    if result.timed_out:
        err.print(f"\r[bold red]agent-vm:[/] command timed out after {job.timeout:g} s")
        return EXIT_TIMEOUT
    return exit_status(result.exit_code, None)


def execute(place: Place, job: Job) -> int:
    """Run ``job`` in a sandbox as ``place`` says; errors become one line and 125."""
    with progress() as shown:
        sb = sandbox_for(place, shown)
        return asyncio.run(run_job(sb, job, shown))


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
        str | None, typer.Option(help="a user of the guest, name or uid (default: the image's)")
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
    snapshot: Annotated[
        str | None, typer.Option(help="start from this snapshot (agent-vm snapshot list)")
    ] = None,
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
    try:
        # Everything the user typed is checked before any daemon or VM starts.
        if (not command) == (code is None):
            raise ConfigError("give a command after -- or --code FILE.py (not both)")
        if timeout <= 0:
            raise ConfigError(f"--timeout must be positive, not {timeout:g}")
        if tty and interactive:
            raise ConfigError("-t forwards this terminal itself; drop -i")
        if readonly and workspace is None:
            raise ConfigError("--ro needs --workspace DIR")
        argv = command or ["python3", "-c", code.read_text() if code is not None else ""]
        variables = parse_env(env or [])
        hidden = secrets.parse_any(secret or [])
        if clash := sorted(set(hidden) & set(variables)):
            raise ConfigError(f"{clash[0]} is given both as --env and as --secret")
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
        share = None
        if workspace is not None:
            from agent_vm.communication.workspace import Workspace

            share = Workspace(path=existing_dir(workspace), readonly=readonly)
        copies = copies_of(upload or [], download or [])
        place = Place(
            server_for(server, token), token, image, profile_of(profile, cpus, memory, disk),
            network, policy, share, cold, hidden, snapshot,
        )  # fmt: skip
        stdin = sys.stdin.buffer.read() if interactive else None
        job = Job(argv, timeout, variables, cwd, user, stdin, tty, copies)
        exit_code = execute(place, job)
    except AgentVMError as exc:
        raise fail(exc) from exc
    except OSError as exc:  # --code FILE unreadable, stdin closed, ...
        raise fail(ConfigError(str(exc))) from exc
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    raise typer.Exit(exit_code)


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
