"""envd for every sandbox, on the E2B door's one listener: a request naming a sandbox
(``E2b-Sandbox-Id``, or a ``49983-<id>.<domain>`` Host under ``E2B_DOMAIN``) is
resolved and checked here (``door.resolve``), then served by the Connect services
(``process.Process``, ``filesystem.Filesystem``) or by envd's HTTP calls: ``/files``
(read, and write as multipart or octet-stream, gzip or not) and ``/health``.

Uploads are streamed into the sandbox as they arrive; a multipart body is parsed by
Starlette (files past 1 MiB spill to a temporary file that goes with the request).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from e2b.envd.filesystem.filesystem_connect import FilesystemASGIApplication
from e2b.envd.process.process_connect import ProcessASGIApplication
from starlette.datastructures import Headers, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from agent_vm.api.e2b import door
from agent_vm.api.e2b.errors import body, http_status
from agent_vm.api.e2b.filesystem import FilesystemService, give
from agent_vm.api.e2b.process import ProcessService
from agent_vm.api.service import SandboxService
from agent_vm.api.tokens import TokenStore
from agent_vm.errors import AgentVMError, SandboxStateError

ENVD_PORT = 49983
MAX_MESSAGE = 16 << 20  # a Connect request's largest message
_HOST = re.compile(r"^(\d+)-([A-Za-z0-9_-]+)\.")


def sandbox_of(headers: Headers) -> str | None:
    """The sandbox an envd request names, or None for a control-plane request."""
    named = headers.get("e2b-sandbox-id")
    if named:
        return named
    found = _HOST.match(headers.get("host", ""))
    return found.group(2) if found and int(found.group(1)) == ENVD_PORT else None


def _refusal(status: int, message: str) -> JSONResponse:
    return JSONResponse(body(status, message), status_code=status)


async def _gunzipped(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    async for chunk in chunks:
        if out := inflate.decompress(chunk):
            yield out
    if tail := inflate.flush():
        yield tail


async def _upload_chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(1 << 20):
        yield chunk


def _written(path: str) -> dict[str, str]:
    return {"name": path.rsplit("/", 1)[-1], "type": "file", "path": path}


async def read_file(request: Request, target: door.Target) -> Response:
    target = target.as_user(request.query_params.get("username"))
    path = target.path(request.query_params.get("path", ""))
    chunks = target.hosted.handle.files.read_stream(path)
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        return Response(b"", media_type="application/octet-stream")

    async def rest() -> AsyncIterator[bytes]:
        yield first
        async for chunk in chunks:
            yield chunk

    return StreamingResponse(rest(), media_type="application/octet-stream")


async def write_files(request: Request, target: door.Target) -> Response:
    target = target.as_user(request.query_params.get("username"))
    if any(name.lower().startswith("x-metadata-") for name in request.headers):
        return _refusal(400, "agent-vm does not keep file metadata: write without metadata=")
    files = target.hosted.handle.files
    named = request.query_params.get("path")
    kind = request.headers.get("content-type", "")
    written: list[str] = []
    if kind.startswith("multipart/form-data"):
        async with request.form(max_files=1000, max_fields=1000) as form:
            uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            for upload in uploads:
                given = named if named and len(uploads) == 1 else upload.filename or ""
                if not given:
                    return _refusal(400, "a multipart part without a file name (its path)")
                path = target.path(given)
                await files.write(path, _upload_chunks(upload))
                written.append(path)
    else:
        if not named:
            return _refusal(400, "the path query parameter is required for this upload")
        path = target.path(named)
        chunks: AsyncIterator[bytes] = request.stream()
        if request.headers.get("content-encoding", "").lower() == "gzip":
            chunks = _gunzipped(chunks)
        await files.write(path, chunks)
        written.append(path)
    await give(target, written)
    return JSONResponse([_written(p) for p in written])


class Envd:
    """The ASGI app for envd requests (the door's dispatcher hands them here)."""

    def __init__(self, service: Callable[[], SandboxService], tokens: TokenStore) -> None:
        self.service = service
        self.tokens = tokens
        self.process = ProcessASGIApplication(ProcessService(), read_max_bytes=MAX_MESSAGE)
        self.filesystem = FilesystemASGIApplication(FilesystemService(), read_max_bytes=MAX_MESSAGE)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            target = door.resolve(self.service(), self.tokens, request.headers.get)
            if scope["path"] == "/health":
                paused = target.hosted.pausing or target.hosted.handle.state.value != "running"
                response: Response = (
                    _refusal(502, f"The sandbox {target.id} is paused") if paused
                    else Response(status_code=204)
                )  # fmt: skip
                return await response(scope, receive, send)
            await door.ready(target)
        except door.Refused as refused:
            return await _refusal(refused.status, refused.message)(scope, receive, send)
        except AgentVMError as exc:
            status = http_status(exc)
            return await _refusal(status, str(exc))(scope, receive, send)
        token = door.current.set(target)
        dropped: list[bool] = []
        door.dropped.set(dropped)

        async def sending(message: Message) -> None:
            if not dropped:  # after a drop nothing more goes out: uvicorn closes it
                await send(message)

        try:
            await self._route(target, scope, receive, sending, request)
        finally:
            door.current.reset(token)

    async def signed(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A signed file URL (no sandbox named: the signature says which)."""
        request = Request(scope, receive)
        operation = "read" if request.method == "GET" else "write"
        try:
            target = door.signed(self.service(), self.tokens, dict(request.query_params), operation)
            await door.ready(target)
        except door.Refused as refused:
            return await _refusal(refused.status, refused.message)(scope, receive, send)
        await self._route(target, scope, receive, send, request)

    async def _route(
        self, target: door.Target, scope: Scope, receive: Receive, send: Send, request: Request
    ) -> None:
        path: str = scope["path"]
        app: Any
        if path.startswith("/process.Process/"):
            app = self.process
        elif path.startswith("/filesystem.Filesystem/"):
            app = self.filesystem
        elif path == "/files" and request.method in ("GET", "POST"):
            handler = read_file if request.method == "GET" else write_files
            try:
                app = await handler(request, target)
            except SandboxStateError as exc:
                app = _refusal(502, str(exc))
            except AgentVMError as exc:
                app = _refusal(http_status(exc), str(exc))
        else:
            app = _refusal(404, f"envd has no {request.method} {path}")
        await app(scope, receive, send)
