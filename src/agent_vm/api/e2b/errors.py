"""agent-vm's errors in E2B's terms: Connect codes for envd's RPCs, HTTP statuses and
``{"code", "message"}`` bodies for its REST calls, so the E2B SDK raises what it raises
against E2B (``NotFoundException``, ``InvalidArgumentException``, ...).

The status comes from the one table (``errors.STATUS``); a file refusal's own code
(``exists``, ``not_a_directory``, ...) refines it. The message keeps the hint.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from agent_vm.errors import AgentVMError, SandboxStateError, status_of

P = ParamSpec("P")
R = TypeVar("R")

_BY_STATUS = {
    400: Code.INVALID_ARGUMENT,
    401: Code.UNAUTHENTICATED,
    403: Code.PERMISSION_DENIED,
    404: Code.NOT_FOUND,
    409: Code.FAILED_PRECONDITION,
    429: Code.RESOURCE_EXHAUSTED,
    503: Code.UNAVAILABLE,
    504: Code.DEADLINE_EXCEEDED,
    507: Code.RESOURCE_EXHAUSTED,
}
_BY_FILE_CODE = {
    "exists": Code.ALREADY_EXISTS,
    "not_a_directory": Code.INVALID_ARGUMENT,
    "is_a_directory": Code.INVALID_ARGUMENT,
    "not_empty": Code.FAILED_PRECONDITION,
    "invalid": Code.INVALID_ARGUMENT,
}
_HTTP_BY_FILE_CODE = {"exists": 409, "not_a_directory": 400, "is_a_directory": 400}


def http_status(exc: AgentVMError) -> int:
    """The status E2B answers such a refusal with (a paused sandbox: 502, its end)."""
    if isinstance(exc, SandboxStateError):
        return 502
    return _HTTP_BY_FILE_CODE.get(str(getattr(exc, "code", "")), status_of(exc))


def connect_error(exc: AgentVMError) -> ConnectError:
    if isinstance(exc, SandboxStateError):
        return ConnectError(Code.UNAVAILABLE, str(exc))
    code = _BY_FILE_CODE.get(str(getattr(exc, "code", "")))
    return ConnectError(code or _BY_STATUS.get(status_of(exc), Code.INTERNAL), str(exc))


@contextlib.asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Raise agent-vm's errors inside as Connect errors."""
    try:
        yield
    except AgentVMError as exc:
        raise connect_error(exc) from exc


def rpc_errors(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """A unary RPC whose agent-vm errors reach the client as Connect errors."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        async with translated():
            return await fn(*args, **kwargs)

    return wrapper


def body(status: int, message: str) -> dict[str, object]:
    """E2B's error body (the SDK reads ``message``)."""
    return {"code": status, "message": message}
