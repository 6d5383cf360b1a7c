"""One cgroup per execution (when cgroup2 is mounted and the agent is root): a process
limit, a kill that reaches processes which left their group with setsid(), and the OOM
killer's count. Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

from agent_vm.guest.files import read_file, write_file

TYPE_CHECKING = False  # typing is avoided here: imports cost boot time under TCG
if TYPE_CHECKING:
    from collections.abc import Iterator

CGROUP_ROOT = "/sys/fs/cgroup"
# Held while the agent sits in an execution's cgroup to fork: one child at a time.
spawn_lock = threading.Lock()
_disabled = False


def disable() -> None:
    """No cgroups from now on (an agent run in-process by tests: moving the test process
    between cgroups would move the test)."""
    global _disabled
    _disabled = True


def available() -> bool:
    return not _disabled and os.path.exists(f"{CGROUP_ROOT}/cgroup.procs") and os.getuid() == 0


def make(request_id: int, pids_max: int | None = None) -> str | None:
    if not available():
        return None
    path = f"{CGROUP_ROOT}/exec-{os.getpid()}-{request_id}-{time.monotonic_ns()}"
    try:
        os.mkdir(path)
    except OSError:
        return None
    if pids_max is not None:  # a fork bomb stops here, not at the guest's pid limit
        with contextlib.suppress(OSError):
            write_file(f"{path}/pids.max", str(pids_max))
    return path


@contextlib.contextmanager
def inside(cgroup: str | None) -> Iterator[None]:
    """The agent itself in ``cgroup`` while inside: a child forked meanwhile starts there
    (no race, and subprocess keeps its vfork path: no preexec_fn)."""
    if cgroup is None:
        yield None
        return
    write_file(f"{cgroup}/cgroup.procs", "0")
    try:
        yield None
    finally:
        write_file(f"{CGROUP_ROOT}/cgroup.procs", "0")


def kill(cgroup: str) -> None:
    with contextlib.suppress(OSError):
        write_file(f"{cgroup}/cgroup.kill", "1")


def remove(cgroup: str | None) -> None:
    if cgroup is None:
        return
    for _ in range(50):
        try:
            os.rmdir(cgroup)
            return
        except OSError:
            if "populated 1" in read_file(f"{cgroup}/cgroup.events"):
                return  # daemons the command left running keep their cgroup
            time.sleep(0.02)


def oom_kills(cgroup: str) -> int:
    """Processes of the cgroup the OOM killer ended (memory.events, any OOM killer)."""
    for line in read_file(f"{cgroup}/memory.events").splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return 0
