"""Guest agent: serves the control channel inside the VM. Standard library only.

One reader thread decodes frames from the host; each execution runs in its own thread
with one pump thread per output pipe. Design choices that the host relies on:

* Sessions. Every HELLO starts a new session and is answered with READY carrying the
  same session id. Executions of older sessions are killed, and a frame of an older
  session is never written after the new READY (the check happens under the writer
  lock), so the host can drop everything it receives before its READY.
* Backpressure, not buffering. Output is read in 64 KiB chunks and written to the port
  with blocking writes; if the host reads slowly, the pump blocks and the command blocks
  on its pipe. Stdin goes through a bounded per-execution queue so that the reader thread
  never waits on one command's pipe. Each execution is one thread polling both pipes and
  a pidfd of the process (plus a stdin feeder when stdin is used).
* Cleanup. Each execution gets its own cgroup (when cgroup2 is mounted) and process
  group; a timeout or SIGKILL kills the cgroup, which also catches processes that
  called setsid() to escape their group.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import queue
import select
import signal
import subprocess
import sys
import threading
import time

import agent_vm
from agent_vm.errors import ProtocolError
from agent_vm.guest.defaults import image_defaults
from agent_vm.guest.files import SETTLED_MARKER, read_file, set_identity, write_file
from agent_vm.guest.fileserver import Operation
from agent_vm.protocol.files import Ack, FileRequest, WorkspaceRequest
from agent_vm.protocol.frame import (
    FLAG_EOF,
    MAX_PAYLOAD,
    BadFrame,
    Frame,
    FrameDecoder,
    encode,
)
from agent_vm.protocol.messages import (
    PROTOCOL_VERSION,
    Configure,
    ErrorMessage,
    Execute,
    Hello,
    MessageType,
    Ready,
    Resize,
    Result,
    Signal,
    Status,
)
from agent_vm.protocol.ports import CHANNEL_NAME, VSOCK_CMDLINE_FLAG, VSOCK_PORT

TYPE_CHECKING = False  # typing/pathlib are avoided here: imports cost boot time under TCG
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

CHUNK = 64 * 1024
READ_CHUNK = 1 << 20  # from the port: fewer, larger reads for file streams
DRAIN_GRACE = 1.0
MAX_EXECUTIONS = 64
MAX_STDIN_QUEUED = 16 * 1024 * 1024
CGROUP_ROOT = "/sys/fs/cgroup"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def log(message: str) -> None:
    """Diagnostics go to stderr, which init connects to the VM console log."""
    print(f"agent-vm agent: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- links


class Link:
    """Byte stream to the host: ``read`` blocks until bytes arrive, ``write_all`` may block."""

    def read(self) -> bytes | memoryview:
        raise NotImplementedError

    def write_all(self, data: bytes) -> None:
        raise NotImplementedError


class SerialLink(Link):
    """A virtio-serial port. While no host is connected the port polls HUP and reads EOF,
    so we wait instead of treating it as the end."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        # one buffer for every read: allocating (and faulting in) a large bytes object per
        # read costs more than the data under TCG
        self._buffer = bytearray(READ_CHUNK)
        self._view = memoryview(self._buffer)

    def read(self) -> memoryview:
        """The bytes that arrived; valid until the next read (the decoder copies them)."""
        while True:
            count = os.readv(self.fd, [self._buffer])
            if count:
                return self._view[:count]
            time.sleep(0.01)  # EOF: no host connected (clones resume in this state)

    def write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]


class VsockLink(Link):
    """AF_VSOCK listener; a new host connection replaces the previous one."""

    def __init__(self, port: int = VSOCK_PORT) -> None:
        import socket  # only needed on vsock hosts

        self.server = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        self.server.bind((socket.VMADDR_CID_ANY, port))
        self.server.listen(4)
        self.conn: socket.socket | None = None
        self._lock = threading.Lock()

    def read(self) -> bytes:
        while True:
            conn = self.conn
            if conn is None:
                new, _ = self.server.accept()
                with self._lock:
                    self.conn = new
                continue
            try:
                data = conn.recv(CHUNK)
            except OSError:
                data = b""
            if data:
                return data
            with self._lock:
                if self.conn is conn:
                    self.conn = None
            conn.close()

    def write_all(self, data: bytes) -> None:
        with self._lock:
            conn = self.conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.sendall(data)


def find_serial_port(name: str = CHANNEL_NAME) -> str | None:
    """Without udev there is no /dev/virtio-ports/<name>; the name is in sysfs."""
    base = "/sys/class/virtio-ports"
    try:
        entries = os.listdir(base)
    except OSError:
        return None
    for entry in entries:
        if read_file(f"{base}/{entry}/name").strip() == name:
            return f"/dev/{entry}"
    return None


def open_link(wait: float = 30.0) -> Link:
    deadline = time.monotonic() + wait
    while True:
        path = find_serial_port()
        if path is not None and os.path.exists(path):
            return SerialLink(path)
        if os.path.exists("/dev/vsock") and VSOCK_CMDLINE_FLAG in _cmdline():
            return VsockLink()
        if time.monotonic() > deadline:
            raise RuntimeError("no control channel: neither virtio-serial port nor vsock")
        time.sleep(0.02)


def _set_size(fd: int, cols: int, rows: int) -> None:
    import fcntl
    import struct
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _cmdline() -> str:
    return read_file("/proc/cmdline")


# --------------------------------------------------------------------------- executions


class Execution:
    """One EXECUTE request: a process tree, its pumps, its timeout."""

    def __init__(self, agent: Agent, request_id: int, session: str, req: Execute) -> None:
        self.agent = agent
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
            self.agent.send_error(
                self.request_id, "stdin_overflow", "command is not reading its stdin"
            )
            self.kill()
            return
        if data:
            self._stdin.put(data)
        if eof:
            self._stdin.put(None)

    def resize(self, cols: int, rows: int) -> None:
        if self.master is None:
            raise ProtocolError("this execution has no terminal")
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
            with contextlib.suppress(OSError):
                write_file(f"{self.cgroup}/cgroup.kill", "1")
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
        entry = pwd.getpwnam(self.req.user or defaults.user)
        env = {
            "PATH": BASE_PATH,
            "HOME": entry.pw_dir,
            "USER": entry.pw_name,
            "LOGNAME": entry.pw_name,
            "SHELL": entry.pw_shell,
            "LANG": "C.UTF-8",
        }
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
        except (OSError, KeyError, ValueError) as exc:
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            self._finish(Result(code, None, False, time.monotonic() - started, str(exc)))
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
                        self.agent.send(streams[fd], self.request_id, data, session=self.session)
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
        if self.cgroup is not None and _oom_kills(self.cgroup):
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
        self.cgroup = self.agent.make_cgroup(self.request_id, self.req.pids_max)
        try:
            with self.agent.spawn_lock, self.agent.inside_cgroup(self.cgroup):
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
        self.agent.send(MessageType.RESULT, self.request_id, result.to_payload(), self.session)
        self.agent.forget(self.request_id, self)
        self.agent.remove_cgroup(self.cgroup)


# --------------------------------------------------------------------------- the agent


class Agent:
    def __init__(self, link: Link) -> None:
        self.link = link
        self.write_lock = threading.Lock()
        self.spawn_lock = threading.Lock()
        self.session: str | None = None
        self.executions: dict[int, Execution] = {}
        self.files: dict[int, Operation] = {}
        self.exec_lock = threading.Lock()
        self.cgroups = os.path.exists(f"{CGROUP_ROOT}/cgroup.procs") and os.getuid() == 0
        self.boot_id = read_file("/proc/sys/kernel/random/boot_id").strip()
        self.on_shutdown: Callable[[], None] = _ask_init_to_power_off

    # -- writing --

    def send(
        self,
        mtype: MessageType,
        request_id: int,
        payload: bytes = b"",
        session: str | None = None,
        flags: int = 0,
    ) -> bool:
        """Write one frame (split if large). Frames of a superseded session are dropped."""
        with self.write_lock:
            if session is not None and session != self.session:
                return False
            for start in range(0, max(len(payload), 1), MAX_PAYLOAD):
                chunk = payload[start : start + MAX_PAYLOAD]
                self.link.write_all(encode(Frame(mtype, request_id, chunk, flags)))
        return True

    def send_error(self, request_id: int, code: str, message: str) -> None:
        self.send(MessageType.ERROR, request_id, ErrorMessage(code, message).to_payload())

    def _ready(self, session: str | None) -> Ready:
        return Ready(
            session=session,
            agent_version=getattr(agent_vm, "__version__", "unknown"),
            protocol=PROTOCOL_VERSION,
            boot_id=self.boot_id,
            uptime=_uptime(),
        )

    # -- cgroups --

    def make_cgroup(self, request_id: int, pids_max: int | None = None) -> str | None:
        if not self.cgroups:
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
    def inside_cgroup(self, cgroup: str | None) -> Iterator[None]:
        if cgroup is None:
            yield None
            return
        write_file(f"{cgroup}/cgroup.procs", "0")
        try:
            yield None
        finally:
            write_file(f"{CGROUP_ROOT}/cgroup.procs", "0")

    def remove_cgroup(self, cgroup: str | None) -> None:
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

    # -- bookkeeping --

    def forget(self, request_id: int, execution: Execution) -> None:
        with self.exec_lock:
            if self.executions.get(request_id) is execution:
                del self.executions[request_id]

    def forget_file(self, request_id: int, operation: Operation) -> None:
        with self.exec_lock:
            if self.files.get(request_id) is operation:
                del self.files[request_id]

    # -- reading --

    def serve_forever(self) -> None:
        self.send(MessageType.READY, 0, self._ready(None).to_payload())  # announce
        decoder = FrameDecoder()
        while True:
            decoder.feed(self.link.read())
            for event in decoder.events():
                if isinstance(event, BadFrame):
                    self.send_error(event.request_id or 0, "bad_frame", event.reason)
                    continue
                try:
                    self.dispatch(event)
                except ProtocolError as exc:
                    self.send_error(event.request_id, "bad_request", str(exc))
                except Exception as exc:  # keep serving whatever one request does
                    log(f"internal error on {event.type:#x}: {exc!r}")
                    self.send_error(event.request_id, "internal", repr(exc))

    def dispatch(self, frame: Frame) -> None:
        try:
            mtype = MessageType(frame.type)
        except ValueError:
            raise ProtocolError(f"unknown message type {frame.type:#x}") from None
        if mtype is MessageType.HELLO:
            self._hello(Hello.from_payload(frame.payload))
            return
        if self.session is None:
            raise ProtocolError("no session yet: send HELLO first")
        rid = frame.request_id
        if mtype is MessageType.EXECUTE:
            self._execute(rid, Execute.from_payload(frame.payload))
        elif mtype is MessageType.STDIN:
            self._execution(rid).feed_stdin(frame.payload, bool(frame.flags & FLAG_EOF))
        elif mtype is MessageType.SIGNAL:
            self._execution(rid).signal(Signal.from_payload(frame.payload).signal)
        elif mtype is MessageType.RESIZE:
            size = Resize.from_payload(frame.payload)
            self._execution(rid).resize(size.cols, size.rows)
        elif mtype is MessageType.PING:
            self.send(MessageType.STATUS, rid, self._status().to_payload(), self.session)
        elif mtype is MessageType.CONFIGURE:
            configure(Configure.from_payload(frame.payload))
            self.send(MessageType.STATUS, rid, self._status().to_payload(), self.session)
        elif mtype is MessageType.WORKSPACE:
            from agent_vm.guest import workspace

            try:
                workspace.apply(WorkspaceRequest.from_payload(frame.payload))
            except OSError as exc:
                self.send_error(rid, "workspace_failed", exc.strerror or str(exc))
                return
            self.send(MessageType.STATUS, rid, self._status().to_payload(), self.session)
        elif mtype is MessageType.FILE:
            self._file(rid, FileRequest.from_payload(frame.payload))
        elif mtype is MessageType.DATA:
            self._operation(rid).feed(frame.payload, bool(frame.flags & FLAG_EOF))
        elif mtype is MessageType.ACK:
            consumed = Ack.from_payload(frame.payload).bytes
            with self.exec_lock:
                operation = self.files.get(rid)
            if operation is not None:  # else a late ACK, crossing our DONE: nothing to do
                operation.ack(consumed)
        elif mtype is MessageType.CANCEL:
            with self.exec_lock:
                operation = self.files.get(rid)
            if operation is not None:  # it may just have ended: nothing to do then
                operation.cancel()
        elif mtype is MessageType.SHUTDOWN:
            self.on_shutdown()
        else:
            raise ProtocolError(f"{mtype.name} is not a host-to-guest message")

    def _hello(self, hello: Hello) -> None:
        with self.write_lock:
            self.session = hello.session
            self.link.write_all(
                encode(Frame(MessageType.READY, 0, self._ready(hello.session).to_payload()))
            )
        with self.exec_lock:
            stale = [e for e in self.executions.values() if e.session != hello.session]
            for execution in stale:  # the new session's request ids start again at 1
                del self.executions[execution.request_id]
            old_files = [f for f in self.files.values() if f.session != hello.session]
            for operation in old_files:
                del self.files[operation.request_id]
        for execution in stale:
            execution.kill()
        for operation in old_files:
            operation.cancel()

    def _execute(self, rid: int, req: Execute) -> None:
        assert self.session is not None
        with self.exec_lock:
            if rid in self.executions:
                raise ProtocolError(f"request id {rid} is already running")
            if len(self.executions) >= MAX_EXECUTIONS:
                raise ProtocolError(f"too many concurrent executions (max {MAX_EXECUTIONS})")
            execution = Execution(self, rid, self.session, req)
            self.executions[rid] = execution
        execution.start()

    def _file(self, rid: int, req: FileRequest) -> None:
        assert self.session is not None
        with self.exec_lock:
            if rid in self.files or rid in self.executions:
                raise ProtocolError(f"request id {rid} is already in use")
            if len(self.files) >= MAX_EXECUTIONS:
                raise ProtocolError(f"too many concurrent file operations (max {MAX_EXECUTIONS})")
            operation = Operation(self, rid, self.session, req)
            self.files[rid] = operation
        operation.start()

    def _operation(self, rid: int) -> Operation:
        with self.exec_lock:
            operation = self.files.get(rid)
        if operation is None:
            raise ProtocolError(f"no file operation with request id {rid}")
        return operation

    def _execution(self, rid: int) -> Execution:
        with self.exec_lock:
            execution = self.executions.get(rid)
        if execution is None:
            raise ProtocolError(f"no running execution with request id {rid}")
        return execution

    def _status(self) -> Status:
        meminfo = read_file("/proc/meminfo")
        available = 0
        for line in meminfo.splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1])
        with self.exec_lock:
            running = len(self.executions)
        settled = os.path.exists(SETTLED_MARKER)
        return Status(_uptime(), running, os.getloadavg()[0], available, settled)


RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)


def configure(config: Configure) -> None:
    """Make this VM distinct from other clones of the same golden state."""
    time.clock_settime_ns(time.CLOCK_REALTIME, config.time_ns)
    if config.entropy:
        import fcntl
        import struct

        data = bytes.fromhex(config.entropy)
        with open("/dev/random", "wb", buffering=0) as rng:
            # Credit the host's entropy, then make the CRNG reseed now, not minutes later.
            fcntl.ioctl(rng, RNDADDENTROPY, struct.pack("ii", len(data) * 8, len(data)) + data)
            fcntl.ioctl(rng, RNDRESEEDCRNG)
    if config.hostname is not None or config.machine_id is not None:
        hostname = config.hostname or read_file("/proc/sys/kernel/hostname").strip()
        machine_id = config.machine_id or read_file("/etc/machine-id").strip()
        set_identity(hostname, machine_id)
    if config.net is not None:
        from agent_vm.guest import netconf

        netconf.apply(config.net)


def _oom_kills(cgroup: str) -> int:
    """Processes of the cgroup the OOM killer ended (memory.events, any OOM killer)."""
    for line in read_file(f"{cgroup}/memory.events").splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return 0


def _uptime() -> float:
    text = read_file("/proc/uptime")
    return float(text.split()[0]) if text else 0.0


def _ask_init_to_power_off() -> None:
    if os.getppid() == 1:
        os.kill(1, signal.SIGUSR2)
    else:
        raise ProtocolError("SHUTDOWN needs the agent to run under agent-vm's init")


def main() -> None:
    link = open_link()
    cmdline = _cmdline()
    if "agentvm.debug=1" in cmdline:
        log(f"control channel open at uptime {_uptime():.3f}")
    for token in cmdline.split():
        if token.startswith("agentvm.net="):
            # init applies these settings at boot; knowing them lets a clone's CONFIGURE
            # change only what differs (clones start with the template's memory).
            from agent_vm.guest import netconf

            netconf.remember(netconf.from_cmdline(token.partition("=")[2]))
    Agent(link).serve_forever()


if __name__ == "__main__":
    main()
