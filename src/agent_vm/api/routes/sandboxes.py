"""``/v1/sandboxes``: create, list, get, delete, keep alive, pause, resume, snapshot, fork;
``/v1/snapshots``: list, remove; ``/v1/pools``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from agent_vm import secrets as secret_store
from agent_vm.api.deps import Service, Token
from agent_vm.api.lifecycle import Hosted
from agent_vm.api.schemas import (
    CreateSandbox,
    FiguresView,
    Fork,
    KeepAlive,
    PoolView,
    SandboxView,
    SnapshotView,
    TakeSnapshot,
)
from agent_vm.sandbox import wire
from agent_vm.sandbox.base import SandboxSpec

router = APIRouter(prefix="/v1", tags=["sandboxes"])


def _view(hosted: Hosted) -> dict[str, Any]:
    return wire.sandbox_json(hosted.info())


@router.get("/pools", response_model=list[PoolView])
async def pools(_: Token, service: Service) -> list[dict[str, Any]]:
    return [wire.pool_json(info) for info in await service.pools()]


@router.post("/sandboxes", status_code=201, response_model=SandboxView)
async def create(body: CreateSandbox, owner: Token, service: Service) -> dict[str, Any]:
    secret_store.register({name: given.value for name, given in body.proxied_secrets.items()})
    spec = SandboxSpec(
        image=body.image, profile=body.profile,
        network="nat" if body.network == "nat_filtered" else body.network, policy=body.policy,
        cold=body.cold, labels=body.labels, lifetime=body.lifetime_seconds,
        anomaly_action=body.anomaly_action, snapshot=body.snapshot, on_expiry=body.on_expiry,
        auto_resume=body.auto_resume,
        proxied={name: given.secret() for name, given in body.proxied_secrets.items()},
    )  # fmt: skip
    workspace = (body.workspace.path, body.workspace.readonly) if body.workspace else None
    return _view(await service.create(owner, spec, workspace))


@router.get("/sandboxes", response_model=list[SandboxView])
async def list_sandboxes(
    owner: Token, service: Service, label: Annotated[list[str] | None, Query()] = None
) -> list[dict[str, Any]]:
    """``?label=KEY=VALUE`` (repeatable) keeps those that carry every one."""
    wanted = dict(item.partition("=")[::2] for item in label or [])
    return [_view(hosted) for hosted in service.list(owner, wanted)]


@router.get("/sandboxes/{sandbox_id}", response_model=SandboxView)
async def get(sandbox_id: str, owner: Token, service: Service) -> dict[str, Any]:
    return _view(service.get(owner, sandbox_id))


@router.delete("/sandboxes/{sandbox_id}", status_code=204)
async def delete(sandbox_id: str, owner: Token, service: Service) -> Response:
    await service.delete(owner, sandbox_id)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/keepalive", response_model=SandboxView)
async def keep_alive(
    sandbox_id: str, body: KeepAlive, owner: Token, service: Service
) -> dict[str, Any]:
    return _view(service.keep_alive(owner, sandbox_id, body.lifetime_seconds))


@router.post("/sandboxes/{sandbox_id}/pause", response_model=SandboxView)
async def pause(sandbox_id: str, owner: Token, service: Service) -> dict[str, Any]:
    """Saved to disk, its VM freed (commands and files answer 409 until resume, unless
    it was created with ``auto_resume``); it outlives a restart of the server."""
    return _view(await service.pause(owner, sandbox_id))


@router.post("/sandboxes/{sandbox_id}/resume", response_model=SandboxView)
async def resume(sandbox_id: str, owner: Token, service: Service) -> dict[str, Any]:
    """Every process continues where it was paused."""
    return _view(await service.resume(owner, sandbox_id))


@router.post("/sandboxes/{sandbox_id}/snapshot", status_code=201, response_model=SnapshotView)
async def snapshot(
    sandbox_id: str, body: TakeSnapshot, owner: Token, service: Service
) -> dict[str, Any]:
    """Capture it (it runs on); ``POST /v1/sandboxes`` with ``snapshot`` starts new ones."""
    return wire.snapshot_json(await service.snapshot(owner, sandbox_id, body.name))


@router.post("/sandboxes/{sandbox_id}/fork", status_code=201, response_model=list[SandboxView])
async def fork(sandbox_id: str, body: Fork, owner: Token, service: Service) -> list[dict[str, Any]]:
    """``count`` new sandboxes continuing from this moment (no workspace); it runs on."""
    return [_view(child) for child in await service.fork(owner, sandbox_id, body.count)]


@router.get("/snapshots", response_model=list[SnapshotView])
async def snapshots(owner: Token, service: Service) -> list[dict[str, Any]]:
    return [wire.snapshot_json(info) for info in await service.snapshots(owner)]


@router.delete("/snapshots/{name}", status_code=204)
async def remove_snapshot(name: str, owner: Token, service: Service) -> Response:
    """Refused (409) while sandboxes started from it exist."""
    await service.remove_snapshot(owner, name)
    return Response(status_code=204)


@router.get("/sandboxes/{sandbox_id}/stats", response_model=FiguresView)
async def stats(sandbox_id: str, owner: Token, service: Service) -> dict[str, Any]:
    """The guest's own figures: uptime, commands running, load, free memory."""
    return wire.figures_json(await service.stats(owner, sandbox_id))
