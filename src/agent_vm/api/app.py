"""The HTTP API (FastAPI): routes per resource (``routes/``), every one through the
service. Every route but ``/healthz`` needs a token; a sandbox is visible only to the
token that created it (404 to any other). OpenAPI at ``/openapi.json``.

Errors: one table (``errors.STATUS``) gives each error's status; the body names the
class (``errors.to_wire``), so the SDK raises what the server raised. A body that does
not parse is one line naming the field (422), and nothing is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from agent_vm.api.deps import Token
from agent_vm.api.routes import executions, files, network, sandboxes
from agent_vm.api.schemas import ErrorView
from agent_vm.api.service import SandboxService
from agent_vm.api.tokens import TokenStore
from agent_vm.errors import AgentVMError, status_of, to_wire
from agent_vm.version import __version__

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorView} for status in (400, 401, 403, 404, 409, 422, 429, 502, 503, 504)
}


def validation_line(exc: RequestValidationError) -> str:
    """pydantic's field errors as one line: ``body.cmd: Field required; ...``."""
    parts = []
    for item in exc.errors():
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def create_app(service: Callable[[], SandboxService], tokens: TokenStore) -> FastAPI:
    """``service`` returns the running service (made in the server's lifespan)."""
    app = FastAPI(title="agent-vm", version=__version__, responses=ERRORS)
    app.state.tokens = tokens
    app.state.service = service
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
        return JSONResponse(to_wire(exc), status_code=status_of(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        body = {"error": "ConfigError", "detail": validation_line(exc),
                "hint": "see /openapi.json for the request's shape"}  # fmt: skip
        return JSONResponse(body, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(
            {"error": "AgentVMError", "detail": str(exc.detail)},
            status_code=exc.status_code, headers=exc.headers,
        )  # fmt: skip

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "version": __version__, "sandboxes": len(service().sandboxes)}

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

    for module in (sandboxes, executions, files, network):
        app.include_router(module.router)
    return app
