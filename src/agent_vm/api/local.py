"""How root on this host finds the local server: its socket (``$AGENT_VM_SOCKET``, else
``/run/agent-vm/api.sock``) and the local token it writes next to it (``api.token``, 0600,
for as long as it runs). The CLI and ``Sandbox(server=...)`` use them when no token is
given. ``LocalApi`` is the one standard-library client of a server (the CLI's fast path
and the operator's commands). Standard library only: the fast path (``quick.py``)
imports it before anything else.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

PREFIX = "avm_"  # every token starts so (api/tokens.py makes them)


def default_socket() -> str:
    return os.environ.get("AGENT_VM_SOCKET") or "/run/agent-vm/api.sock"


def local_token_path(socket: str | os.PathLike[str]) -> Path:
    """Where a server on ``socket`` keeps its local token (``api.sock`` → ``api.token``)."""
    path = Path(os.fspath(socket).removeprefix("unix://"))
    return path.with_name(f"{path.stem}.token")


def read_local_token(socket: str | os.PathLike[str]) -> str | None:
    """The local token of the server on ``socket``, for root on the same host."""
    try:
        token = local_token_path(socket).read_text().strip()
    except OSError:
        return None
    return token if token.startswith(PREFIX) else None


def write_local_token(socket: Path, token: str) -> Path:
    path = local_token_path(socket)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return path


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("agent-vm", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class LocalApi:
    """The smallest client of a server on a Unix socket (``http.client`` only): what the
    CLI's fast path and the operator's commands use where importing httpx, typer and
    pydantic would cost more than the call. ``OSError`` when nothing answers."""

    def __init__(self, path: str, token: str, timeout: float = 60.0) -> None:
        self.path = path
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def request(self, method: str, url: str, body: object = None) -> tuple[int, bytes]:
        connection = _UnixConnection(self.path, self.timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            connection.request(method, url, body=data, headers=self.headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def call(self, method: str, url: str, body: object = None) -> tuple[int, object]:
        """(status, the JSON answer or None)."""
        status, raw = self.request(method, url, body)
        return status, json.loads(raw) if raw else None

    def events(self, url: str) -> Iterator[dict[str, object]]:
        """The server-sent events of ``url``, as they come (no timeout: a command may
        run long); ends when the server ends the stream."""
        connection = _UnixConnection(self.path, None)
        try:
            connection.request("GET", url, headers=self.headers)
            response = connection.getresponse()
            if response.status != 200:
                raise OSError(f"the server answered {response.status} to {url}")
            while line := response.readline():
                if line.startswith(b"data: "):
                    yield json.loads(line[6:])
        finally:
            connection.close()


def refusal(body: object) -> str:
    """A server's refusal in one line (its ``detail``, and the hint when there is one)."""
    if not isinstance(body, dict):
        return str(body)
    hint = body.get("hint")
    return f"{body.get('detail')}" + (f" (hint: {hint})" if hint else "")
