"""The client half of ``agent-vm serve``: what ``AsyncSandbox(server=..., token=...)``
uses instead of a local VM. httpx for requests, httpx-sse for streamed output.

``server`` is ``http(s)://host:port`` or a Unix socket path (``/run/agent-vm/api.sock``
or ``unix:///run/agent-vm/api.sock``). The token comes from the argument, from
``AGENT_VM_TOKEN``, or (root, on the server's host) from the server's local token
file. Errors come back as the local ones: a missing file is a
``SandboxFileNotFoundError``, a refused request an ``AgentVMError`` with the server's
message and hint.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Sequence,
)
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import httpx
from httpx_sse import aconnect_sse
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.client import unix_connect as ws_unix_connect
from websockets.exceptions import InvalidStatus

from agent_vm.api.local import default_socket, read_local_token
from agent_vm.communication.files import (
    DEFAULT_MAX_DOWNLOAD,
    DEFAULT_MAX_ENTRIES,
    DownloadReport,
    FileEntry,
    WatchEvent,
    extract_into,
    file_error,
    save_stream,
    tar_of,
)
from agent_vm.errors import AgentVMError, AgentVMTimeout, ConfigError, SandboxFileNotFoundError
from agent_vm.execution.result import ExecutionResult
from agent_vm.network.blocked import Blocked
from agent_vm.network.policy import EgressPolicy
from agent_vm.protocol.messages import Result
from agent_vm.terminal import exit_status, wait_for_end

CHUNK = 1 << 20


def _transport(server: str) -> tuple[str, httpx.AsyncHTTPTransport | None]:
    if server.startswith(("http://", "https://")):
        return server.rstrip("/"), None
    path = server.removeprefix("unix://")
    if not path.startswith("/"):
        raise ConfigError(f"server {server!r}: give http(s)://HOST:PORT or a socket path")
    return "http://agent-vm", httpx.AsyncHTTPTransport(uds=path)


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text}
    detail = body.get("detail")
    message = detail if isinstance(detail, str) else json.dumps(detail)
    hint = body.get("hint")
    if body.get("kind") == "file":
        raise file_error(str(body.get("code")), message, str(body.get("path")))
    if response.status_code in (400, 422):
        raise ConfigError(message, hint=hint)
    if response.status_code == 504:
        raise AgentVMTimeout(message, hint=hint)
    raise AgentVMError(f"server: {response.status_code} {message}", hint=hint)


def resolve_token(server: str, token: str | None) -> str:
    """The token to send: the caller's, ``$AGENT_VM_TOKEN``, else the local token of a
    server on this host's socket (readable by root only)."""
    found = token or os.environ.get("AGENT_VM_TOKEN")
    if not found and not server.startswith(("http://", "https://")):
        found = read_local_token(server)
    if not found:
        raise ConfigError(
            "a server needs a token",
            hint="token=..., or AGENT_VM_TOKEN=avm_... in the environment",
        )
    return found


def _entry(data: dict[str, Any]) -> FileEntry:
    return FileEntry(**{**data, "modified": datetime.fromisoformat(data["modified"])})


class RemoteClient:
    """One sandbox on a server."""

    def __init__(self, server: str | None, token: str | None) -> None:
        self.server = server or default_socket()
        base, transport = _transport(self.server)
        self.token = resolve_token(self.server, token)
        self.http = httpx.AsyncClient(
            base_url=base, transport=transport, headers={"Authorization": f"Bearer {self.token}"},
            timeout=httpx.Timeout(60.0, read=None),
        )  # fmt: skip
        self.id: str | None = None

    @property
    def prefix(self) -> str:
        if self.id is None:
            raise AgentVMError("the sandbox is not running", hint="create() or start() it first")
        return f"/v1/sandboxes/{self.id}"

    async def _call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self.http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise AgentVMError(
                f"cannot reach the agent-vm server: {exc}",
                hint="is `agent-vm serve` running there?",
            ) from exc
        _raise_for(response)
        return response

    async def create(self, body: dict[str, Any]) -> str:
        self.id = (await self._call("POST", "/v1/sandboxes", json=body)).json()["id"]
        return self.id

    async def delete(self) -> None:
        if self.id is None:
            return
        sandbox, self.id = self.id, None
        try:
            await self._call("DELETE", f"/v1/sandboxes/{sandbox}")
        finally:
            await self.http.aclose()

    async def run(
        self,
        cmd: str | Sequence[str] | None,
        *,
        code: str | None = None,
        timeout: float | None,
        envs: dict[str, str],
        cwd: str | None,
        user: str | None,
        stdin: str | bytes | None,
        on_stdout: Callable[[str], None] | None,
        on_stderr: Callable[[str], None] | None,
    ) -> ExecutionResult:
        if isinstance(stdin, bytes):
            stdin = stdin.decode()
        body = {"cmd": cmd if cmd is None or isinstance(cmd, str) else list(cmd), "code": code,
                "env": envs, "cwd": cwd, "user": user, "timeout": timeout,
                "stdin": stdin}  # fmt: skip
        execution = (await self._call("POST", f"{self.prefix}/executions", json=body)).json()
        out: list[str] = []
        err: list[str] = []
        result: dict[str, Any] = {}
        last = -1
        while not result:  # reconnect with the last event seen if the stream drops
            try:
                async with aconnect_sse(
                    self.http, "GET", execution["events"], params={"after": last}
                ) as source:
                    _raise_for(source.response)
                    async for sse in source.aiter_sse():
                        event = json.loads(sse.data)
                        last = event["seq"]
                        if event["type"] == "stdout":
                            out.append(event["text"])
                            if on_stdout:
                                on_stdout(event["text"])
                        elif event["type"] == "stderr":
                            err.append(event["text"])
                            if on_stderr:
                                on_stderr(event["text"])
                        elif event["type"] == "result":
                            result = event
            except httpx.TransportError:
                continue
        if result.get("exit_code") is None and result.get("error"):
            raise AgentVMError(f"the execution failed on the server: {result['error']}")
        return ExecutionResult(
            exit_code=result["exit_code"],
            stdout_bytes="".join(out).encode(),
            stderr_bytes="".join(err).encode(),
            duration=result.get("duration", 0.0),
            timed_out=result.get("timed_out", False),
            signal=result.get("signal"),
            error=result.get("error"),
            truncated=result.get("truncated", False),
        )

    async def set_policy(self, policy: EgressPolicy) -> None:
        await self._call("PUT", f"{self.prefix}/policy", json=policy.model_dump(mode="json"))

    async def blocked(self) -> list[Blocked]:
        data = (await self._call("GET", f"{self.prefix}/blocked")).json()
        return [Blocked(**{**b, "at": datetime.fromisoformat(b["at"])}) for b in data]


class RemoteFiles:
    """The files API over HTTP (the methods ``AsyncFiles`` forwards)."""

    def __init__(self, client: RemoteClient) -> None:
        self.client = client

    async def _download(self, what: str, path: str) -> AsyncGenerator[bytes, None]:
        """A streamed GET of ``files/{what}``: a refusal raises before the first chunk."""
        url = f"{self.client.prefix}/files/{what}"
        async with self.client.http.stream("GET", url, params={"path": path}) as response:
            if response.status_code >= 400:
                await response.aread()
                _raise_for(response)
            async for chunk in response.aiter_bytes(CHUNK):
                yield chunk

    async def read_stream(self, path: str) -> AsyncIterator[bytes]:
        async for chunk in self._download("content", path):
            yield chunk

    async def read(self, path: str, format: str = "text") -> str | bytes:
        data = b"".join([chunk async for chunk in self.read_stream(path)])
        return data.decode() if format == "text" else data

    async def write(
        self,
        path: str,
        data: str | bytes | IO[bytes] | Iterable[bytes] | AsyncIterable[bytes],
        mode: int | None = None,
    ) -> int:
        async def body() -> AsyncIterator[bytes]:
            if isinstance(data, str):
                yield data.encode()
            elif isinstance(data, bytes | bytearray):
                yield bytes(data)
            elif hasattr(data, "read"):
                while chunk := data.read(CHUNK):
                    yield chunk
            elif isinstance(data, AsyncIterable):
                async for chunk in data:
                    yield chunk
            else:
                for chunk in data:
                    yield bytes(chunk)

        params: dict[str, Any] = {"path": path}
        if mode is not None:
            params["mode"] = mode
        response = await self.client._call(
            "PUT", f"{self.client.prefix}/files/content", params=params, content=body()
        )
        return int(response.json()["bytes"])

    async def list(self, path: str, depth: int = 1) -> list[FileEntry]:
        data = (
            await self.client._call(
                "GET", f"{self.client.prefix}/files", params={"path": path, "depth": depth}
            )
        ).json()
        return [_entry(item) for item in data]

    async def stat(self, path: str) -> FileEntry:
        url = f"{self.client.prefix}/files/stat"
        return _entry((await self.client._call("GET", url, params={"path": path})).json())

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except SandboxFileNotFoundError:
            return False
        return True

    async def make_dir(self, path: str) -> bool:
        url = f"{self.client.prefix}/files/dir"
        return bool((await self.client._call("POST", url, params={"path": path})).json()["made"])

    async def remove(self, path: str) -> None:
        await self.client._call("DELETE", f"{self.client.prefix}/files", params={"path": path})

    async def rename(self, old_path: str, new_path: str) -> None:
        await self.client._call(
            "POST", f"{self.client.prefix}/files/rename", params={"old": old_path, "new": new_path}
        )

    async def upload(self, local: str | os.PathLike[str], remote: str) -> int:
        source = await asyncio.to_thread(Path(local).open, "rb")
        try:
            mode = os.fstat(source.fileno()).st_mode & 0o755
            return await self.write(remote, source, mode=mode)
        finally:
            source.close()

    async def download(self, remote: str, local: str | os.PathLike[str]) -> int:
        return await save_stream(self.read_stream(remote), local)

    async def watch(self, path: str, recursive: bool = False) -> AsyncIterator[WatchEvent]:
        url = f"{self.client.prefix}/files/watch"
        params = {"path": path, "recursive": recursive}
        async with aconnect_sse(self.client.http, "GET", url, params=params) as source:
            if source.response.status_code >= 400:
                await source.response.aread()
                _raise_for(source.response)
            async for sse in source.aiter_sse():
                yield WatchEvent(**json.loads(sse.data))

    async def upload_dir(self, local: str | os.PathLike[str], remote: str) -> int:
        source = Path(local)
        if not await asyncio.to_thread(source.is_dir):
            raise ConfigError(f"{source} is not a directory")
        url = f"{self.client.prefix}/files/tar"
        response = await self.client._call(
            "PUT", url, params={"path": remote}, content=tar_of(source)
        )
        return int(response.json()["bytes"])

    async def download_dir(
        self,
        remote: str,
        local: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_DOWNLOAD,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> DownloadReport:
        """Extracted here with ``SafeExtractor``: the server passes the guest's bytes on
        untouched, so they get the care a local download gets."""
        return await extract_into(
            self._download("tar", remote), local, max_bytes=max_bytes, max_entries=max_entries
        )


class RemotePty:
    """Terminals over the server's WebSocket (``/v1/sandboxes/{id}/pty``)."""

    def __init__(self, client: RemoteClient) -> None:
        self.client = client
        self.server = client.server
        self.token = client.token
        self._sessions: dict[int, tuple[ClientConnection, asyncio.Task[dict[str, Any]]]] = {}
        self._next = 0

    async def _connect(self) -> ClientConnection:
        path = f"{self.client.prefix}/pty"
        headers = {"Authorization": f"Bearer {self.token}"}
        try:
            if self.server.startswith(("http://", "https://")):
                url = "ws" + self.server.rstrip("/").removeprefix("http") + path
                return await ws_connect(url, additional_headers=headers, max_size=2**20)
            return await ws_unix_connect(
                self.server.removeprefix("unix://"), f"ws://agent-vm{path}",
                additional_headers=headers, max_size=2**20,
            )  # fmt: skip
        except (OSError, InvalidStatus) as exc:
            raise AgentVMError(f"cannot open a terminal on the server: {exc}") from exc

    async def create(
        self,
        cols: int,
        rows: int,
        on_data: Callable[[bytes], None] | None,
        *,
        cmd: str | Sequence[str] | None,
        code: str | None = None,
        envs: dict[str, str],
        cwd: str | None,
        user: str | None,
        timeout: float | None,
    ) -> int:
        ws = await self._connect()
        start = {"cols": cols, "rows": rows, "env": envs, "cwd": cwd, "user": user,
                 "timeout": timeout, "code": code, "cmd": cmd if cmd is None or isinstance(cmd, str)
                 else list(cmd)}  # fmt: skip
        await ws.send(json.dumps(start))

        async def read() -> dict[str, Any]:
            async for message in ws:
                if isinstance(message, bytes):
                    if on_data is not None:
                        on_data(message)
                    continue
                data: dict[str, Any] = json.loads(message)
                if "error" in data:
                    raise ConfigError(f"the server refused the terminal: {data['error']}")
                return data
            raise AgentVMError("the terminal's connection closed before its command ended")

        self._next += 1
        self._sessions[self._next] = (ws, asyncio.create_task(read()))
        return self._next

    def _ws(self, handle: int) -> ClientConnection:
        return self._sessions[handle][0]

    async def send_input(self, handle: int, data: bytes) -> None:
        await self._ws(handle).send(data)

    async def resize(self, handle: int, cols: int, rows: int) -> None:
        await self._ws(handle).send(json.dumps({"resize": [cols, rows]}))

    async def kill(self, handle: int) -> None:
        await self._ws(handle).send(json.dumps({"kill": True}))

    async def wait(self, handle: int, timeout: float | None) -> int:
        ws, reader = self._sessions[handle]
        result = await wait_for_end(reader, handle, timeout)
        self._sessions.pop(handle, None)
        await ws.close()
        return exit_status(result.get("exit_code"), result.get("signal"))


class RemoteTerminal:
    """One server terminal in the shape ``terminal.attach`` drives (``agent-vm run -t``
    and ``shell`` through a server)."""

    def __init__(self, pty: RemotePty, handle: int) -> None:
        self.pty = pty
        self.handle = handle

    async def send_input(self, request_id: int, data: bytes) -> None:
        await self.pty.send_input(self.handle, data)

    async def resize(self, request_id: int, cols: int, rows: int) -> None:
        await self.pty.resize(self.handle, cols, rows)

    def end_terminal(self, request_id: int) -> None:
        return None

    async def result(self) -> Result:
        reader = self.pty._sessions[self.handle][1]
        data = await asyncio.shield(reader)
        await self.pty._ws(self.handle).close()
        return Result(data.get("exit_code"), data.get("signal"), bool(data.get("timed_out")), 0.0)
