"""What every route depends on: the caller's token (401 without a live one, and nothing
done) and the running service."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from agent_vm.api.service import SandboxService
from agent_vm.api.tokens import TokenRecord, TokenStore
from agent_vm.logs import get_logger

log = get_logger(__name__)
_bearer = HTTPBearer(auto_error=False)


async def _token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> TokenRecord:
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


def _service(request: Request) -> SandboxService:
    service: SandboxService = request.app.state.service()
    return service


Token = Annotated[TokenRecord, Depends(_token)]
Service = Annotated[SandboxService, Depends(_service)]
