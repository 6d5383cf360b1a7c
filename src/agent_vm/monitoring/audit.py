"""The audit log: append-only JSON lines an operator can trust, hash-chained across
rotated files so that an edited, removed or reordered line is found by ``verify``.

Each line carries ``seq`` (1, 2, ... across every file), ``at`` (ISO 8601, America/New_York
offset), ``event``, the event's fields, ``prev`` (the previous line's hash) and ``hash``
(SHA-256 of ``prev`` and the line's canonical JSON without ``hash``). Rotation renames
``audit.log`` to ``audit.log.1`` (older ones shift up, the oldest past ``keep`` goes) and
the chain continues into the new file.

What is never written: environment values, secret values (every string passes through
``secrets.redact``), tokens (only a token's id and name). Durability: every line is one
``write(2)`` on an ``O_APPEND`` descriptor, so a crash of this process loses nothing the
call returned for; ``fsync`` runs at most once a second (and at close), so a crash of the
whole host may lose the last second.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_vm import secrets, timeutil
from agent_vm.errors import ConfigError

GENESIS = "0" * 64
DEFAULT_MAX_BYTES = 16 << 20
DEFAULT_KEEP = 8
FSYNC_INTERVAL = 1.0
MAX_FIELD = 4096  # a command line longer than this is cut (and says so)


def _digest(prev: str, body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((prev + canonical).encode()).hexdigest()


def _clean(value: Any) -> Any:
    """Redacted, bounded, JSON-able."""
    if isinstance(value, str):
        value = secrets.redact(value)
        return value if len(value) <= MAX_FIELD else value[:MAX_FIELD] + "...[cut]"
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return _clean(str(value))


def files_of(path: Path) -> list[Path]:
    """The log's files, oldest first (``audit.log.N`` ... ``audit.log.1``, ``audit.log``)."""
    rotated = []
    for candidate in path.parent.glob(f"{path.name}.*"):
        suffix = candidate.name[len(path.name) + 1 :]
        if suffix.isdigit():
            rotated.append((int(suffix), candidate))
    return [p for _, p in sorted(rotated, reverse=True)] + ([path] if path.exists() else [])


def _last_line(path: Path) -> dict[str, Any] | None:
    with path.open("rb") as source:
        source.seek(0, os.SEEK_END)
        end = source.tell()
        block = b""
        position = end
        while position > 0 and block.count(b"\n") < 2:
            step = min(65536, position)
            position -= step
            source.seek(position)
            block = source.read(step) + block
    lines = [line for line in block.split(b"\n") if line.strip()]
    return json.loads(lines[-1]) if lines else None


class AuditLogger:
    """Thread-safe; one writer process per log: it holds ``.<log>.lock`` (``flock``) while
    open, and a second writer is refused (``ConfigError`` naming the holder) instead of
    appending a chain of its own into the same file."""

    def __init__(
        self, path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._holder = _take_lock(path)
        self._seq, self._prev = 0, GENESIS
        for existing in reversed(files_of(path)):  # continue the chain where it ended
            last = _last_line(existing)
            if last is not None:
                self._seq, self._prev = int(last["seq"]), str(last["hash"])
                break
        self._fd = self._open()
        self._synced = time.monotonic()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def log(self, event: str, **fields: Any) -> None:
        with self._lock:
            body = {"seq": self._seq + 1, "at": timeutil.isoformat(), "event": event,
                    **{k: _clean(v) for k, v in fields.items()}, "prev": self._prev}  # fmt: skip
            digest = _digest(self._prev, body)
            line = json.dumps({**body, "hash": digest}, ensure_ascii=False) + "\n"
            os.write(self._fd, line.encode())
            self._seq, self._prev = body["seq"], digest
            now = time.monotonic()
            if now - self._synced >= FSYNC_INTERVAL:
                os.fsync(self._fd)
                self._synced = now
            if os.fstat(self._fd).st_size >= self.max_bytes:
                self._rotate()

    def _rotate(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        for number in range(self.keep, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{number}")
            if older.exists():
                if number == self.keep:
                    older.unlink()
                else:
                    older.rename(self.path.with_name(f"{self.path.name}.{number + 1}"))
        self.path.rename(self.path.with_name(f"{self.path.name}.1"))
        self._fd = self._open()

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1
            if self._holder >= 0:
                os.close(self._holder)  # the lock goes with it
                self._holder = -1


def _take_lock(path: Path) -> int:
    """The log's lock, or ConfigError naming the process that holds it."""
    lock = path.with_name(f".{path.name}.lock")  # not audit.log.N: a rotated file
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(
            f"another agent-vm process (pid {holder}) writes the audit log {path}",
            hint="stop that server, or give this one its own AGENT_VM_AUDIT_LOG",
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@dataclass(frozen=True)
class Verdict:
    ok: bool
    lines: int
    first_seq: int | None
    problem: str | None = None  # "audit.log.1 line 17: ..." for the first bad line


def read(path: Path) -> Iterator[tuple[Path, int, dict[str, Any] | None, str]]:
    """(file, line number, parsed line or None, raw line) over every file, oldest first."""
    for file in files_of(path):
        with file.open(encoding="utf-8", errors="replace") as source:
            for number, raw in enumerate(source, 1):
                if not raw.strip():
                    continue
                try:
                    parsed = json.loads(raw)
                except json.JSONDecodeError:
                    parsed = None
                yield file, number, parsed if isinstance(parsed, dict) else None, raw


def verify(path: Path) -> Verdict:
    """Walk the chain. The oldest file's first line may follow a file rotated away
    (``keep``): its ``prev`` is taken as given, and the verdict says where it starts."""
    expected_prev: str | None = None
    expected_seq: int | None = None
    first: int | None = None
    count = 0
    for file, number, line, _ in read(path):
        where = f"{file.name} line {number}"
        if line is None:
            return Verdict(False, count, first, f"{where}: not a JSON object")
        try:
            seq, prev, digest = int(line["seq"]), str(line["prev"]), str(line["hash"])
        except (KeyError, ValueError, TypeError):
            return Verdict(False, count, first, f"{where}: no seq/prev/hash")
        body = {k: v for k, v in line.items() if k != "hash"}
        if _digest(prev, body) != digest:
            return Verdict(False, count, first, f"{where}: its hash does not match (edited)")
        if expected_seq is not None and seq != expected_seq:
            return Verdict(False, count, first,
                           f"{where}: seq {seq} where {expected_seq} was due (a line "
                           "removed or moved)")  # fmt: skip
        if expected_prev is not None and prev != expected_prev:
            return Verdict(False, count, first,
                           f"{where}: does not follow the line before it (reordered)")  # fmt: skip
        if first is None:
            first = seq
            if seq == 1 and prev != GENESIS:
                return Verdict(False, count, first, f"{where}: the first line lost its genesis")
        expected_seq, expected_prev = seq + 1, digest
        count += 1
    return Verdict(True, count, first)
