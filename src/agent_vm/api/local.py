"""How root on this host finds the local server: its socket (``$AGENT_VM_SOCKET``, else
``/run/agent-vm/api.sock``) and the local token it writes next to it (``api.token``, 0600,
for as long as it runs). The CLI and ``Sandbox(server=...)`` use them when no token is
given; nothing here opens a connection. Standard library only: the CLI's fast path
(``quick.py``) imports it before anything else.
"""

from __future__ import annotations

import os
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
