"""One command in the guest: its process tree, pumps, stdin, terminal and timeout.
Standard library only.

Backpressure, not buffering: output is read in 64 KiB chunks and written to the port
with blocking writes; if the host reads slowly, the pump blocks and the command blocks
on its pipe. Stdin goes through a bounded per-execution queue so that the reader thread
never waits on one command's pipe. Each execution is one thread polling both pipes and a
pidfd of the process (plus a stdin feeder when stdin is used). Each gets its own cgroup
(when cgroup2 is mounted) and process group; a timeout or SIGKILL kills the cgroup, which
also catches processes that called setsid() to escape their group.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import queue
import select
import signal
import subprocess
import threading
import time

from agent_vm.errors import ProtocolError
from agent_vm.guest import cgroups
from agent_vm.guest.defaults import image_defaults
from agent_vm.guest.files import write_file
from agent_vm.guest.wire import Wire
from agent_vm.protocol.messages import Execute, MessageType, Result

TYPE_CHECKING = False  # typing is avoided here: imports cost boot time under TCG
if TYPE_CHECKING:
    from typing import Any

CHUNK = 64 * 1024
DRAIN_GRACE = 1.0
MAX_STDIN_QUEUED = 16 * 1024 * 1024
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EGRESS_CA = "/usr/local/share/ca-certificates/agent-vm-egress.crt"
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
CA_ENV = {
    "NODE_EXTRA_CA_CERTS": EGRESS_CA,
    "REQUESTS_CA_BUNDLE": SYSTEM_BUNDLE,
    "SSL_CERT_FILE": SYSTEM_BUNDLE,
}


class NoSuchUser(LookupError):
    """The command asked for a user this guest does not have."""


def find_user(user: str) -> pwd.struct_passwd:
    """A user of the guest by name or numeric uid (any user: ``adduser`` made ones too)."""
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        raise NoSuchUser(
            f"no user {user!r} in this sandbox (create it first, e.g. useradd -m {user})"
        ) from None


def _why(exc: OSError | ValueError) -> str:
    """A spawn failure in words a user can act on."""
    if isinstance(exc, OSError) and exc.errno == errno.E2BIG:
        return (
            "argument list too long for Linux (2 MiB in all, 128 KiB per argument):"
            " send large programs as a file or on stdin"
        )
    return str(exc)


class Execution:
    """One EXECUTE request: a process tree, its pumps, its timeout."""

    def __init__(self, wire: Wire, request_id: int, session: str, req: Execute) -> None:
        self.wire = wire
        self.request_id = request_id
        self.session = session
        self.req = req
        self.proc: subprocess.Popen[bytes] | None = None
        self.cgroup: str | None = None
        self.timed_out = False
        self.killed = threading.Event()
        self._stdin: queue.Queue[bytes | None] = queue.Queue()
        self._stdin_queued = 0
        self._stdin_lock = threading.Lock()
        self.master: int | None = None  # the PTY's master side, for pty executions

    # -- host-facing operations (called from the reader thread) --

    def feed_stdin(self, data: bytes, eof: bool) -> None:
        if not self.req.stdin and self.req.pty is None:
            raise ProtocolError("this execution was started without stdin")
        with self._stdin_lock:
            self._stdin_queued += len(data)
            over = self._stdin_queued > MAX_STDIN_QUEUED
        if over:
            self.wire.send_error(
                self.request_id, "stdin_overflow", "command is not reading its stdin"
            )
            self.kill()
            return
        if data:
            self._stdin.put(data)
        if eof:
            self._stdin.put(None)

    def resize(self, cols: int, rows: int) -> None:
        if self.req.pty is None:
            raise ProtocolError("this execution has no terminal")
        with self._stdin_lock:  # a resize before the terminal exists is its first size
            if self.master is None:
                self.req.pty = [cols, rows]
                return
        _set_size(self.master, cols, rows)

    def signal(self, signum: int) -> None:
        if signum == signal.SIGKILL:
            self.kill()
        elif self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signum)

    def kill(self) -> None:
        """Kill the whole tree: cgroup first (catches setsid escapees), then the group."""
        self.killed.set()
        if self.cgroup is not None:
            cgroups.kill(self.cgroup)
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    # -- the execution thread --

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"exec-{self.request_id}", daemon=True).start()

    def _argv(self) -> list[str]:
        if self.req.argv is not None:
            return list(self.req.argv)
        shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
        return [shell, "-c", self.req.shell or ""]

    def _env_and_ids(self) -> tuple[dict[str, str], int | None, int | None, str]:
        defaults = image_defaults()
        entry = find_user(self.req.user or defaults.user)
        env = {
            "PATH": BASE_PATH,
            "HOME": entry.pw_dir,
            "USER": entry.pw_name,
            "LOGNAME": entry.pw_name,
            "SHELL": entry.pw_shell,
            "LANG": "C.UTF-8",
        }
        if os.path.exists(EGRESS_CA):  # the host proxy's CA, for clients with their own
            env.update(CA_ENV)  # roots (Node, requests); OpenSSL's store already has it
        env.update(defaults.env)
        env.update(self.req.env)
        if entry.pw_uid == os.getuid():
            return env, None, None, entry.pw_dir
        return env, entry.pw_uid, entry.pw_gid, entry.pw_dir

    def _run(self) -> None:
        """Spawn, then one poll loop for both pipes, the process's pidfd and the timeout.

        One thread per execution (two with stdin): thread start-up is expensive under
        TCG, and a pidfd wakes us exactly when the process exits, unlike polling wait().
        """
        started = time.monotonic()
        try:
            self._spawn()
        except NoSuchUser as exc:
            self._finish(Result(126, None, False, time.monotonic() - started, str(exc)))
            return
        except (OSError, ValueError) as exc:
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            self._finish(Result(code, None, False, time.monotonic() - started, _why(exc)))
            return
        assert self.proc is not None
        proc = self.proc
        if self.killed.is_set():  # a kill that arrived before the process existed
            self.kill()
        pipes: list[Any] = []
        if self.master is not None:  # one terminal: input, and all output as STDOUT
            streams = {self.master: MessageType.STDOUT}
            threading.Thread(target=self._feed, args=(self.master, False), daemon=True).start()
        else:
            stdout, stderr = proc.stdout, proc.stderr
            assert stdout is not None and stderr is not None
            pipes = [stdout, stderr]
            if self.req.stdin:
                assert proc.stdin is not None
                feeder = threading.Thread(target=self._feed, args=(proc.stdin, True), daemon=True)
                feeder.start()
            streams = {stdout.fileno(): MessageType.STDOUT, stderr.fileno(): MessageType.STDERR}
        pidfd = os.pidfd_open(proc.pid)
        poller = select.poll()
        for fd in (*streams, pidfd):
            poller.register(fd, select.POLLIN)
        deadline = started + self.req.timeout if self.req.timeout is not None else None
        returncode: int | None = None
        duration = 0.0
        drain_until = 0.0
        try:
            while streams or returncode is None:
                now = time.monotonic()
                if deadline is not None and now >= deadline and returncode is None:
                    self.timed_out = True
                    self.kill()
                    deadline = None
                if returncode is not None and now >= drain_until:
                    # Descendants still hold the pipes after the command exited: end them,
                    # and stop waiting for good a few seconds later.
                    if not self.killed.is_set():
                        self.kill()
                        drain_until = now + 5.0
                    else:
                        break
                limits = [
                    t for t in (deadline, drain_until if returncode is not None else None) if t
                ]
                wait_ms = None if not limits else max(0, int((min(limits) - now) * 1000) + 1)
                for fd, _mask in poller.poll(wait_ms):
                    if fd == pidfd:
                        poller.unregister(pidfd)
                        returncode = proc.wait()
                        duration = time.monotonic() - started
                        drain_until = time.monotonic() + DRAIN_GRACE
                        continue
                    try:
                        data = os.read(fd, CHUNK)
                    except OSError:
                        data = b""
                    if data:
                        self.wire.send(streams[fd], self.request_id, data, session=self.session)
                    else:
                        poller.unregister(fd)
                        del streams[fd]
        finally:
            os.close(pidfd)
            for pipe in pipes:
                with contextlib.suppress(OSError):
                    pipe.close()
            if self.master is not None:
                self._stdin.put(None)  # the feeder stops before the master goes
                with contextlib.suppress(OSError):
                    os.close(self.master)
        if self.req.stdin:
            self._stdin.put(None)
        assert returncode is not None
        signum = -returncode if returncode < 0 else None
        exit_code = None if signum is not None else returncode
        error = None
        if self.cgroup is not None and cgroups.oom_kills(self.cgroup):
            error = "out of memory: the guest's OOM killer ended processes of this command"
        self._finish(Result(exit_code, signum, self.timed_out, duration, error))

    def _spawn(self) -> None:
        env, uid, gid, home = self._env_and_ids()
        workdir = image_defaults().workdir
        cwd = self.req.cwd or (workdir if workdir and os.path.isdir(workdir) else home)
        argv = self._argv()
        slave = None
        if self.req.pty is not None:
            # setsid -c: a session of its own with the terminal as controlling tty (so ^C
            # reaches the foreground group), without a preexec_fn (no vfork then)
            with self._stdin_lock:
                self.master, slave = os.openpty()
                _set_size(self.master, *self.req.pty)
            env.setdefault("TERM", "xterm-256color")
            argv = ["setsid", "-c", *argv]
        streams: dict[str, Any] = (
            {"stdin": slave, "stdout": slave, "stderr": slave}
            if slave is not None
            else {
                "stdin": subprocess.PIPE if self.req.stdin else subprocess.DEVNULL,
                "stdout": subprocess.PIPE,
                "stderr": subprocess.PIPE,
            }
        )
        self.cgroup = cgroups.make(self.request_id, self.req.pids_max)
        try:
            with cgroups.spawn_lock, cgroups.inside(self.cgroup):
                # Children inherit the cgroup of their parent at fork: briefly moving the
                # agent into the execution's cgroup places the child there with no race and
                # keeps subprocess's fast vfork path (a preexec_fn would disable it).
                self.proc = subprocess.Popen(
                    argv,
                    cwd=cwd,
                    env=env,
                    user=uid,
                    group=gid,
                    extra_groups=[] if uid is not None else None,
                    start_new_session=slave is None,  # setsid does it for a terminal
                    **streams,
                )
        except BaseException:
            if self.master is not None:
                os.close(self.master)
                self.master = None
            raise
        finally:
            if slave is not None:
                os.close(slave)
        with contextlib.suppress(OSError):  # inherited -1000 from the agent: make it killable
            write_file(f"/proc/{self.proc.pid}/oom_score_adj", "0")

    def _feed(self, target: Any, close: bool) -> None:
        """Queued stdin into ``target`` (a pipe, closed at EOF; or the PTY's master fd,
        which stays open: closing it would hang the terminal up)."""
        fd = target if isinstance(target, int) else target.fileno()
        try:
            while True:
                data = self._stdin.get()
                if data is None:
                    return
                with self._stdin_lock:
                    self._stdin_queued -= len(data)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
        except OSError:
            return  # the command closed its stdin or died
        finally:
            if close:
                with contextlib.suppress(OSError):
                    target.close()

    def _finish(self, result: Result) -> None:
        self.wire.send(MessageType.RESULT, self.request_id, result.to_payload(), self.session)
        self.wire.forget(self.request_id, self)
        cgroups.remove(self.cgroup)


def _set_size(fd: int, cols: int, rows: int) -> None:
    import fcntl
    import struct
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
