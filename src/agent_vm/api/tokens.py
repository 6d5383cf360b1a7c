"""API tokens: created once, shown once, stored hashed.

A token reads ``avm_<id>_<secret>``. The file (``<state>/tokens.json``, root's, 0600)
keeps the id, a name, quotas and the SHA-256 of the secret, never the secret: a copy of
the file lets nobody in. The secret has 256 bits, so a plain hash (no key stretching) is
enough; comparison is constant-time.

The same token also reads in E2B's key form, ``e2b_<hex>`` (``e2b_key``): the E2B SDK
refuses keys of any other shape before it sends them, so a user sets a token of ours as
``E2B_API_KEY`` in that form. Either form is accepted wherever a token is.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, Field

from agent_vm import timeutil
from agent_vm.api.local import PREFIX
from agent_vm.errors import ConfigError


class TokenRecord(BaseModel):
    id: str
    name: str
    digest: str
    created_at: datetime
    revoked: bool = False
    max_sandboxes: int = Field(default=8, ge=0)
    max_executions: int = Field(default=16, ge=0)
    max_snapshot_gib: float = Field(default=20.0, ge=0)  # disk its snapshots may hold
    any_workspace: bool = False  # the server's own local token: root on the server's host
    metrics: bool = False  # may read /metrics (every tenant's figures)

    def public(self) -> dict[str, object]:
        return self.model_dump(mode="json", exclude={"digest"})


E2B_PREFIX = "e2b_"


def e2b_key(token: str) -> str:
    """The token in E2B's key form (``e2b_`` and hex digits): the same secret, spelled
    so the E2B SDK's format check lets it through."""
    return E2B_PREFIX + token.encode().hex()


def from_e2b_key(key: str) -> str | None:
    """The token an ``e2b_key`` spells (None if it spells none)."""
    try:
        return bytes.fromhex(key[len(E2B_PREFIX) :]).decode()
    except ValueError:  # not hex, or not UTF-8 (UnicodeDecodeError is a ValueError)
        return None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._ephemeral: list[TokenRecord] = []  # this process's only, never on disk

    def issue_local(self, *, max_sandboxes: int = 64, max_executions: int = 128) -> str:
        """A token for root on this host, valid while this process lives: ``serve``
        writes it next to its root-only socket, so the CLI there needs no token of its
        own (who can read that file can run VMs as root anyway)."""
        token_id = f"local{secrets.token_hex(2)}"
        secret = secrets.token_urlsafe(32)
        self._ephemeral.append(
            TokenRecord(
                id=token_id,
                name="local",
                digest=_digest(secret),
                created_at=timeutil.now(),
                max_sandboxes=max_sandboxes,
                max_executions=max_executions,
                any_workspace=True,
                metrics=True,
            )
        )
        return f"{PREFIX}{token_id}_{secret}"

    def _load(self) -> list[TokenRecord]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        return [TokenRecord.model_validate(item) for item in data]

    def _save(self, records: list[TokenRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump([r.model_dump(mode="json") for r in records], out, indent=2)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(self.path)

    def create(
        self, name: str, *, max_sandboxes: int = 8, max_executions: int = 16,
        metrics: bool = False, max_snapshot_gib: float = 20.0,
    ) -> tuple[TokenRecord, str]:  # fmt: skip
        """A new token: its record and the token itself (shown to the caller only)."""
        records = self._load()
        if any(r.name == name and not r.revoked for r in records):
            raise ConfigError(f"a token named {name!r} exists", hint="revoke it or pick a name")
        token_id = secrets.token_hex(4)
        secret = secrets.token_urlsafe(32)
        record = TokenRecord(
            id=token_id,
            name=name,
            digest=_digest(secret),
            created_at=timeutil.now(),
            max_sandboxes=max_sandboxes,
            max_executions=max_executions,
            max_snapshot_gib=max_snapshot_gib,
            metrics=metrics,
        )
        self._save([*records, record])
        return record, f"{PREFIX}{token_id}_{secret}"

    def all(self) -> list[TokenRecord]:
        return self._load()

    def record(self, token_id: str) -> TokenRecord | None:
        """A live token's record by its id (the E2B door finds a sandbox's owner so)."""
        for record in [*self._ephemeral, *self._load()]:
            if record.id == token_id and not record.revoked:
                return record
        return None

    def revoke(self, name_or_id: str) -> TokenRecord:
        records = self._load()
        for record in records:
            if name_or_id in (record.id, record.name) and not record.revoked:
                record.revoked = True
                self._save(records)
                return record
        raise ConfigError(f"no active token {name_or_id!r}", hint="see `agent-vm token list`")

    def verify(self, token: str) -> TokenRecord | None:
        """The token's record, or None for anything that is not a live token."""
        if token.startswith(E2B_PREFIX):
            token = from_e2b_key(token) or ""
        if not token.startswith(PREFIX):
            return None
        token_id, sep, secret = token[len(PREFIX) :].partition("_")
        if not sep or not secret:
            return None
        digest = _digest(secret)
        for record in [*self._ephemeral, *self._load()]:
            if record.id == token_id:
                if record.revoked:
                    return None
                return record if hmac.compare_digest(record.digest, digest) else None
        return None
