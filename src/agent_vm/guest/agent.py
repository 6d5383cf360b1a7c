"""Guest agent: serves the control channel inside the VM. Standard library only.

One reader thread decodes frames from the host (this module); each execution runs in its
own thread (``process.py``), each file operation in another (``fileserver.py``); both
write through the ``Wire`` (``wire.py``). Design choices that the host relies on:

* Sessions. Every HELLO starts a new session and is answered with READY carrying the
  same session id. Executions of older sessions are killed, and a frame of an older
  session is never written after the new READY (the check happens under the writer
  lock), so the host can drop everything it receives before its READY.
* Backpressure, not buffering (see ``process.py``).
* Cleanup. Each execution gets its own cgroup and process group (``cgroups.py``).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import agent_vm
from agent_vm.errors import ProtocolError
from agent_vm.guest.files import SETTLED_MARKER, read_file, set_identity
from agent_vm.guest.fileserver import Operation
from agent_vm.guest.link import Link, open_link
from agent_vm.guest.process import Execution
from agent_vm.guest.wire import MAX_EXECUTIONS, Wire
from agent_vm.protocol.configure import Configure
from agent_vm.protocol.files import Ack, FileRequest, WorkspaceRequest
from agent_vm.protocol.frame import (
    FLAG_EOF,
    MAX_REQUEST_PAYLOAD,
    BadFrame,
    Frame,
    FrameDecoder,
    encode,
)
from agent_vm.protocol.messages import (
    PROTOCOL_VERSION,
    Execute,
    Hello,
    MessageType,
    Ready,
    Resize,
    Signal,
    Status,
)

TYPE_CHECKING = False  # typing/pathlib are avoided here: imports cost boot time under TCG
if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["MAX_EXECUTIONS", "Agent", "Link", "main"]


def log(message: str) -> None:
    """Diagnostics go to stderr, which init connects to the VM console log."""
    print(f"agent-vm agent: {message}", file=sys.stderr, flush=True)


class Agent(Wire):
    """The dispatcher: one reader thread decodes frames from the host and hands each to
    its execution, file operation or handler."""

    def __init__(self, link: Link) -> None:
        super().__init__(link)
        self.boot_id = read_file("/proc/sys/kernel/random/boot_id").strip()
        self.on_shutdown: Callable[[], None] = _ask_init_to_power_off

    def _ready(self, session: str | None) -> Ready:
        return Ready(
            session=session,
            agent_version=getattr(agent_vm, "__version__", "unknown"),
            protocol=PROTOCOL_VERSION,
            boot_id=self.boot_id,
            uptime=_uptime(),
        )

    # -- reading --

    def serve_forever(self) -> None:
        self.send(MessageType.READY, 0, self._ready(None).to_payload())  # announce
        decoder = FrameDecoder(max_payload=MAX_REQUEST_PAYLOAD)
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
            operation: Operation | None = self.files.get(rid)
        if operation is None:
            raise ProtocolError(f"no file operation with request id {rid}")
        return operation

    def _execution(self, rid: int) -> Execution:
        with self.exec_lock:
            execution: Execution | None = self.executions.get(rid)
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
    cmdline = read_file("/proc/cmdline")
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
