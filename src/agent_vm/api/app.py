"""The HTTP API (FastAPI): sandboxes, executions streamed as server-sent events, files,
policy, pools. Every route but ``/healthz`` needs a token; a sandbox is visible only to
the token that created it (404 to any other). OpenAPI at ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response, WebSocket
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent_vm import __version__
from agent_vm.api.pty import serve_pty
from agent_vm.api.service import Execution, Hosted, NotFound, OverQuota, Paused, SandboxService
from agent_vm.api.tokens import TokenRecord, TokenStore
from agent_vm.communication.files import FileService
from agent_vm.errors import (
    AgentVMError,
    AgentVMTimeout,
    ConfigError,
    SandboxFileError,
    SandboxFileNotFoundError,
    SandboxPermissionError,
)
from agent_vm.logs import get_logger
from agent_vm.network.policy import EgressPolicy

log = get_logger(__name__)

MAX_LIFETIME = 7 * 86400.0


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkspaceRequest(_Body):
    path: str = Field(description="a directory below the server's --workspace-root")
    readonly: bool = False


class CreateSandbox(_Body):
    image: str | None = None
    profile: Literal["light", "standard", "intensive"] = "light"
    network: str = Field(default="nat", pattern=r"^(nat|isolated|bridge:[A-Za-z0-9_.-]+)$")
    labels: dict[str, Annotated[str, Field(max_length=256)]] = Field(default={}, max_length=32)
    lifetime_seconds: float = Field(default=3600.0, gt=0, le=MAX_LIFETIME)
    policy: EgressPolicy | None = None
    workspace: WorkspaceRequest | None = None
    anomaly_action: Literal["log", "pause", "kill"] | None = Field(
        default=None, description="what an anomaly rule's alert does here (default: server's)"
    )


class KeepAlive(_Body):
    lifetime_seconds: float = Field(gt=0, le=MAX_LIFETIME)


class RunCommand(_Body):
    cmd: str | list[str] | None = Field(
        default=None, description="a string runs through bash; a list is exec'd"
    )
    code: str | None = Field(default=None, description="Python source, run with python3")
    env: dict[str, str] = {}
    cwd: str | None = None
    user: Literal["root", "agent"] | None = None
    timeout: float | None = Field(default=60.0, gt=0, le=7 * 86400)
    stdin: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> RunCommand:
        if (self.cmd is None) == (self.code is None):
            raise ValueError("give cmd or code (one of them)")
        return self


class SendSignal(_Body):
    signal: Literal["HUP", "INT", "QUIT", "KILL", "USR1", "USR2", "TERM", "CONT", "STOP"] = Field(
        description="delivered to the command's process group in the guest"
    )


_bearer = HTTPBearer(auto_error=False)


async def _token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> TokenRecord:
    """The caller's token record; 401 (and nothing else done) without a live one."""
    tokens: TokenStore = request.app.state.tokens
    record = tokens.verify(credentials.credentials) if credentials is not None else None
    if record is None:
        client = request.client.host if request.client else "unix"
        log.warning("api_auth_failed", path=request.url.path, client=client)
        request.app.state.on_auth_failure(request.url.path, client)
        raise HTTPException(
            401, "a valid token is needed (Authorization: Bearer avm_...)",
            headers={"WWW-Authenticate": "Bearer"},
        )  # fmt: skip
    return record


Token = Annotated[TokenRecord, Depends(_token)]


def _sandbox_view(hosted: Hosted) -> dict[str, Any]:
    return hosted.view()


def create_app(service: Callable[[], SandboxService], tokens: TokenStore) -> FastAPI:
    """``service`` returns the running service (made in the server's lifespan)."""
    app = FastAPI(title="agent-vm", version=__version__)
    app.state.tokens = tokens

    quiet = {"until": 0.0, "suppressed": 0}

    def auth_failed(path: str, client: str) -> None:
        """Counted always; audited at most once a second (with how many were not), so a
        client hammering with bad tokens cannot rotate the real history away."""
        with contextlib.suppress(KeyError):  # before the service exists: nothing to tell
            watch = service().watch
            watch.metrics.auth_failures.inc()
            now = time.monotonic()
            if now < quiet["until"]:
                quiet["suppressed"] += 1
                return
            watch.record("auth_failed", path=path, client=client,
                         suppressed_before=quiet["suppressed"])  # fmt: skip
            quiet["until"], quiet["suppressed"] = now + 1.0, 0

    app.state.on_auth_failure = auth_failed

    @app.exception_handler(AgentVMError)
    async def _errors(_: Request, exc: AgentVMError) -> JSONResponse:
        body: dict[str, Any] = {"detail": exc.message, "hint": exc.hint}
        if isinstance(exc, SandboxFileError):
            body |= {"kind": "file", "code": exc.code, "path": exc.path}
            status = 404 if isinstance(exc, SandboxFileNotFoundError) else 409
            if isinstance(exc, SandboxPermissionError):
                status = 403
        elif isinstance(exc, NotFound):
            status = 404
        elif isinstance(exc, OverQuota):
            status = 429
        elif isinstance(exc, Paused):
            status = 409
        elif isinstance(exc, ConfigError):
            status = 400
        elif isinstance(exc, AgentVMTimeout):
            status = 504
        else:
            status = 502
        return JSONResponse(body, status_code=status)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "version": __version__, "sandboxes": len(service().sandboxes)}

    @app.get("/v1/pools")
    async def pools(_: Token) -> list[dict[str, Any]]:
        source = service().source
        held = getattr(source, "pools", {})
        return [
            {"image": spec.image, "profile": spec.profile, "network": spec.network,
             "min_size": spec.min_size, "max_size": spec.max_size,
             **{k: v for k, v in vars(pool.stats()).items() if k != "start_seconds"}}
            for spec, pool in held.items()
        ]  # fmt: skip

    @app.post("/v1/sandboxes", status_code=201)
    async def create(body: CreateSandbox, owner: Token) -> dict[str, Any]:
        hosted = await service().create(
            owner, image=body.image, profile=body.profile, network=body.network,
            labels=body.labels, lifetime=body.lifetime_seconds, policy=body.policy,
            workspace=(body.workspace.path, body.workspace.readonly) if body.workspace else None,
            anomaly_action=body.anomaly_action,
        )  # fmt: skip
        return _sandbox_view(hosted)

    @app.post("/v1/sandboxes/{sandbox_id}/resume")
    async def resume(sandbox_id: str, owner: Token) -> dict[str, Any]:
        """Resume a sandbox an anomaly rule paused."""
        return _sandbox_view(await service().resume(owner, sandbox_id))

    @app.get("/metrics")
    async def metrics(owner: Token) -> Response:
        """Prometheus text format. Needs a token made with ``--metrics`` (the figures
        cover every tenant's sandboxes)."""
        if not owner.metrics:
            raise HTTPException(
                403, "this token may not read metrics (agent-vm token create --metrics)"
            )
        body = await asyncio.to_thread(service().watch.metrics.scrape)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/sandboxes")
    async def list_sandboxes(
        owner: Token, label: Annotated[list[str] | None, Query()] = None
    ) -> list[dict[str, Any]]:
        wanted = dict(item.partition("=")[::2] for item in label or [])
        return [
            _sandbox_view(h)
            for h in service().list(owner)
            if all(h.labels.get(k) == v for k, v in wanted.items())
        ]

    @app.get("/v1/sandboxes/{sandbox_id}")
    async def get(sandbox_id: str, owner: Token) -> dict[str, Any]:
        return _sandbox_view(service().get(owner, sandbox_id))

    @app.delete("/v1/sandboxes/{sandbox_id}", status_code=204)
    async def delete(sandbox_id: str, owner: Token) -> Response:
        await service().delete(owner, sandbox_id)
        return Response(status_code=204)

    @app.post("/v1/sandboxes/{sandbox_id}/keepalive")
    async def keep_alive(sandbox_id: str, body: KeepAlive, owner: Token) -> dict[str, Any]:
        return _sandbox_view(service().keep_alive(owner, sandbox_id, body.lifetime_seconds))

    # ------------------------------------------------------------------ executions

    @app.post("/v1/sandboxes/{sandbox_id}/executions", status_code=201, response_model=None)
    async def execute(
        sandbox_id: str, body: RunCommand, owner: Token, wait: bool = False
    ) -> dict[str, Any]:
        execution = service().start_execution(
            owner, sandbox_id, body.cmd, code=body.code, env=body.env, cwd=body.cwd, user=body.user,
            timeout=body.timeout, stdin=body.stdin,
        )  # fmt: skip
        if not wait:
            return {"id": execution.id, "sandbox": sandbox_id,
                    "events": f"/v1/executions/{execution.id}/events"}  # fmt: skip
        return await _collect(execution)

    @app.get("/v1/executions/{execution_id}/events")
    async def events(
        execution_id: str, owner: Token, after: Annotated[int, Query(ge=-1)] = -1
    ) -> StreamingResponse:
        """Server-sent events from ``after`` on (the ``id:`` of the last one seen): a
        client that lost the stream reconnects with it and misses nothing."""
        execution = service().execution(owner, execution_id)

        async def stream() -> AsyncIterator[bytes]:
            async for event in execution.follow(after):
                yield (
                    f"id: {event['seq']}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"
                ).encode()

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/v1/executions/{execution_id}")
    async def execution_status(execution_id: str, owner: Token) -> dict[str, Any]:
        execution = service().execution(owner, execution_id)
        result = execution.events[-1] if execution.done and execution.events else None
        return {"id": execution.id, "sandbox": execution.sandbox, "done": execution.done,
                "result": result}  # fmt: skip

    @app.post("/v1/executions/{execution_id}/kill", status_code=202)
    async def kill(execution_id: str, owner: Token) -> dict[str, Any]:
        execution = service().kill(owner, execution_id)
        return {"id": execution.id, "done": execution.done}

    @app.post("/v1/executions/{execution_id}/signal", status_code=202)
    async def send_signal(execution_id: str, body: SendSignal, owner: Token) -> dict[str, Any]:
        execution = await service().signal(owner, execution_id, signal.Signals[f"SIG{body.signal}"])
        return {"id": execution.id, "done": execution.done, "signal": body.signal}

    @app.websocket("/v1/sandboxes/{sandbox_id}/pty")
    async def pty(websocket: WebSocket, sandbox_id: str) -> None:
        """A terminal in the sandbox (see ``api/pty.py`` for the messages)."""
        await serve_pty(websocket, sandbox_id, service(), tokens)

    # ------------------------------------------------------------------ files

    def files_of(owner: TokenRecord, sandbox_id: str) -> FileService:
        vm = service().get(owner, sandbox_id).vm
        return FileService(vm.channel, vm.staging)

    @app.get("/v1/sandboxes/{sandbox_id}/files")
    async def list_files(
        sandbox_id: str, owner: Token, path: str, depth: Annotated[int, Query(ge=1, le=8)] = 1
    ) -> list[dict[str, Any]]:
        entries = await files_of(owner, sandbox_id).list(path, depth)
        return [{**vars(e), "modified": e.modified.isoformat()} for e in entries]

    def counted(
        sandbox_id: str, owner: TokenRecord, op: str, path: str, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        """``chunks`` passed on, and the transfer audited with its size when it ends."""

        async def stream() -> AsyncIterator[bytes]:
            size = 0
            try:
                async for chunk in chunks:
                    size += len(chunk)
                    yield chunk
            finally:
                service().watch.record("file_transfer", sandbox=sandbox_id, owner=owner.id,
                                       op=op, path=path, bytes=size)  # fmt: skip

        return stream()

    @app.get("/v1/sandboxes/{sandbox_id}/files/content")
    async def read_file(sandbox_id: str, owner: Token, path: str) -> StreamingResponse:
        files = files_of(owner, sandbox_id)
        await files.stat(path)  # a missing file is a 4xx before the stream starts
        stream = counted(sandbox_id, owner, "download", path, files.read_stream(path))
        return StreamingResponse(stream, media_type="application/octet-stream")

    @app.put("/v1/sandboxes/{sandbox_id}/files/content")
    async def write_file(
        sandbox_id: str, owner: Token, request: Request, path: str,
        mode: Annotated[int | None, Query(ge=0, le=0o7777)] = None,
    ) -> dict[str, Any]:  # fmt: skip
        written = await files_of(owner, sandbox_id).write(path, request.stream(), mode=mode)
        service().watch.record("file_transfer", sandbox=sandbox_id, owner=owner.id,
                               op="upload", path=path, bytes=written)  # fmt: skip
        return {"path": path, "bytes": written}

    @app.get("/v1/sandboxes/{sandbox_id}/files/tar")
    async def read_tree(sandbox_id: str, owner: Token, path: str) -> StreamingResponse:
        """A directory as a tar stream: the guest's bytes as they are (the client
        extracts them with the same care a local download takes)."""
        files = files_of(owner, sandbox_id)
        await files.stat(path)
        stream = counted(sandbox_id, owner, "download_tree", path, files.tar_stream(path))
        return StreamingResponse(stream, media_type="application/x-tar")

    @app.put("/v1/sandboxes/{sandbox_id}/files/tar")
    async def write_tree(
        sandbox_id: str, owner: Token, request: Request, path: str
    ) -> dict[str, Any]:
        """A tar stream unpacked by the guest into ``path`` (made if missing)."""
        sent = await files_of(owner, sandbox_id).untar(path, request.stream())
        service().watch.record("file_transfer", sandbox=sandbox_id, owner=owner.id,
                               op="upload_tree", path=path, bytes=sent)  # fmt: skip
        return {"path": path, "bytes": sent}

    @app.get("/v1/sandboxes/{sandbox_id}/files/watch")
    async def watch(
        sandbox_id: str, owner: Token, path: str, recursive: bool = False
    ) -> StreamingResponse:
        """File events under ``path`` as server-sent events, until the client leaves."""
        files = files_of(owner, sandbox_id)
        await files.stat(path)

        async def stream() -> AsyncIterator[bytes]:
            async for event in files.watch(path, recursive):
                yield f"event: {event.type}\ndata: {json.dumps(vars(event))}\n\n".encode()

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/v1/sandboxes/{sandbox_id}/files/stat")
    async def stat_file(sandbox_id: str, owner: Token, path: str) -> dict[str, Any]:
        entry = await files_of(owner, sandbox_id).stat(path)
        return {**vars(entry), "modified": entry.modified.isoformat()}

    @app.post("/v1/sandboxes/{sandbox_id}/files/dir")
    async def make_dir(sandbox_id: str, owner: Token, path: str) -> dict[str, Any]:
        return {"path": path, "made": await files_of(owner, sandbox_id).make_dir(path)}

    @app.post("/v1/sandboxes/{sandbox_id}/files/rename")
    async def rename(sandbox_id: str, owner: Token, old: str, new: str) -> dict[str, Any]:
        await files_of(owner, sandbox_id).rename(old, new)
        return {"old": old, "new": new}

    @app.delete("/v1/sandboxes/{sandbox_id}/files", status_code=204)
    async def remove_file(sandbox_id: str, owner: Token, path: str) -> Response:
        await files_of(owner, sandbox_id).remove(path)
        return Response(status_code=204)

    # ------------------------------------------------------------------ network

    @app.get("/v1/sandboxes/{sandbox_id}/policy")
    async def get_policy(sandbox_id: str, owner: Token) -> dict[str, Any]:
        vm = service().get(owner, sandbox_id).vm
        policy = vm.guard.policy(vm.name) if vm.guard is not None else None
        if policy is None:
            raise ConfigError("this sandbox has no filtered network (its mode is not nat)")
        return policy.model_dump(mode="json")

    @app.put("/v1/sandboxes/{sandbox_id}/policy")
    async def set_policy(sandbox_id: str, body: EgressPolicy, owner: Token) -> dict[str, Any]:
        await service().get(owner, sandbox_id).vm.set_policy(body)
        service().watch.record("policy_changed", sandbox=sandbox_id, owner=owner.id,
                               policy=body.model_dump(mode="json"))  # fmt: skip
        return body.model_dump(mode="json")

    @app.get("/v1/sandboxes/{sandbox_id}/blocked")
    async def blocked(sandbox_id: str, owner: Token) -> list[dict[str, Any]]:
        vm = service().get(owner, sandbox_id).vm
        if vm.guard is None:
            return []
        return [
            {"at": b.at.isoformat(), "kind": b.kind, "destination": b.destination,
             "port": b.port, "reason": b.reason}
            for b in vm.guard.blocked(vm.name)
        ]  # fmt: skip

    return app


async def _collect(execution: Execution) -> dict[str, Any]:
    stdout: list[str] = []
    stderr: list[str] = []
    result: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        async for event in execution.follow(-1):
            if event["type"] == "stdout":
                stdout.append(event["text"])
            elif event["type"] == "stderr":
                stderr.append(event["text"])
            else:
                result = event
    return {"id": execution.id, "stdout": "".join(stdout), "stderr": "".join(stderr),
            "result": result}  # fmt: skip
