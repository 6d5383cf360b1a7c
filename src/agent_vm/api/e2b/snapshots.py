"""E2B's snapshots and forks as the service's (issue 20's): a snapshot's id is its
agent-vm name (a template ``Sandbox.create`` takes), deleted through E2B's
``DELETE /templates/{id}``; a fork answers one result per child, each a sandbox or an
error, as E2B's does."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field

from agent_vm.api.deps import Service
from agent_vm.api.e2b.control import Timeout, Token, live_for, sandbox_view
from agent_vm.api.e2b.errors import body, http_status
from agent_vm.errors import AgentVMError, SnapshotError
from agent_vm.sandbox.base import SnapshotInfo

router = APIRouter()
RELEASE_WAIT = 30.0


class TakeSnapshot(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Fork(Timeout):
    model_config = ConfigDict(extra="ignore")
    timeout: int = Field(default=300, ge=0, le=86_400)
    count: int = Field(default=1, ge=1, le=16)


def _view(info: SnapshotInfo) -> dict[str, Any]:
    return {"snapshotID": info.name, "names": [info.name]}


@router.post("/sandboxes/{sandbox_id}/snapshots", status_code=201)
async def take(sandbox_id: str, given: TakeSnapshot, owner: Token, service: Service) -> Any:
    name = given.name or f"snap-{secrets.token_hex(6)}"
    return _view(await service.snapshot(owner, sandbox_id, name))


@router.get("/snapshots")
async def listed(
    owner: Token, service: Service, response: Response, sandboxID: str | None = None,
    name: str | None = None, limit: int = 100, nextToken: str | None = None,
) -> list[Any]:  # fmt: skip
    found = [
        s
        for s in await service.snapshots(owner)
        if (sandboxID is None or s.source == sandboxID) and (name is None or s.name == name)
    ]
    found.sort(key=lambda s: s.created_at, reverse=True)
    start = int(nextToken) if nextToken and nextToken.isdigit() else 0
    limit = max(1, min(limit, 1000))
    if start + limit < len(found):
        response.headers["x-next-token"] = str(start + limit)
    return [_view(s) for s in found[start : start + limit]]


@router.delete("/templates/{template_id}", status_code=204)
async def remove(template_id: str, owner: Token, service: Service) -> None:
    """Sandboxes killed just before are released in the background: a snapshot they
    still hold is waited for (a while), as E2B's kill is done when it answers."""
    deadline = time.monotonic() + RELEASE_WAIT
    while True:
        try:
            return await service.remove_snapshot(owner, template_id)
        except SnapshotError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


@router.post("/sandboxes/{sandbox_id}/fork", status_code=201)
async def fork(
    sandbox_id: str, owner: Token, service: Service, given: Fork | None = None
) -> list[Any]:
    given = given or Fork()
    parent = service.get(owner, sandbox_id)
    try:
        children = await service.fork(owner, sandbox_id, given.count)
    except AgentVMError as exc:  # each child the same error, as E2B reports per child
        status = http_status(exc)
        return [{"error": body(status, str(exc))} for _ in range(given.count)]
    results = []
    for child in children:
        child.door.update({k: v for k, v in parent.door.items() if k in ("envs", "template")})
        live_for(child, given.timeout)
        results.append({"sandbox": sandbox_view(child, owner)})
    return results
