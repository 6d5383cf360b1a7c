"""E2B's control plane (``/sandboxes``, ``/v2/sandboxes``) as calls of the service.

A request's ``X-API-KEY`` is an agent-vm token (either form, ``tokens.e2b_key``); what
the native API checks applies unchanged: a token sees only its sandboxes (404), its
quotas (429), the audit log. Templates are agent-vm's images (``base``: the server's
default) and the caller's snapshots. E2B's ``timeout`` is the sandbox's lifetime,
``autoPause`` pauses it when that runs out, ``metadata`` are its labels and
``envVars`` the env vars of every command it runs. A call agent-vm has no answer for
gets 501 with a line saying so (the README lists them).
"""

from __future__ import annotations

import math
import time
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from agent_vm import timeutil
from agent_vm.api.app import validation_line
from agent_vm.api.deps import Service
from agent_vm.api.e2b import door
from agent_vm.api.e2b.errors import body, http_status
from agent_vm.api.lifecycle import Hosted
from agent_vm.api.service import SandboxService
from agent_vm.api.tokens import TokenRecord, TokenStore
from agent_vm.core.template import ResourceProfile
from agent_vm.errors import AgentVMError, ConfigError
from agent_vm.sandbox.base import SandboxSpec, SandboxState

MAX_TIMEOUT = 86_400  # E2B's longest (a day)
_Meta = dict[Annotated[str, Field(max_length=256)], Annotated[str, Field(max_length=256)]]


class NewSandbox(BaseModel):
    """E2B's ``NewSandbox`` (fields agent-vm has no use for are ignored)."""

    model_config = ConfigDict(extra="ignore")
    templateID: str = Field(min_length=1, max_length=128)
    timeout: int = Field(default=15, ge=0, le=MAX_TIMEOUT)
    autoPause: bool = False
    autoResume: dict[str, Any] | None = None
    secure: bool = True
    allow_internet_access: bool | None = None
    network: dict[str, Any] | None = None
    metadata: _Meta | None = Field(default=None, max_length=32)
    envVars: dict[str, str] | None = Field(default=None, max_length=256)
    mcp: dict[str, Any] | None = None
    volumeMounts: list[Any] | None = None


class Timeout(BaseModel):
    timeout: int = Field(ge=0, le=MAX_TIMEOUT)


class Refresh(BaseModel):
    duration: int = Field(default=0, ge=0, le=3600)


class Resume(BaseModel):
    model_config = ConfigDict(extra="ignore")
    timeout: int = Field(default=15, ge=0, le=MAX_TIMEOUT)
    autoPause: bool | None = None


def _unsupported(what: str) -> ConfigError:
    return ConfigError(f"agent-vm does not offer {what}", hint="see the README's E2B section")


def spec_of(new: NewSandbox, snapshot: bool, internet: str = "nat") -> SandboxSpec:
    """The sandbox ``new`` asks for; ``internet``: the network of one that wants the
    internet (the server's ``--e2b-network``: nat, or isolated to give E2B clients none)."""
    if new.network and any(new.network.get(k) for k in ("allowOut", "denyOut", "rules")):
        raise _unsupported("per-sandbox network rules through the E2B API (use a policy)")
    if new.mcp:
        raise _unsupported("E2B's MCP gateway in sandboxes (use `agent-vm mcp`)")
    if new.volumeMounts:
        raise _unsupported("E2B volumes")
    template = None if new.templateID == "base" else new.templateID
    return SandboxSpec(
        image=None if snapshot else template, snapshot=template if snapshot else None,
        network="isolated" if new.allow_internet_access is False else internet,
        labels=dict(new.metadata or {}), lifetime=float(new.timeout or 15),
        on_expiry="pause" if new.autoPause else "kill",
        auto_resume=bool((new.autoResume or {}).get("enabled")),
    )  # fmt: skip


def _token(request: Request, x_api_key: Annotated[str | None, Header()] = None) -> TokenRecord:
    tokens: TokenStore = request.app.state.tokens
    record = tokens.verify(x_api_key) if x_api_key else None
    if record is None:
        client = request.client.host if request.client else "unix"
        request.app.state.on_auth_failure(request.url.path, client)
        raise _Denied(401, "Invalid API key: use a token of `agent-vm token create --e2b`")
    return record


Token = Annotated[TokenRecord, Depends(_token)]


class _Denied(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status, self.message = status, message


def sandbox_view(hosted: Hosted, owner: TokenRecord) -> dict[str, Any]:
    """E2B's ``Sandbox``: what the SDK needs to reach the sandbox's envd."""
    return {
        "templateID": hosted.door.get("template") or hosted.info().image or "base",
        "sandboxID": hosted.id, "clientID": "agent-vm", "envdVersion": door.ENVD_VERSION,
        "envdAccessToken": door.access_token(owner, hosted.id), "domain": None,
    }  # fmt: skip


def _detail(hosted: Hosted, owner: TokenRecord) -> dict[str, Any]:
    info = hosted.info()
    try:
        profile = ResourceProfile.preset(info.profile)
    except ConfigError:
        profile = ResourceProfile.light()
    ends = info.expires_at or timeutil.now() + timedelta(seconds=hosted.lifetime)
    ends = ends.replace(microsecond=0)  # the same answer twice (it is computed each time)
    return {
        **sandbox_view(hosted, owner), "startedAt": info.created_at.isoformat(),
        "endAt": ends.isoformat(), "cpuCount": profile.vcpu, "memoryMB": profile.memory_mib,
        "diskSizeMB": profile.disk_gib * 1024, "metadata": dict(info.labels),
        "state": "paused" if paused(hosted) else "running",
    }  # fmt: skip


def paused(hosted: Hosted) -> bool:
    """Paused, or being paused (E2B has no state between)."""
    return hosted.pausing or hosted.handle.state is SandboxState.PAUSED


def _metadata_filter(query: str | None) -> dict[str, str]:
    """The SDK's ``metadata`` query: ``k=v&...`` with each key and value quoted again."""
    pairs = urllib.parse.parse_qsl(query or "", keep_blank_values=True)
    return {urllib.parse.unquote(k): urllib.parse.unquote(v) for k, v in pairs}


def live_for(hosted: Hosted, seconds: int, shorten: bool = True) -> None:
    """The sandbox ends ``seconds`` from now (``shorten=False``: not sooner than it
    would anyway, as E2B's connect and resume keep a longer timeout)."""
    deadline = time.monotonic() + seconds  # 0: its end is now
    if not shorten and not math.isinf(hosted.deadline) and hosted.deadline > deadline:
        return
    hosted.lifetime = float(seconds or 15)  # what a resume gives it
    if hosted.handle.state is not SandboxState.PAUSED:
        hosted.deadline = deadline


router = APIRouter()


@router.post("/sandboxes", status_code=201)
async def create(
    new: NewSandbox, owner: Token, service: Service, request: Request
) -> dict[str, Any]:
    spec = spec_of(new, service.owns_snapshot(owner, new.templateID), request.app.state.internet)
    hosted = await service.create(owner, spec)
    hosted.door.update(template=new.templateID, envs=dict(new.envVars or {}),
                       auto_resume=spec.auto_resume)  # fmt: skip
    return sandbox_view(hosted, owner)


@router.get("/sandboxes")
async def list_v1(owner: Token, service: Service, metadata: str | None = None) -> list[Any]:
    found = service.list(owner, _metadata_filter(metadata))
    return [_detail(h, owner) for h in found if h.handle.state is SandboxState.RUNNING]


@router.get("/v2/sandboxes")
async def list_v2(
    owner: Token, service: Service, response: Response, metadata: str | None = None,
    state: str | None = None, limit: int = 100, nextToken: str | None = None,
    order: str = "desc", startedAfter: datetime | None = None, template: str | None = None,
) -> list[Any]:  # fmt: skip
    wanted = set((state or "running,paused").split(","))
    if startedAfter is not None and startedAfter.tzinfo is None:
        startedAfter = startedAfter.replace(tzinfo=UTC)  # E2B's times are UTC
    found = [
        h for h in service.list(owner, _metadata_filter(metadata))
        if _detail(h, owner)["state"] in wanted
        and (startedAfter is None or h.info().created_at >= startedAfter)
        and (template is None or sandbox_view(h, owner)["templateID"] == template)
    ]  # fmt: skip
    found.sort(key=lambda h: h.info().created_at, reverse=order != "asc")
    start = int(nextToken) if nextToken and nextToken.isdigit() else 0
    limit = max(1, min(limit, 1000))
    page = found[start : start + limit]
    if start + limit < len(found):
        response.headers["x-next-token"] = str(start + limit)
    return [_detail(h, owner) for h in page]


@router.get("/sandboxes/{sandbox_id}")
async def get(sandbox_id: str, owner: Token, service: Service) -> dict[str, Any]:
    return _detail(service.get(owner, sandbox_id), owner)


@router.delete("/sandboxes/{sandbox_id}", status_code=204)
async def kill(sandbox_id: str, owner: Token, service: Service) -> None:
    await service.delete(owner, sandbox_id)


@router.post("/sandboxes/{sandbox_id}/timeout", status_code=204)
async def set_timeout(sandbox_id: str, given: Timeout, owner: Token, service: Service) -> None:
    live_for(service.get(owner, sandbox_id), given.timeout)


@router.post("/sandboxes/{sandbox_id}/refreshes", status_code=204)
async def refresh(sandbox_id: str, given: Refresh, owner: Token, service: Service) -> None:
    hosted = service.get(owner, sandbox_id)
    if given.duration:
        live_for(hosted, given.duration)
    elif not math.isinf(hosted.deadline):
        hosted.deadline = time.monotonic() + hosted.lifetime


@router.post("/sandboxes/{sandbox_id}/pause", status_code=204)
async def pause(sandbox_id: str, owner: Token, service: Service) -> None:
    if paused(service.get(owner, sandbox_id)):
        raise _Denied(409, f"sandbox {sandbox_id} is already paused")
    await service.pause(owner, sandbox_id)


@router.post("/sandboxes/{sandbox_id}/resume", status_code=201)
async def resume(sandbox_id: str, given: Resume, owner: Token, service: Service) -> dict[str, Any]:
    hosted = service.get(owner, sandbox_id)
    if not paused(hosted):
        raise _Denied(409, f"sandbox {sandbox_id} is already running")
    if given.autoPause is not None:
        hosted.on_expiry = "pause" if given.autoPause else "kill"
    hosted.lifetime = float(given.timeout or 15)
    await service.resume(owner, sandbox_id)
    live_for(hosted, given.timeout)
    return sandbox_view(hosted, owner)


@router.post("/sandboxes/{sandbox_id}/connect")
async def connect(
    sandbox_id: str, given: Timeout, owner: Token, service: Service, response: Response
) -> dict[str, Any]:
    hosted = service.get(owner, sandbox_id)
    if paused(hosted):  # a pause under way is waited for, then undone
        hosted.lifetime = float(given.timeout or 15)
        await service.resume(owner, sandbox_id)
        response.status_code = 201
    live_for(hosted, given.timeout, shorten=False)
    return sandbox_view(hosted, owner)


def create_control(
    service: Callable[[], SandboxService], tokens: TokenStore,
    on_auth_failure: Callable[[str, str], None], more: tuple[APIRouter, ...] = (),
    internet: str = "nat",
) -> FastAPI:  # fmt: skip
    """The control plane's app; ``more``: routers of other modules (before the 501s)."""
    app = FastAPI(title="agent-vm (E2B API)", openapi_url=None, docs_url=None, redoc_url=None)
    app.state.tokens = tokens
    app.state.service = service
    app.state.on_auth_failure = on_auth_failure
    app.state.internet = internet

    @app.exception_handler(AgentVMError)
    async def _errors(_: Request, exc: AgentVMError) -> JSONResponse:
        status = http_status(exc)
        return JSONResponse(body(status, str(exc)), status_code=status)

    @app.exception_handler(_Denied)
    async def _denied(_: Request, exc: _Denied) -> JSONResponse:
        return JSONResponse(body(exc.status, exc.message), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(body(400, validation_line(exc)), status_code=400)

    for routes in (router, *more):
        app.include_router(routes)

    @app.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def _other(request: Request, rest: str) -> JSONResponse:
        what = f"{request.method} /{rest}"
        message = f"agent-vm's E2B API does not offer {what} (see the README's E2B section)"
        return JSONResponse(body(501, message), status_code=501)

    return app
