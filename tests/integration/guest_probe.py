"""Connection probes that run INSIDE a guest (standard library only).

``probe_code(probes)`` returns Python source for ``AgentExecutor.execute(code=...)``; it
runs every probe in parallel and prints one JSON object: probe key -> outcome. Outcomes
are short strings so that a failing assertion shows what happened:

* tcp: "open:<first bytes received>" or "timeout" / "refused" / "error:<...>";
* http: "ok:<body>" or like tcp;
* udp: "reply" or "timeout";
* icmp: "reply" or "no reply";
* dns (raw query to a server, UDP or TCP): "answer:<addresses>", "rcode:<n>", "timeout";
* resolve (the guest's own resolver, getaddrinfo): "ok:<addresses>" or "error:<...>".
"""

from __future__ import annotations

import inspect
import json
from typing import Any

TIMEOUT = 2.0


def _guest_main(probes: dict[str, list[Any]], timeout: float) -> None:  # pragma: no cover
    import json
    import os
    import socket
    import struct
    import subprocess
    import threading

    def connect(host: str, port: int, source: str | None) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        if source:
            sock.bind((source, 0))
        sock.connect((host, port))
        return sock

    def tcp(host: str, port: int, source: str | None = None) -> str:
        with connect(host, port, source) as sock:
            try:
                data = sock.recv(64)
            except TimeoutError:
                data = b""
            return "open:" + data.decode(errors="replace").strip()

    def http(host: str, port: int, source: str | None = None) -> str:
        with connect(host, port, source) as sock:
            sock.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
            return "ok:" + data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace").strip()

    def udp(host: str, port: int) -> str:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.sendto(b"probe", (host, port))
            sock.recvfrom(100)
            return "reply"

    def icmp(host: str) -> str:
        proc = subprocess.run(
            ["/opt/agent-vm/bin/busybox", "ping", "-c", "1", "-W", str(int(timeout)), host],
            capture_output=True,
            check=False,
        )
        return "reply" if proc.returncode == 0 else "no reply"

    def dns(name: str, server: str, use_tcp: bool = False) -> str:
        query = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
        for label in name.split("."):
            query += bytes([len(label)]) + label.encode()
        query += b"\x00" + struct.pack(">HH", 1, 1)
        if use_tcp:
            with connect(server, 53, None) as sock:
                sock.sendall(struct.pack(">H", len(query)) + query)
                reply = sock.recv(4096)[2:]
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(timeout)
                sock.sendto(query, (server, 53))
                reply = sock.recvfrom(4096)[0]
        rcode = reply[3] & 0x0F
        if rcode:
            return f"rcode:{rcode}"
        answers = struct.unpack(">H", reply[6:8])[0]
        return f"answer:{answers}"

    def resolve(name: str) -> str:
        infos = socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)
        return "ok:" + ",".join(sorted({str(info[4][0]) for info in infos}))

    kinds: dict[str, Any] = {
        "tcp": tcp,
        "http": http,
        "udp": udp,
        "icmp": icmp,
        "dns": dns,
        "resolve": resolve,
    }
    results: dict[str, str] = {}

    def run(key: str, kind: str, args: list[Any]) -> None:
        try:
            results[key] = kinds[kind](*args)
        except TimeoutError:
            results[key] = "timeout"
        except ConnectionRefusedError:
            results[key] = "refused"
        except OSError as exc:
            results[key] = f"error:{exc.strerror or exc}"
        except Exception as exc:
            results[key] = f"error:{exc!r}"

    threads = [
        threading.Thread(target=run, args=(key, probe[0], probe[1:]))
        for key, probe in probes.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    os.write(1, json.dumps(results).encode())


def probe_code(probes: dict[str, list[Any]], timeout: float = TIMEOUT) -> str:
    """Python source that runs ``probes`` ({key: [kind, *args]}) in the guest."""
    source = inspect.getsource(_guest_main)
    head = "from __future__ import annotations\n"
    return f"{head}{source}\n_guest_main({probes!r}, {timeout!r})\n"


def parse(stdout: str) -> dict[str, str]:
    result: dict[str, str] = json.loads(stdout)
    return result


def _guest_hammer(
    targets: list[tuple[str, int]], seconds: float, gap: float
) -> None:  # pragma: no cover
    """Opens a non-blocking connection to each target every ``gap`` seconds for
    ``seconds`` and counts those that complete: a filter missing for 50 ms shows up."""
    import json
    import os
    import resource
    import selectors
    import socket
    import time

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    selector = selectors.DefaultSelector()
    keys = [f"{host}:{port}" for host, port in targets]
    opened = dict.fromkeys(keys, 0)
    connected = dict.fromkeys(keys, 0)
    started: dict[socket.socket, float] = {}
    end = time.monotonic() + seconds
    while time.monotonic() < end or started:
        now = time.monotonic()
        if now < end:
            for key, target in zip(keys, targets, strict=True):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.connect_ex(target)
                selector.register(sock, selectors.EVENT_WRITE, key)
                started[sock] = now
                opened[key] += 1
        for event, _ in selector.select(timeout=gap):
            done = event.fileobj
            assert isinstance(done, socket.socket)
            if done.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                connected[event.data] += 1
            selector.unregister(done)
            del started[done]
            done.close()
        for sock, at in list(started.items()):
            if time.monotonic() - at > 1.5:  # the SYN and its first retransmission (1 s)
                selector.unregister(sock)
                del started[sock]
                sock.close()
    os.write(1, json.dumps({"opened": opened, "connected": connected}).encode())


def hammer_code(targets: list[tuple[str, int]], seconds: float, gap: float = 0.01) -> str:
    """Python source for the guest; prints ``{"opened": {"host:port": n}, "connected":
    {...}}``."""
    source = inspect.getsource(_guest_hammer)
    head = "from __future__ import annotations\n"
    return f"{head}{source}\n_guest_hammer({targets!r}, {seconds!r}, {gap!r})\n"
