"""A systemd unit for ``agent-vm serve`` (hosts with systemd; elsewhere run it in the
foreground, under any supervisor). SIGTERM is uvicorn's graceful shutdown: sandboxes
are released before the process exits, within ``TimeoutStopSec``."""

from __future__ import annotations

import shlex
from pathlib import Path

UNIT_PATH = Path("/etc/systemd/system/agent-vm.service")


def render_unit(launcher: Path, serve_args: list[str]) -> str:
    command = " ".join(shlex.quote(part) for part in [str(launcher), "serve", *serve_args])
    return f"""[Unit]
Description=agent-vm: sandboxes in QEMU/KVM VMs over an HTTP API
After=network-online.target libvirtd.service
Wants=network-online.target

[Service]
Type=exec
ExecStart={command}
KillSignal=SIGTERM
TimeoutStopSec=120
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
"""


def has_systemd() -> bool:
    return Path("/run/systemd/system").is_dir()
