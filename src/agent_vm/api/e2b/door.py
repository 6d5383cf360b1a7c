"""One sandbox as the E2B door sees it: who may use its envd (the access token), which
user a call acts as, the env vars it was created with and the pids E2B names its
commands by. The door keeps no state of its own on disk: the access token is derived
from the owner's token record (nothing new to store, and it is the same after a server
restart), env vars and pids live in the server's memory (``Hosted.door``).

Every envd request names its sandbox (``E2b-Sandbox-Id``) and carries the access token
(``X-Access-Token``); ``resolve`` turns that into a ``Target`` or refuses with what E2B's
own proxy would answer: 502 for a sandbox that is not there (the SDK reports it as the
sandbox's end), 401 for a wrong token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import hashlib
import hmac
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent_vm.api.lifecycle import Hosted
from agent_vm.api.service import SandboxService
from agent_vm.api.tokens import TokenRecord, TokenStore
from agent_vm.sandbox.base import CommandSpec, Exit, SandboxState

ENVD_VERSION = "0.6.4"  # what the SDK gates features on (see the README's E2B section)
DEFAULT_USER = "user"  # E2B's base template's user: in agent-vm's images (else made once)
_MAKE_USER = (
    f"id -u {DEFAULT_USER} >/dev/null 2>&1 || useradd -m -s /bin/bash {DEFAULT_USER}"
    f" && mkdir -p /home/{DEFAULT_USER} && chown {DEFAULT_USER}: /home/{DEFAULT_USER}"
)


class Refused(Exception):
    """An envd request the door turns away: ``status`` and E2B's JSON body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Target:
    """The sandbox an envd request is for, its owner and the user it acts as."""

    service: SandboxService
    hosted: Hosted
    owner: TokenRecord
    user: str

    @property
    def id(self) -> str:
        return self.hosted.id

    @property
    def home(self) -> str:
        return "/root" if self.user == "root" else f"/home/{self.user}"

    def path(self, path: str) -> str:
        """E2B resolves a relative path (and ``~``) against the user's home."""
        if path == "~" or path.startswith("~/"):
            path = self.home + path[1:]
        elif not path.startswith("/"):
            path = posixpath.join(self.home, path)
        return posixpath.normpath(path) if path != "/" else path

    @property
    def envs(self) -> dict[str, str]:
        return dict(self.hosted.door.get("envs", {}))

    def as_user(self, user: str | None) -> Target:
        return Target(self.service, self.hosted, self.owner, user or self.user)


current: contextvars.ContextVar[Target] = contextvars.ContextVar("e2b_target")
# set to True when a stream must end as a dropped connection (its sandbox went away
# under it), which is how E2B's SDK learns that a sandbox was killed mid-command
dropped: contextvars.ContextVar[list[bool]] = contextvars.ContextVar("e2b_dropped")


def access_token(owner: TokenRecord, sandbox_id: str) -> str:
    """The envd access token of ``sandbox_id``: a MAC of its id under its owner's token
    record, so only the server (which holds the record) can make it."""
    return hmac.new(owner.digest.encode(), f"envd:{sandbox_id}".encode(), "sha256").hexdigest()


def user_of(authorization: str | None) -> str | None:
    """The user of E2B's ``Authorization: Basic base64(user:)`` (None: the default)."""
    if not authorization or not authorization.startswith("Basic "):
        return None
    try:
        decoded = base64.b64decode(authorization[6:], validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise Refused(400, "the Authorization header does not decode") from None
    user = decoded.partition(":")[0]
    return user or None


def resolve(
    service: SandboxService, tokens: TokenStore, header: Callable[[str], str | None]
) -> Target:
    """The target of an envd request from its headers (``header(name)``)."""
    sandbox_id = header("e2b-sandbox-id")
    if not sandbox_id:
        raise Refused(400, "no E2b-Sandbox-Id header: which sandbox is this for?")
    hosted = service.sandboxes.get(sandbox_id)
    owner = tokens.record(hosted.owner) if hosted is not None else None
    if hosted is None or owner is None:
        raise Refused(502, f"The sandbox {sandbox_id} was not found")
    given = header("x-access-token") or ""
    if not hmac.compare_digest(given.encode(), access_token(owner, sandbox_id).encode()):
        raise Refused(401, "the envd access token (X-Access-Token) is wrong or missing")
    return Target(service, hosted, owner, user_of(header("authorization")) or DEFAULT_USER)


def signed(
    service: SandboxService, tokens: TokenStore, params: dict[str, str], operation: str
) -> Target:
    """The target of a signed file URL (``Sandbox.download_url``/``upload_url``), which
    names no sandbox: the one whose access token made the signature (E2B's v1 scheme)."""
    signature, expiration = params.get("signature", ""), params.get("signature_expiration")
    path, user = params.get("path", ""), params.get("username", "")
    if expiration is not None and (not expiration.lstrip("-").isdigit()):
        raise Refused(400, "signature_expiration is not a number")
    for hosted in list(service.sandboxes.values()):
        owner = tokens.record(hosted.owner)
        if owner is None:
            continue
        raw = f"{path}:{operation}:{user}:{access_token(owner, hosted.id)}"
        raw += f":{expiration}" if expiration is not None else ""
        digest = base64.b64encode(hashlib.sha256(raw.encode()).digest()).rstrip(b"=")
        if hmac.compare_digest(f"v1_{digest.decode()}".encode(), signature.encode()):
            if expiration is not None and int(expiration) < time.time():
                raise Refused(401, "signature is already expired")
            return Target(service, hosted, owner, user or DEFAULT_USER)
    raise Refused(401, "invalid signature")


async def ready(target: Target) -> None:
    """Resume a paused sandbox that asked for it, else refuse; and see that E2B's default
    user is there (agent-vm's images have it; one made before them gets it made)."""
    hosted = target.hosted
    if hosted.handle.state is SandboxState.PAUSED:
        if not hosted.door.get("auto_resume"):
            raise Refused(502, f"The sandbox {target.id} is paused: resume or connect to it")
        await target.service.resume(target.owner, target.id)
    if hosted.door.get("user_made"):
        return
    lock: asyncio.Lock = hosted.door.setdefault("lock", asyncio.Lock())
    async with lock:
        if hosted.door.get("user_made"):
            return
        if await hosted.handle.files.exists(f"/home/{DEFAULT_USER}"):
            hosted.door["user_made"] = True
            return
        exit = await run_to_end(target, CommandSpec(cmd=_MAKE_USER, user="root", timeout=60))
        if exit is None or exit.exit_code != 0:
            raise Refused(500, f"could not make the user {DEFAULT_USER!r} in the sandbox")
        hosted.door["user_made"] = True


async def run_to_end(target: Target, spec: CommandSpec) -> Exit | None:
    """Run a command of the door's own and wait for its end."""
    info = await target.service.run(target.owner, target.id, spec)
    source = await target.service.command(target.owner, info.id)
    async for event in source.follow():
        if isinstance(event, Exit):
            return event
    return None


def pids(hosted: Hosted) -> dict[int, str]:
    """pid -> command id for the sandbox's commands started through the door."""
    table: dict[int, str] = hosted.door.setdefault("pids", {})
    return table


def new_pid(hosted: Hosted, command_id: str, config: dict[str, Any]) -> int:
    pid = int(hosted.door.get("next_pid", 1000))
    hosted.door["next_pid"] = pid + 1
    pids(hosted)[pid] = command_id
    hosted.door.setdefault("configs", {})[pid] = config
    return pid
