"""File operations over the control channel: requests, stream credits, results, events.

One FILE request per operation. Operations with a body stream it as DATA frames (FLAG_EOF
on the last). With ``staged`` the bytes take the bulk lane instead: each DATA frame
carries a ``Segment`` naming a file of at most ``SEGMENT`` bytes in the share's staging
directory (a size-capped tmpfs the host mounts), which the receiver reads and removes;
credits count the segments' bytes the same way. Under TCG this is 3-5x faster than
bytes through the virtio-serial port (the guest copies a file instead of decoding
frames). ``write``/``untar`` from host to guest, ``read``/``tar``/``list`` from guest
to host. Streams are credit-based so that neither side ever holds more than ``WINDOW``
bytes of one: the receiver sends ACK frames for what it consumed and the sender waits
when ``WINDOW`` bytes are unacknowledged. A sender exceeding the window is a protocol
error. Every operation ends with DONE (its result) or ERROR (a ``code`` from
``ERROR_CODES``). Standard library only (the guest imports this module).
"""

from __future__ import annotations

import os

from agent_vm.errors import ProtocolError
from agent_vm.protocol.messages import JsonMessage, _check_only, _field, _loads

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

WINDOW = 8 << 20  # unacknowledged stream bytes a sender may have in flight
ACK_EVERY = 1 << 20  # a receiver acknowledges at least this often
DATA_CHUNK = 512 << 10  # payload of one DATA frame
SEGMENT = 4 << 20  # bytes of one staged segment (WINDOW holds two)
MAX_PATH = 4096
MAX_EVENTS_PER_FRAME = 256
MAX_DEPTH = 64

OPS = frozenset(
    {"stat", "exists", "list", "make_dir", "remove", "rename", "read", "write", "tar", "untar",
     "watch"}
)  # fmt: skip
ENTRY_TYPES = frozenset({"file", "dir", "symlink", "fifo", "socket", "char", "block", "other"})
EVENT_TYPES = frozenset({"create", "modify", "delete", "move_from", "move_to", "overflow"})
# guest-side failures, mapped to exceptions by the host (communication/files.py)
ERROR_CODES = frozenset(
    {"not_found", "permission_denied", "exists", "not_a_directory", "is_a_directory",
     "not_empty", "no_space", "read_only", "not_a_file", "io_error"}
)  # fmt: skip


def _path(value: object, name: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_PATH or "\0" in value:
        raise ProtocolError(f"{name} must be a non-empty path of at most {MAX_PATH} characters")
    return value


class FileRequest(JsonMessage):
    """``op`` on ``path``; ``to`` for rename; ``depth`` for list; ``mode`` for write and
    make_dir; ``recursive`` for watch; ``staged``: the body takes the bulk lane."""

    __slots__ = ("depth", "mode", "op", "path", "recursive", "staged", "to")

    def __init__(
        self,
        op: str,
        path: str,
        to: str | None = None,
        depth: int = 1,
        mode: int | None = None,
        recursive: bool = False,
        staged: bool = False,
    ) -> None:
        if op not in OPS:
            raise ProtocolError(f"unknown file operation {op!r}")
        self.op = op
        self.path = _path(path, "path")
        self.to = _path(to, "to") if to is not None else None
        if op == "rename" and to is None:
            raise ProtocolError("rename needs 'to'")
        if not 0 <= depth <= MAX_DEPTH:
            raise ProtocolError(f"depth must be between 0 and {MAX_DEPTH}")
        self.depth = depth
        if mode is not None and not 0 <= mode <= 0o7777:
            raise ProtocolError("mode out of range")
        self.mode = mode
        self.recursive = recursive
        self.staged = staged

    @classmethod
    def from_payload(cls, payload: bytes) -> FileRequest:
        data = _loads(payload)
        _check_only(data, {"op", "path", "to", "depth", "mode", "recursive", "staged"})
        return cls(
            op=_field(data, "op", (str,)),
            path=_field(data, "path", (str,)),
            to=_field(data, "to", (str, type(None)), None),
            depth=_field(data, "depth", (int,), 1),
            mode=_field(data, "mode", (int, type(None)), None),
            recursive=_field(data, "recursive", (bool,), False),
            staged=_field(data, "staged", (bool,), False),
        )


def read_segment(fd: int, segment: Segment) -> bytes:
    """Exactly ``segment.bytes`` from ``fd`` (either side's reader of a staged segment);
    a shorter file is a protocol error, and nothing past the announced size is read."""
    parts: list[bytes] = []
    left = segment.bytes
    while left:
        data = os.read(fd, left)
        if not data:
            raise ProtocolError(f"segment {segment.name} is shorter than announced")
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


def _segment_name(name: object) -> bool:
    """``<digits>-<digits>``, at most 10 each: never a path (no re: guest import cost)."""
    if not isinstance(name, str) or not name.isascii():
        return False
    head, sep, tail = name.partition("-")
    return bool(sep) and all(p.isdigit() and 0 < len(p) <= 10 for p in (head, tail))


class Segment(JsonMessage):
    """A staged DATA frame's payload: file ``name`` in the staging directory holds the
    next ``bytes`` bytes of the stream."""

    __slots__ = ("bytes", "name")

    def __init__(self, name: str, size: int) -> None:
        if not _segment_name(name):
            raise ProtocolError("a segment name is <request id>-<number>")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= SEGMENT:
            raise ProtocolError(f"a segment holds 1 to {SEGMENT} bytes")
        self.name = name
        self.bytes = size

    @classmethod
    def from_payload(cls, payload: bytes) -> Segment:
        data = _loads(payload)
        _check_only(data, {"name", "bytes"})
        return cls(_field(data, "name", (str,)), _field(data, "bytes", (int,)))


class Ack(JsonMessage):
    __slots__ = ("bytes",)

    def __init__(self, consumed: int) -> None:
        if not 0 < consumed <= WINDOW:
            raise ProtocolError("ack out of range")
        self.bytes = consumed

    @classmethod
    def from_payload(cls, payload: bytes) -> Ack:
        data = _loads(payload)
        _check_only(data, {"bytes"})
        return cls(_field(data, "bytes", (int,)))


class Done(JsonMessage):
    """The result of an operation: ``value`` depends on it (an entry for stat, a bool for
    exists and make_dir, the byte count for read/write/tar/untar, the entry count for
    list); checked by the host against the operation it asked for."""

    __slots__ = ("value",)

    def __init__(self, value: object = None) -> None:
        self.value = value

    @classmethod
    def from_payload(cls, payload: bytes) -> Done:
        data = _loads(payload)
        _check_only(data, {"value"})
        value = data.get("value")
        if not (value is None or isinstance(value, (bool, int, dict))):
            raise ProtocolError("DONE value must be null, a bool, an int or an object")
        return cls(value)


class WorkspaceRequest(JsonMessage):
    """Mount the share's workspace at ``mount`` (read-only on request; with ``layout``,
    ``input`` is read-only too); ``mount`` None unmounts it."""

    __slots__ = ("layout", "mount", "readonly")

    def __init__(self, mount: str | None, readonly: bool = False, layout: bool = False) -> None:
        if mount is not None and (not mount.startswith("/") or mount == "/"):
            raise ProtocolError("the workspace mount point must be an absolute path below /")
        self.mount = _path(mount, "mount") if mount is not None else None
        self.readonly = readonly
        self.layout = layout

    @classmethod
    def from_payload(cls, payload: bytes) -> WorkspaceRequest:
        data = _loads(payload)
        _check_only(data, {"mount", "readonly", "layout"})
        return cls(
            mount=_field(data, "mount", (str, type(None))),
            readonly=_field(data, "readonly", (bool,), False),
            layout=_field(data, "layout", (bool,), False),
        )


def check_entry(data: object) -> dict[str, Any]:
    """One entry of stat/list as the guest sent it; refused unless exactly well-formed."""
    if not isinstance(data, dict):
        raise ProtocolError("an entry must be an object")
    _check_only(data, {"path", "name", "type", "size", "mode", "mtime", "uid", "gid", "target"})
    path = _path(_field(data, "path", (str,)), "entry path")
    name = _field(data, "name", (str,))
    kind = _field(data, "type", (str,))
    if kind not in ENTRY_TYPES:
        raise ProtocolError(f"unknown entry type {kind!r}")
    size, mode = _field(data, "size", (int,)), _field(data, "mode", (int,))
    if size < 0 or not 0 <= mode <= 0o7777:
        raise ProtocolError("entry size or mode out of range")
    target = _field(data, "target", (str, type(None)), None)
    return {
        "path": path,
        "name": name[:MAX_PATH],
        "type": kind,
        "size": size,
        "mode": mode,
        "mtime": float(_field(data, "mtime", (int, float))),
        "uid": _field(data, "uid", (int,)),
        "gid": _field(data, "gid", (int,)),
        "target": target[:MAX_PATH] if target is not None else None,
    }


def check_events(payload: bytes) -> list[tuple[str, str, bool]]:
    """EVENTS frame: [{"type", "path", "is_dir"}...] (at most MAX_EVENTS_PER_FRAME). A
    watch's first frame is empty: the guest's watch is in place from then on."""
    data = _loads(payload)
    _check_only(data, {"events"})
    events = _field(data, "events", (list,))
    if len(events) > MAX_EVENTS_PER_FRAME:
        raise ProtocolError("too many events in one frame")
    out = []
    for event in events:
        if not isinstance(event, dict):
            raise ProtocolError("an event must be an object")
        _check_only(event, {"type", "path", "is_dir"})
        kind = _field(event, "type", (str,))
        if kind not in EVENT_TYPES:
            raise ProtocolError(f"unknown event type {kind!r}")
        out.append((kind, _path(_field(event, "path", (str,)), "event path"),
                    _field(event, "is_dir", (bool,), False)))  # fmt: skip
    return out
