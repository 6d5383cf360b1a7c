"""Small helpers shared by guest init and agent (pathlib costs boot time under TCG)."""

from __future__ import annotations

SETTLED_MARKER = "/run/agent-vm-settled"


def read_file(path: str) -> str:
    """The file's text, or "" when it cannot be read."""
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return ""


def write_file(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def set_identity(hostname: str, machine_id: str) -> None:
    """Hostname (what sethostname(2) changes) and machine-id, as init and CONFIGURE set them."""
    write_file("/proc/sys/kernel/hostname", hostname)
    write_file("/etc/hostname", hostname + "\n")
    write_file("/etc/hosts", f"127.0.0.1 localhost\n127.0.1.1 {hostname}\n")
    write_file("/etc/machine-id", machine_id + "\n")
