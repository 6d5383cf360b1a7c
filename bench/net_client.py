"""The network benchmark's client: runs unchanged on the host and inside a guest.

Standard library only (the guest has nothing else). Reads its job from the NETBENCH
environment variable (JSON: host, http_port, tcp_port, download_bytes, downloads,
requests) and prints one JSON object of samples, timed with the clock of wherever it
runs so that no control-channel or process start-up time is included.
"""

from __future__ import annotations

import json
import os
import socket
import time


def download(host: str, port: int, size: int) -> tuple[int, float]:
    """Bytes received and seconds for GET /bytes/<size> on a new connection."""
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout=60) as conn:
        conn.sendall(f"GET /bytes/{size} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        received = 0
        while chunk := conn.recv(1 << 18):
            received += len(chunk)
    return received, time.perf_counter() - started


def request(host: str, port: int) -> float:
    """Seconds for a whole small HTTP exchange: connect, GET /, read to close."""
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout=10) as conn:
        conn.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        while conn.recv(65536):
            pass
    return time.perf_counter() - started


def connect(host: str, port: int) -> float:
    """Seconds for the TCP handshake alone (one round trip through the filter)."""
    started = time.perf_counter()
    conn = socket.create_connection((host, port), timeout=10)
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed


def main() -> None:
    job = json.loads(os.environ["NETBENCH"])
    host, size = job["host"], job["download_bytes"]
    out: dict[str, list[float]] = {"connect": [], "request": [], "throughput_mb_s": []}
    request(host, job["http_port"])  # warm ARP, conntrack and the server's thread pool
    for _ in range(job["requests"]):
        out["connect"].append(connect(host, job["tcp_port"]))
        out["request"].append(request(host, job["http_port"]))
    for _ in range(job["downloads"]):
        received, seconds = download(host, job["http_port"], size)
        if received < size:
            raise SystemExit(f"download cut short: {received} of {size} bytes")
        out["throughput_mb_s"].append(size / seconds / 1e6)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
