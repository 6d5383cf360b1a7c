"""The operator's commands: ``agent-vm audit verify|tail|search``, ``agent-vm metrics``
(a standalone Prometheus exporter for the VMs of this host) and ``agent-vm top``."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from agent_vm.api.local import LocalApi, default_socket, read_local_token
from agent_vm.monitoring import audit

if TYPE_CHECKING:  # the host's side (libvirt, prometheus): imported where used
    from agent_vm.core.connection import LibvirtConnection
    from agent_vm.monitoring.metrics import DomainFigures, Target

audit_app = typer.Typer(help="The server's audit log: verify its chain, follow it, search it.",
                        no_args_is_help=True)  # fmt: skip
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _path(path: Path | None) -> Path:
    from agent_vm.config import load_settings

    return path or load_settings().audit_path


@audit_app.command("verify")
def audit_verify(
    path: Annotated[Path | None, typer.Option(help="the log (default: the server's)")] = None,
) -> None:
    """Check the hash chain across every rotated file; exit 1 at the first bad line."""
    found = _path(path)
    if not audit.files_of(found):
        err.print(f"agent-vm: no audit log at {found}")
        raise typer.Exit(2)
    verdict = audit.verify(found)
    if not verdict.ok:
        err.print(f"agent-vm: audit log NOT intact: {verdict.problem}", highlight=False)
        raise typer.Exit(1)
    start = f" (from seq {verdict.first_seq}; older files rotated away)" if (
        verdict.first_seq or 1) > 1 else ""  # fmt: skip
    out.print(f"audit log intact: {verdict.lines} lines{start}", highlight=False)


def _matches(line: dict[str, Any], event: str | None, sandbox: str | None,
             since: datetime | None) -> bool:  # fmt: skip
    if event is not None and line.get("event") != event:
        return False
    if sandbox is not None and line.get("sandbox") != sandbox:
        return False
    if since is not None:
        try:
            return datetime.fromisoformat(str(line.get("at"))) >= since
        except ValueError:
            return False
    return True


@audit_app.command("search")
def audit_search(
    event: Annotated[str | None, typer.Option(help="e.g. execution_started, anomaly")] = None,
    sandbox: Annotated[str | None, typer.Option(help="a sandbox id")] = None,
    since: Annotated[str | None, typer.Option(help="ISO 8601, e.g. 2026-12-01T09:00-05:00")] = None,
    path: Annotated[Path | None, typer.Option(help="the log (default: the server's)")] = None,
) -> None:
    """Print matching lines (JSON), oldest first."""
    try:
        when = datetime.fromisoformat(since) if since else None
    except ValueError:
        err.print(f"agent-vm: --since {since!r} is not ISO 8601 (2026-12-01T09:00-05:00)")
        raise typer.Exit(2) from None
    for _, _, line, _ in audit.read(_path(path)):
        if line is not None and _matches(line, event, sandbox, when):
            typer.echo(json.dumps(line, ensure_ascii=False))


@audit_app.command("tail")
def audit_tail(
    lines: Annotated[int, typer.Option("-n", help="how many lines")] = 20,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="keep printing new ones")] = False,
    path: Annotated[Path | None, typer.Option(help="the log (default: the server's)")] = None,
) -> None:
    """The last lines (JSON); with -f, new ones as they come (across a rotation)."""
    found = _path(path)
    recent = [raw.rstrip("\n") for _, _, _, raw in audit.read(found)][-lines:]
    for raw in recent:
        typer.echo(raw)
    if not follow:
        return
    position = found.stat().st_size if found.exists() else 0
    inode = found.stat().st_ino if found.exists() else 0
    try:
        while True:
            time.sleep(0.5)
            if not found.exists():
                continue
            info = found.stat()
            if info.st_ino != inode:  # rotated: the new file from its start
                inode, position = info.st_ino, 0
            if info.st_size > position:
                with found.open() as source:
                    source.seek(position)
                    chunk = source.read()
                    position = source.tell()
                typer.echo(chunk, nl=False)
    except KeyboardInterrupt:
        return


def _local_targets(connection: LibvirtConnection) -> list[Target]:
    from agent_vm.execution.reaper import owned_domains
    from agent_vm.monitoring.metrics import Target

    domains = owned_domains(connection)
    return [Target(d.vm.name, d.vm.name, d.metadata.get("pid", "")) for d in domains
            if d.vm.is_active()]  # fmt: skip


def metrics_command(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 9177,
) -> None:
    """A standalone Prometheus exporter of this host's agent-vm VMs (CPU, memory, disk and
    network from libvirt's bulk stats); the server's own ``/metrics`` adds its events."""
    from agent_vm.config import load_settings
    from agent_vm.core.connection import LibvirtConnection

    connection = LibvirtConnection(load_settings().libvirt_uri)
    connection.open()
    from prometheus_client import start_http_server

    from agent_vm.monitoring.metrics import MetricsCollector, Sources

    collector = MetricsCollector(Sources(connection=lambda: connection.connection,
                                         targets=lambda: _local_targets(connection)))  # fmt: skip
    start_http_server(port, addr=host, registry=collector.registry)
    out.print(f"agent-vm metrics on http://{host}:{port}/metrics (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return


def _server_blocked() -> dict[str, tuple[str, float]]:
    """Blocked counts by VM from the local server's metrics (its sandbox ids too), when
    a server runs here and this user has its local token; else nothing."""
    path = default_socket()
    token = read_local_token(path)
    if token is None:
        return {}
    try:
        status, raw = LocalApi(path, token, timeout=2).request("GET", "/metrics")
    except OSError:
        return {}
    if status != 200:
        return {}
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, tuple[str, float]] = {}
    for family in text_string_to_metric_families(raw.decode()):
        if family.name == "agentvm_sandbox_blocked":
            for sample in family.samples:
                found[sample.labels["vm"]] = (sample.labels["sandbox"], sample.value)
    return found


def _saved() -> str:
    """Paused sandboxes (no VM: not in the table) and snapshots, with the disk they hold."""
    from agent_vm.config import load_settings
    from agent_vm.execution.snapshots import SnapshotStore
    from agent_vm.execution.suspend import disk_bytes

    settings = load_settings()
    root = settings.paused_dir
    paused = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    held = sum(disk_bytes(p) for p in paused)
    snapshots = SnapshotStore(settings.state_dir, settings.vms_dir, root).all(hidden=True)
    kept = sum(s.disk_bytes for s in snapshots)
    return (
        f"paused to disk: {len(paused)} ({held / 2**20:.0f} MiB) · "
        f"snapshots: {len(snapshots)} ({kept / 2**20:.0f} MiB)"
    )


def _table(previous: dict[str, DomainFigures], now: dict[str, DomainFigures], seconds: float,
           names: dict[str, tuple[str, float]]) -> Table:  # fmt: skip
    table = Table("VM", "sandbox", "state", "CPU %", "RSS MiB", "net rx KiB/s", "net tx KiB/s",
                  "disk MiB", "blocked", title="agent-vm top (Ctrl-C quits)",
                  caption=_saved())  # fmt: skip
    for name in sorted(now):
        figures, before = now[name], previous.get(name)

        def rate(value: float, old: float | None, scale: float) -> str:
            return "-" if old is None else f"{max(0.0, value - old) / seconds / scale:.1f}"

        sandbox, blocked = names.get(name, ("-", 0.0))
        table.add_row(
            name, sandbox, {1: "running", 3: "paused"}.get(figures.state, str(figures.state)),
            rate(figures.cpu_seconds, before.cpu_seconds if before else None, 0.01),
            f"{figures.rss_bytes / 2**20:.0f}",
            rate(figures.net_rx_bytes, before.net_rx_bytes if before else None, 1024),
            rate(figures.net_tx_bytes, before.net_tx_bytes if before else None, 1024),
            f"{figures.disk_allocation_bytes / 2**20:.0f}", f"{blocked:.0f}",
        )  # fmt: skip
    return table


def top_command(
    interval: Annotated[float, typer.Option(help="seconds between updates")] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="print one table and exit")] = False,
) -> None:
    """A live view of this host's sandboxes: CPU, memory, network, disk, blocked
    attempts (from the local server, when one runs) and state."""
    from agent_vm.config import load_settings
    from agent_vm.core.connection import LibvirtConnection

    connection = LibvirtConnection(load_settings().libvirt_uri)
    connection.open()

    from agent_vm.monitoring.metrics import bulk_stats

    def sample() -> dict[str, DomainFigures]:
        return bulk_stats(connection.connection, {t.vm for t in _local_targets(connection)})

    previous = sample()
    if once:
        time.sleep(min(interval, 1.0))
        out.print(_table(previous, sample(), min(interval, 1.0), _server_blocked()))
        return
    try:
        with Live(console=out, refresh_per_second=2) as live:
            while True:
                time.sleep(interval)
                now = sample()
                live.update(_table(previous, now, interval, _server_blocked()))
                previous = now
    except KeyboardInterrupt:
        return
