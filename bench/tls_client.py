"""The egress benchmark's HTTPS client: runs unchanged on the host and inside a guest.

Standard library only. Job from the TLSBENCH environment variable (JSON: host (a name),
address (where it is), port, cafile (None: the system's store), downloads, download_bytes,
requests); prints one JSON object of samples timed with the local clock. Every request
is a new TCP connection and a new TLS handshake (no session reuse), as an agent's
short-lived tools make them.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import time


def exchange(job: dict[str, object], context: ssl.SSLContext, path: str) -> tuple[int, float]:
    """Bytes of body received and seconds for one GET over a fresh connection."""
    host, address, port = str(job["host"]), str(job["address"]), int(str(job["port"]))
    started = time.perf_counter()
    raw = socket.create_connection((address, port), timeout=120)
    with raw, context.wrap_socket(raw, server_hostname=host) as conn:
        conn.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = head.split(b"\r\n")[0]
        if not status.startswith(b"HTTP/1.") or b" 200 " not in status:
            raise SystemExit(f"{path}: {status!r}")
        received = len(body)
        try:
            while chunk := conn.recv(1 << 18):
                received += len(chunk)
        except ssl.SSLError:  # a server that closes without close_notify
            pass
    return received, time.perf_counter() - started


def main() -> None:
    job = json.loads(os.environ["TLSBENCH"])
    context = ssl.create_default_context(cafile=job.get("cafile"))
    size = int(job["download_bytes"])
    samples: dict[str, list[float]] = {"download_mib_s": [], "request_s": []}
    for _ in range(int(job["downloads"])):
        received, seconds = exchange(job, context, f"/bytes/{size}")
        if received != size:
            raise SystemExit(f"download: {received} of {size} bytes")
        samples["download_mib_s"].append(size / (1 << 20) / seconds)
    for _ in range(int(job["requests"])):
        samples["request_s"].append(exchange(job, context, "/")[1])
    print(json.dumps(samples))


if __name__ == "__main__":
    main()
