"""The ``agent-vm`` command line (typer + rich): one module per command group, each a
short layer over the SDK, the runtime or the server. Heavy parts (libvirt, the runtime)
are imported inside the commands that use them, so a client-only install runs
``agent-vm run --server ...`` without them.
"""

from __future__ import annotations

from typing import Annotated

import typer

from agent_vm import logs
from agent_vm.cli import images, ports, server, snapshots, watching
from agent_vm.cli.agent import agent
from agent_vm.cli.common import fail
from agent_vm.cli.run import run, shell
from agent_vm.exitcodes import EXIT_AGENT_VM_ERROR

__all__ = ["EXIT_AGENT_VM_ERROR", "app", "fail", "main"]

app = typer.Typer(
    help="Run untrusted commands and coding agents inside real QEMU/KVM virtual machines.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _global(
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "warning",
    json_logs: Annotated[bool, typer.Option(help="JSON log lines on stderr")] = False,
) -> None:
    logs.configure(log_level, json=json_logs)


app.command(context_settings={"allow_interspersed_args": False})(run)
app.command()(shell)
app.command()(agent)
for command in (images.version, images.doctor, images.gc, server.serve, server.mcp):
    app.command()(command)
app.add_typer(images.image_app, name="image")
app.add_typer(images.golden_app, name="golden")
app.add_typer(snapshots.snapshot_app, name="snapshot")
app.add_typer(server.token_app, name="token")
app.add_typer(server.service_app, name="service")
app.add_typer(watching.audit_app, name="audit")
app.command("metrics")(watching.metrics_command)
app.command("top")(watching.top_command)
app.command("port")(ports.port)


def main() -> None:
    app()
