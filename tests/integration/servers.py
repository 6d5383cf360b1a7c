"""An ``agent-vm serve`` process for tests: started on its own socket, stopped with
SIGTERM, checked for what it leaves (the server tests, the SDK's shared sandbox tests,
the agent command through a server).

A test server keeps its audit log and its tokens in its own directory, never in the
host's state (two servers must not write one audit chain, and a test's tokens are not
the host's): ``tokens`` names a tokens file to share between servers of one module."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

CLI = [sys.executable, "-m", "agent_vm"]
POOL = ":light:isolated:1:2"


class Server:
    def __init__(
        self, root: Path, *args: str, env: dict[str, str] | None = None,
        tokens: Path | None = None,
    ) -> None:  # fmt: skip
        root.mkdir(parents=True, exist_ok=True)
        self.socket = root / "api.sock"
        self.audit = root / "audit.log"
        self.tokens = tokens or root / "tokens.json"
        self.log = (root / "server.log").open("wb")
        where = [] if "--host" in args or "--port" in args else ["--socket", str(self.socket)]
        own = {"AGENT_VM_AUDIT_LOG": str(self.audit), "AGENT_VM_TOKENS_FILE": str(self.tokens)}
        self.proc = subprocess.Popen(
            [*CLI, "--log-level", "info", "serve", *where, *args],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **own, **(env or {})},
        )  # fmt: skip
        self.log_path = root / "server.log"
        self.token_path = root / "api.token"

    def local_token(self) -> str:
        return self.token_path.read_text().strip()

    def client(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://agent-vm",
            headers=headers, timeout=120,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited: {self.log_path.read_text()[-2000:]}")
            try:
                with self.client(None) as client:
                    if client.get("/healthz").status_code == 200:
                        return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"the server did not answer within {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def domains() -> set[str]:
    out = subprocess.run(["virsh", "list", "--all", "--name"], capture_output=True, text=True)
    return {line for line in out.stdout.split() if line.startswith("agentvm-")}


@contextlib.contextmanager
def running_server(
    root: Path, *args: str, env: dict[str, str] | None = None, tokens: Path | None = None
) -> Iterator[Server]:
    """A server that must stop cleanly: exit by SIGTERM, no traceback, no domain left,
    neither its socket nor its local token."""
    before = domains()
    server = Server(root, *args, env=env, tokens=tokens)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
    log = server.log_path.read_text()
    # uvicorn re-raises the SIGTERM it handled once it has shut down (so -15, not 0)
    assert server.proc.returncode in (0, -signal.SIGTERM), log[-2000:]
    assert "Traceback" not in log, log[-4000:]
    assert domains() <= before, "the server left domains behind"
    assert not server.socket.exists() and not server.token_path.exists(), "files left"
