"""The `agent-vm` command as a user runs it: a real process booting real VMs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent_vm.config import Settings
from agent_vm.core.connection import LibvirtConnection
from agent_vm.image.store import Image
from tests.integration.helpers import domains_of, network_leftovers, vm_dirs
from tests.integration.testnet import TestHost

CLI = [sys.executable, "-m", "agent_vm"]


def agent_vm(
    *args: str, timeout: float = 180, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False, input=input
    )


def start_booted_run() -> subprocess.Popen[str]:
    """`agent-vm run` of a long command, returned once the command runs in the VM."""
    proc = subprocess.Popen(
        [*CLI, "run", "--", "sh", "-c", "echo booted; sleep 120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a session started in the background (nohup ... &) passes
        # SIGINT ignored to its children, and a Ctrl-C would then reach nothing
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None and proc.stdout.readline() == "booted\n"
    return proc


def test_run_prints_the_guest_kernel_and_cleans_up(
    image: Image, settings: Settings, connection: LibvirtConnection
) -> None:
    before = vm_dirs(settings)
    proc = agent_vm("run", "--", "uname", "-sr")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"Linux {image.manifest.kernel_release}"
    assert vm_dirs(settings) == before


def test_run_exit_codes_stdout_stderr(image: Image) -> None:
    proc = agent_vm("run", "--", "sh", "-c", "echo to-out; echo to-err >&2; exit 42")
    assert (proc.returncode, proc.stdout) == (42, "to-out\n")
    assert "to-err" in proc.stderr


def test_run_timeout_exits_124(image: Image, settings: Settings) -> None:
    before = vm_dirs(settings)
    proc = agent_vm("run", "--timeout", "2", "--", "sleep", "60")
    assert proc.returncode == 124 and "timed out" in proc.stderr
    assert vm_dirs(settings) == before


def test_run_code_file_env_and_user(image: Image, tmp_path: Path) -> None:
    script = tmp_path / "agent.py"
    script.write_text("import os, getpass\nprint(os.environ['TOKEN'], getpass.getuser())\n")
    proc = agent_vm("run", "--code", str(script), "--env", "TOKEN=abc", "--user", "agent")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "abc agent\n"


def test_run_interactive_stdin(image: Image) -> None:
    proc = agent_vm("run", "-i", "--", "tr", "a-z", "A-Z", input="hello\n")
    assert proc.stdout == "HELLO\n"


def test_ctrl_c_removes_the_vm(
    image: Image, settings: Settings, connection: LibvirtConnection
) -> None:
    before = vm_dirs(settings)
    proc = start_booted_run()
    assert len(domains_of(connection, proc.pid)) == 1
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    assert domains_of(connection, proc.pid) == set()
    assert vm_dirs(settings) == before


def test_sigterm_removes_the_vm(image: Image, connection: LibvirtConnection) -> None:
    proc = start_booted_run()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 130
    assert domains_of(connection, proc.pid) == set()


def test_bad_arguments_are_clear_errors(image: Image) -> None:
    proc = agent_vm("run")
    assert proc.returncode == 125 and "give a command" in proc.stderr
    proc = agent_vm("run", "--env", "NOEQUALS", "--", "true")
    assert proc.returncode == 125 and "KEY=VALUE" in proc.stderr
    proc = agent_vm("run", "--code", "/nonexistent.py")
    assert proc.returncode == 125 and "nonexistent.py" in proc.stderr
    proc = agent_vm("run", "--profile", "huge", "--", "true")
    assert proc.returncode == 125 and "unknown profile" in proc.stderr


def test_doctor_reports_the_accelerator_and_libvirt(image: Image) -> None:
    proc = agent_vm("doctor")
    assert proc.returncode == 0, proc.stdout
    assert "TCG" in proc.stdout or "KVM" in proc.stdout
    assert "libvirt 9" in proc.stdout or "libvirt 1" in proc.stdout


def test_gc_reaps_the_vm_of_a_killed_process(
    image: Image, settings: Settings, connection: LibvirtConnection
) -> None:
    proc = start_booted_run()
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up
    proc.wait(10)
    leftover = sorted(domains_of(connection, proc.pid))
    assert len(leftover) == 1
    result = agent_vm("gc")
    assert result.returncode == 0 and leftover[0] in result.stdout
    deadline = time.monotonic() + 10
    while domains_of(connection, proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert domains_of(connection, proc.pid) == set()
    assert not (settings.vms_dir / leftover[0]).exists()
    assert network_leftovers(settings, {leftover[0]}) == []  # its network pieces went too


def test_run_starts_from_golden_state_unless_cold(image: Image) -> None:
    warm = agent_vm("--log-level", "info", "run", "--", "true")
    assert warm.returncode == 0 and "vm_cloned" in warm.stderr
    cold = agent_vm("--log-level", "info", "run", "--cold", "--", "true")
    assert cold.returncode == 0 and "vm_ready" in cold.stderr and "vm_cloned" not in cold.stderr


NET_PROBE = """
import socket, urllib.request
print(urllib.request.urlopen("http://web.allowed.test/", timeout=10).read().decode().strip())
try:
    socket.getaddrinfo("evil.test", 80)
    print("evil.test resolved")
except socket.gaierror:
    print("evil.test refused")
"""


def test_run_network_options(image: Image, test_host: TestHost) -> None:
    allowed = agent_vm(
        "run", "--allow-domain", "web.allowed.test", "--", "python3", "-c", NET_PROBE
    )
    assert allowed.returncode == 0, allowed.stderr
    lines = allowed.stdout.splitlines()
    assert lines[0].startswith("hello from port 80"), lines
    assert lines[1:] == ["evil.test refused"]
    isolated = agent_vm("run", "--network", "isolated", "--", "ls", "/sys/class/net")
    assert isolated.returncode == 0 and isolated.stdout.split() == ["lo"]
    bad_mode = agent_vm("run", "--network", "wifi", "--", "true")
    assert bad_mode.returncode == 125 and "network must be" in bad_mode.stderr
    bad_name = agent_vm("run", "--allow-domain", "not a domain", "--", "true")
    assert bad_name.returncode == 125 and "not a domain" in bad_name.stderr, bad_name.stderr


def test_run_with_a_workspace_uploads_and_downloads(image: Image, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "main.py").write_text("print('in the workspace')\n")
    os.chown(project, 4242, 4242)
    (tmp_path / "input.txt").write_text("uploaded\n")
    proc = agent_vm(
        "run", "--network", "isolated", "--workspace", str(project),
        "--upload", f"{tmp_path / 'input.txt'}:/root/in.txt",
        "--download", f"/root/results:{tmp_path / 'results'}",
        "--", "sh", "-c",
        "pwd; python3 main.py; cat /root/in.txt; echo made > made.txt; "
        "mkdir -p /root/results && echo r > /root/results/r.txt && ln -s /etc /root/results/out",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "/workspace\nin the workspace\nuploaded\n"
    assert (project / "made.txt").stat().st_uid == 4242
    assert (tmp_path / "results" / "r.txt").read_text() == "r\n"
    assert not (tmp_path / "results" / "out").exists()
    assert "skipped out" in proc.stderr
    ro = agent_vm("run", "--network", "isolated", "--workspace", str(project), "--ro",
                  "--", "touch", "x")  # fmt: skip
    assert ro.returncode != 0 and "Read-only file system" in ro.stderr
    assert not (project / "x").exists()


def test_long_steps_are_said_when_stderr_is_not_a_terminal(
    image: Image, settings: Settings
) -> None:
    """A first start (here: hardware never used, so its golden state is made now) says
    what it is doing line by line into a pipe or a CI log, instead of minutes of silence."""
    golden = settings.state_dir / "golden"
    before = set(golden.iterdir()) if golden.exists() else set()
    try:
        proc = agent_vm("run", "--network", "isolated", "--memory", "600", "--", "true")
        assert proc.returncode == 0, proc.stderr
        assert "agent-vm: creating the golden state" in proc.stderr, proc.stderr
        again = agent_vm("run", "--network", "isolated", "--memory", "600", "--", "true")
        assert again.returncode == 0 and again.stderr == ""  # a fast path says nothing
    finally:
        for made in (set(golden.iterdir()) if golden.exists() else set()) - before:
            agent_vm("golden", "rm", made.name)
