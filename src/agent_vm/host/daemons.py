"""Start ``virtlogd`` and ``libvirtd`` when they are not running and no service manager will.

On hosts without systemd two details decide how fast VMs are:

* ``/dev/kvm`` must be group ``kvm`` mode 0660, as Debian's udev rule makes it. Without
  udev it stays root-only; libvirt then sees KVM "disappear" after probing QEMU and
  re-probes QEMU's capabilities on every domain start (~4 s each).
* ``virsh destroy`` waits until QEMU's pid is gone. QEMU is daemonized, so its zombie is
  reaped by the nearest subreaper; a PID 1 that reaps lazily (seen: ~1.2 s) makes every
  destroy that slow. The daemons are therefore started under ``tini -s``, which reaps at once.
"""

from __future__ import annotations

import grp
import os
import shutil
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from agent_vm.errors import HostError
from agent_vm.logs import get_logger

log = get_logger(__name__)

LOG_DIR = Path("/var/log/agent-vm")


@dataclass(frozen=True)
class Daemon:
    name: str
    socket: Path


VIRTLOGD = Daemon("virtlogd", Path("/run/libvirt/virtlogd-sock"))
LIBVIRTD = Daemon("libvirtd", Path("/run/libvirt/libvirt-sock"))


def has_service_manager() -> bool:
    return Path("/run/systemd/system").is_dir()


def socket_accepts(path: Path) -> bool:
    """True if something listens on the unix socket (a stale file does not count)."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def fix_dev_kvm_permissions(dev: Path = Path("/dev/kvm")) -> bool:
    """Apply Debian's udev rule for /dev/kvm (root:kvm 0660) if udev did not; True if changed."""
    if not dev.exists():
        return False
    try:
        kvm_gid = grp.getgrnam("kvm").gr_gid
    except KeyError:
        return False
    st = dev.stat()
    if st.st_gid == kvm_gid and (st.st_mode & 0o060) == 0o060:
        return False
    os.chown(dev, 0, kvm_gid)
    dev.chmod(stat.S_IMODE(st.st_mode) | 0o660)
    log.info("dev_kvm_permissions_fixed", path=str(dev))
    return True


def ensure_tun(dev: Path = Path("/dev/net/tun")) -> bool:
    """Create the TUN device node if nothing did; True if it was made.

    Where udev runs, ``kmod static-nodes`` makes it at boot and opening it loads ``tun``;
    on a host without udev (agent-vm's own guest as a nested host, containers) the node is
    missing until the module is loaded, and libvirt fails every NAT start with "Unable to
    open /dev/net/tun". Loading the module makes devtmpfs create it; mknod is the fallback.
    """
    if dev.exists():
        return False
    subprocess.run(["modprobe", "tun"], capture_output=True, check=False)
    if not dev.exists():
        dev.parent.mkdir(parents=True, exist_ok=True)
        os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(10, 200))
    log.info("dev_net_tun_created", path=str(dev))
    return True


def _spawn_detached(daemon: Daemon) -> None:
    binary = shutil.which(daemon.name) or f"/usr/sbin/{daemon.name}"
    if not Path(binary).exists():
        raise HostError(
            f"{daemon.name} is not installed",
            hint="run ./agent-vm once (it installs the packages) or apt-get install "
            "libvirt-daemon-system",
        )
    tini = shutil.which("tini")
    argv = [tini, "-s", "--", binary] if tini else [binary]
    if not tini:
        log.warning("tini_missing", consequence="VM destroy will wait for PID 1 to reap QEMU")
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOG_DIR / f"{daemon.name}.log", "ab") as out:
        subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )


def _wait_socket(daemon: Daemon, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if socket_accepts(daemon.socket):
            return
        time.sleep(0.1)
    raise HostError(
        f"{daemon.name} did not start listening on {daemon.socket} within {timeout:.0f} s",
        hint=f"see {LOG_DIR / (daemon.name + '.log')} or run `{daemon.name}` in a terminal",
    )


def _running(name: str) -> bool:
    return subprocess.run(["pgrep", "-x", name], capture_output=True, check=False).returncode == 0


def _wait_gone(name: str, timeout: float) -> None:
    """A daemon that is still shutting down holds its pid file; a new one would fail."""
    deadline = time.monotonic() + timeout
    while _running(name) and time.monotonic() < deadline:
        time.sleep(0.05)


def ensure_daemons(timeout: float = 30.0) -> list[str]:
    """Make virtlogd and libvirtd reachable; returns what had to be done (empty if nothing)."""
    actions: list[str] = []
    if os.geteuid() != 0:
        raise HostError("agent-vm manages qemu:///system and must run as root", hint="use sudo")
    if fix_dev_kvm_permissions():
        actions.append("set /dev/kvm to root:kvm 0660")
    if ensure_tun():
        actions.append("created /dev/net/tun")
    for daemon in (VIRTLOGD, LIBVIRTD):
        if socket_accepts(daemon.socket):
            continue
        if has_service_manager():
            subprocess.run(["systemctl", "start", daemon.name], check=False)
        else:
            _wait_gone(daemon.name, timeout)
            _spawn_detached(daemon)
        _wait_socket(daemon, timeout)
        actions.append(f"started {daemon.name}")
        log.info("daemon_started", daemon=daemon.name)
    return actions


def stop_libvirtd(timeout: float = 15.0) -> None:
    """Stop libvirtd (used by fault-injection tests and `agent-vm host restart-libvirtd`)."""
    if has_service_manager():
        subprocess.run(["systemctl", "stop", "libvirtd"], check=False)
    else:
        subprocess.run(["pkill", "-x", "libvirtd"], check=False)
    _wait_gone("libvirtd", timeout)
