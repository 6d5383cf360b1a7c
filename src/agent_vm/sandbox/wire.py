"""How sandbox data crosses the HTTP API, both ways, in one place: the server encodes
with these functions (its pydantic response models say the same in the OpenAPI
document) and the HTTP backend decodes with them, so the two sides cannot drift.

Bytes stay bytes: output, stdin and file content are never decoded and re-encoded on the
way (output travels base64 in JSON events, content as raw HTTP bodies).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from agent_vm.communication.fileapi import FileEntry, WatchEvent
from agent_vm.errors import ProtocolError
from agent_vm.network.policy import Blocked
from agent_vm.sandbox.base import (
    CommandInfo,
    Event,
    Exit,
    GuestFigures,
    Output,
    PoolInfo,
    SandboxInfo,
    SandboxState,
    SnapshotInfo,
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError("expected base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise ProtocolError(f"not base64: {exc}") from exc


def _time(value: object) -> datetime:
    return datetime.fromisoformat(str(value))


# ---------------------------------------------------------------- command events


def exit_json(exit: Exit) -> dict[str, Any]:
    return {
        "seq": exit.seq, "type": "exit", "exit_code": exit.exit_code, "signal": exit.signal,
        "timed_out": exit.timed_out, "error": exit.error, "duration": round(exit.duration, 4),
        "output": [list(item) for item in exit.output],
        "failure": dict(exit.failure) if exit.failure is not None else None,
    }  # fmt: skip


def event_json(event: Event) -> dict[str, Any]:
    if isinstance(event, Output):
        return {"seq": event.seq, "type": event.stream, "data": b64(event.data)}
    return exit_json(event)


def exit_from(data: Mapping[str, Any]) -> Exit:
    return Exit(
        int(data["seq"]), data.get("exit_code"), data.get("signal"),
        bool(data.get("timed_out")), data.get("error"), float(data.get("duration") or 0.0),
        tuple((str(p), int(s), bool(d)) for p, s, d in data.get("output") or ()),
        data.get("failure"),
    )  # fmt: skip


def event_from(data: Mapping[str, Any]) -> Event:
    kind = data.get("type")
    if kind in ("stdout", "stderr"):
        return Output(int(data["seq"]), str(kind), unb64(data.get("data")))
    if kind == "exit":
        return exit_from(data)
    raise ProtocolError(f"unknown event type {kind!r}")


def command_json(info: CommandInfo) -> dict[str, Any]:
    return {
        "id": info.id, "sandbox": info.sandbox_id, "cmd": info.cmd, "pty": info.pty,
        "started_at": info.started_at.isoformat(), "done": info.done,
        "exit": exit_json(info.exit) if info.exit is not None else None,
        "events": f"/v1/executions/{info.id}/events",
    }  # fmt: skip


def command_from(data: Mapping[str, Any]) -> CommandInfo:
    exit = data.get("exit")
    return CommandInfo(
        str(data["id"]), str(data["sandbox"]), data.get("cmd"), bool(data.get("pty")),
        _time(data["started_at"]), bool(data.get("done")),
        exit_from(exit) if isinstance(exit, Mapping) else None,
    )  # fmt: skip


# ---------------------------------------------------------------- sandboxes and the rest


def sandbox_json(info: SandboxInfo) -> dict[str, Any]:
    return {
        "id": info.id, "state": info.state.value, "image": info.image, "profile": info.profile,
        "network": info.network, "created_at": info.created_at.isoformat(),
        "labels": dict(info.labels),
        "expires_at": info.expires_at.isoformat() if info.expires_at else None,
        "paused_because": info.paused_because, "pooled": info.pooled,
    }  # fmt: skip


def sandbox_from(data: Mapping[str, Any]) -> SandboxInfo:
    expires = data.get("expires_at")
    return SandboxInfo(
        str(data["id"]), SandboxState(data["state"]), data.get("image"),
        str(data.get("profile")), str(data.get("network")), _time(data["created_at"]),
        dict(data.get("labels") or {}), None, _time(expires) if expires else None,
        data.get("paused_because"), bool(data.get("pooled")),
    )  # fmt: skip


def blocked_json(attempt: Blocked) -> dict[str, Any]:
    return {"at": attempt.at.isoformat(), "kind": attempt.kind,
            "destination": attempt.destination, "port": attempt.port,
            "reason": attempt.reason}  # fmt: skip


def blocked_from(data: Mapping[str, Any]) -> Blocked:
    return Blocked(
        _time(data["at"]),
        str(data["kind"]),
        str(data["destination"]),
        data.get("port"),
        str(data["reason"]),
    )


def entry_json(entry: FileEntry) -> dict[str, Any]:
    return {**vars(entry), "modified": entry.modified.isoformat()}


def entry_from(data: Mapping[str, Any]) -> FileEntry:
    return FileEntry(**{**data, "modified": _time(data["modified"])})


def watch_json(event: WatchEvent) -> dict[str, Any]:
    return dict(vars(event))


def watch_from(data: Mapping[str, Any]) -> WatchEvent:
    return WatchEvent(str(data["type"]), str(data["path"]), bool(data["is_dir"]))


def pool_json(info: PoolInfo) -> dict[str, Any]:
    return dict(vars(info))


def pool_from(data: Mapping[str, Any]) -> PoolInfo:
    return PoolInfo(**data)


def figures_json(figures: GuestFigures) -> dict[str, Any]:
    return dict(vars(figures))


def figures_from(data: Mapping[str, Any]) -> GuestFigures:
    return GuestFigures(**data)


def snapshot_json(info: SnapshotInfo) -> dict[str, Any]:
    return {**vars(info), "created_at": info.created_at.isoformat()}


def snapshot_from(data: Mapping[str, Any]) -> SnapshotInfo:
    return SnapshotInfo(**{**data, "created_at": _time(data["created_at"])})
