"""PID 1 inside the VM, after the initramfs switched to the root disk. Standard library only.

It does what a minimal init must (identity, reaping zombies, a clean power-off) and keeps
the agent alive; mounts and the loopback were set up by the initramfs. The agent is
forked from this process rather than exec'd as a new interpreter: Python start-up is
the largest fixed cost of a boot under TCG, so paying it once matters. For the same
reason modules needed only later (ctypes, struct) are imported where they are used.

Power-off requests arrive three ways: the ACPI power button (``virsh shutdown``), SIGUSR2
from the agent (SHUTDOWN message), or SIGTERM/SIGINT.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from agent_vm.guest.files import SETTLED_MARKER, read_file, set_identity, write_file

TYPE_CHECKING = False  # typing/pathlib/uuid are avoided here: imports cost boot time under TCG
if TYPE_CHECKING:
    import ctypes
    from types import FrameType

GUEST_LIB = "/opt/agent-vm"
MODULES_DIR = GUEST_LIB + "/modules"
SYS_FINIT_MODULE = 313  # x86_64
EEXIST = 17
MS_RDONLY = 1
MS_REMOUNT = 32
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC
EV_KEY = 1
KEY_POWER = 116
INPUT_EVENT_FORMAT = "llHHi"

_t0 = time.monotonic()


def _libc() -> ctypes.CDLL:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def log(message: str) -> None:
    print(f"agent-vm init [{uptime():.3f}]: {message}", file=sys.stderr, flush=True)


def uptime() -> float:
    try:
        return float(read_file("/proc/uptime").split()[0])
    except (ValueError, IndexError):
        return time.monotonic() - _t0


def cmdline_params() -> dict[str, str]:
    params = {}
    for token in read_file("/proc/cmdline").split():
        if token.startswith("agentvm.") and "=" in token:
            key, value = token[len("agentvm.") :].split("=", 1)
            params[key] = value
    return params


def setup_dev_links() -> None:
    """devtmpfs has no /dev/fd & co; bash process substitution needs them."""
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        try:
            os.symlink(target, f"/dev/{name}")
        except FileExistsError:
            pass


def setup_identity(params: dict[str, str]) -> None:
    set_identity(params.get("hostname", "agent-vm"), params.get("machine_id", os.urandom(16).hex()))


def power_off(reason: str) -> None:
    log(f"powering off ({reason})")
    try:
        os.kill(-1, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                time.sleep(0.02)
        except ChildProcessError:
            break
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.sync()
    libc = _libc()
    libc.mount(None, b"/", None, MS_REMOUNT | MS_RDONLY, None)
    libc.reboot(LINUX_REBOOT_CMD_POWER_OFF)
    os._exit(0)  # only reached if reboot() failed; the kernel then panics and QEMU stops


def load_modules(directory: str = MODULES_DIR) -> None:
    """Modules not needed to reach the agent (network, 9p, vsock, power button)."""
    import ctypes

    libc = _libc()
    for name in read_file(f"{directory}/order").split():
        try:
            fd = os.open(f"{directory}/{name}.ko", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            log(f"module {name}: {exc}")
            continue
        try:
            if libc.syscall(SYS_FINIT_MODULE, fd, b"", 0) != 0:
                err = ctypes.get_errno()
                if err != EEXIST:
                    log(f"module {name}: {os.strerror(err)}")
        finally:
            os.close(fd)


def setup_limits() -> None:
    """Per-command cgroups may use the memory and pids controllers; init and the agent it
    forks are the last things the guest's OOM killer may end (commands are reset to 0)."""
    try:
        write_file("/sys/fs/cgroup/cgroup.subtree_control", "+memory +pids")
    except OSError as exc:
        log(f"cgroup controllers: {exc}")
    try:
        write_file("/proc/self/oom_score_adj", "-1000")
    except OSError as exc:
        log(f"oom_score_adj: {exc}")


def grow_root_fs() -> None:
    """A disk larger than the image's file system (a profile's disk_gib): grow it online.
    Only a cold boot (or a golden template) does this; clones inherit it."""
    try:
        sectors = int(read_file("/sys/block/vda/size").strip() or "0")
        fs = os.statvfs("/")
    except (OSError, ValueError):
        return
    if sectors * 512 - fs.f_blocks * fs.f_frsize < 256 * 2**20:
        return
    try:
        result = subprocess.run(["/sbin/resize2fs", "/dev/vda"], capture_output=True, text=True)
    except OSError as exc:  # an image without e2fsprogs: the VM works, on a smaller disk
        log(f"resize2fs: {exc}")
        return
    if result.returncode != 0:
        log(f"resize2fs: {result.stderr.strip()}")


def late_setup(load: bool = True, net: str | None = None) -> None:
    grow_root_fs()
    if load:
        load_modules()
    watch_power_button()
    if net:
        from agent_vm.guest import netconf

        settings = netconf.from_cmdline(net)
        try:
            if settings is None:
                raise ValueError(f"bad agentvm.net={net}")
            netconf.apply(settings)
        except (OSError, ValueError, RuntimeError) as exc:
            log(f"network: {exc}")
    write_file(SETTLED_MARKER, f"{uptime():.3f}\n")  # golden states are captured after this


def watch_power_button() -> None:
    """ACPI power button -> clean power-off; libvirt's graceful shutdown relies on it."""
    try:
        entries = [e for e in os.listdir("/sys/class/input") if e.startswith("event")]
    except OSError:
        return
    for entry in entries:
        if read_file(f"/sys/class/input/{entry}/device/name").strip() == "Power Button":
            device = f"/dev/input/{entry}"
            threading.Thread(target=_read_button, args=(device,), daemon=True).start()


def _read_button(device: str) -> None:
    import struct

    event = struct.Struct(INPUT_EVENT_FORMAT)
    with open(device, "rb") as events:
        while True:
            data = events.read(event.size)
            if len(data) < event.size:
                return
            _, _, etype, code, value = event.unpack(data)
            if etype == EV_KEY and code == KEY_POWER and value == 1:
                os.kill(1, signal.SIGUSR2)


def spawn_agent() -> int:
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
                signal.signal(sig, signal.SIG_DFL)
            devnull = os.open("/dev/null", os.O_RDONLY)
            os.dup2(devnull, 0)
            from agent_vm.guest import agent

            agent.main()
        except BaseException as exc:
            log(f"agent failed: {exc!r}")
        os._exit(1)
    return pid


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    power_off(signal.Signals(signum).name)


def main() -> None:
    params = cmdline_params()
    debug = params.get("debug") == "1"
    if debug:
        log("init started")
    setup_dev_links()
    setup_identity(params)
    if debug:
        log("identity set")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
        signal.signal(sig, _on_signal)
    setup_limits()
    # Import before forking so a restarted agent does not pay the import again.
    from agent_vm.guest import agent  # noqa: F401

    if debug:
        log("agent module imported")
    vsock = params.get("transport") == "vsock"
    if vsock:
        load_modules()  # the agent cannot listen before vsock is loaded
    agent_pid = spawn_agent()
    log(f"agent started (pid {agent_pid})")
    net = params.get("net")
    threading.Thread(target=late_setup, args=(not vsock, net), daemon=True).start()
    failures = 0
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            time.sleep(1)
            continue
        if pid == agent_pid:
            failures += 1
            log(f"agent exited with status {status:#x}; restarting")
            time.sleep(min(5.0, 0.1 * 2**failures))
            agent_pid = spawn_agent()


def run() -> None:
    """Entry point: the initramfs puts /opt/agent-vm on sys.path and calls this."""
    try:
        main()
    except BaseException as exc:  # PID 1 must never just die
        log(f"fatal: {exc!r}")
        power_off("init failure")
