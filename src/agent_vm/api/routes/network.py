"""``/v1/sandboxes/{id}/policy``, ``/blocked`` and ``/ports``: what a sandbox may reach,
changed while it runs, what it tried and was refused, and its ports on this host."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from agent_vm.api.deps import Service, Token
from agent_vm.api.schemas import BlockedView
from agent_vm.network.policy import EgressPolicy
from agent_vm.sandbox import wire

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}", tags=["network"])


@router.get("/policy", response_model=EgressPolicy | None)
async def get_policy(sandbox_id: str, owner: Token, service: Service) -> dict[str, Any] | None:
    """None (null): the sandbox has no filtered network (isolated, a bridge)."""
    policy = await service.policy(owner, sandbox_id)
    return policy.model_dump(mode="json") if policy is not None else None


@router.put("/policy", response_model=EgressPolicy)
async def set_policy(
    sandbox_id: str, body: EgressPolicy, owner: Token, service: Service
) -> dict[str, Any]:
    """In force when this answers; the VM keeps running."""
    await service.set_policy(owner, sandbox_id, body)
    return body.model_dump(mode="json")


class ExposePort(BaseModel):
    model_config = ConfigDict(extra="forbid")
    port: int = Field(ge=1, le=65535)


@router.post("/ports")
async def expose(
    sandbox_id: str, body: ExposePort, owner: Token, service: Service
) -> dict[str, Any]:
    """A URL on the server's host that reaches the port inside the sandbox while it runs;
    every connection's first request carries the returned token."""
    exposed = await service.expose(owner, sandbox_id, body.port)
    return {"port": exposed.port, "host": exposed.host, "url": exposed.url,
            "token": exposed.token}  # fmt: skip


@router.get("/blocked", response_model=list[BlockedView])
async def blocked(sandbox_id: str, owner: Token, service: Service) -> list[dict[str, Any]]:
    return [wire.blocked_json(b) for b in await service.blocked(owner, sandbox_id)]
