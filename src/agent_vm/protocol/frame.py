"""Frames on the control channel, and an incremental decoder that survives garbage.

Layout (big-endian)::

    magic "AVMP" | version u8 | type u8 | flags u16 | request_id u32 | length u32 | header_crc u32
    payload (length bytes) | payload_crc u32

The header has its own CRC so that a corrupted length is noticed before we wait for (or
allocate) the payload it announces; ``length`` is also checked against ``MAX_PAYLOAD``
from the header alone. After any error the decoder resynchronises on the next magic, so
one bad frame costs one error report, not the connection.

A CRC only detects accidents. The peer (the guest, for the host) can compute valid CRCs
for hostile content, so callers validate ids, types and sizes of decoded frames too.
"""

from __future__ import annotations

import struct
import zlib

from agent_vm.errors import ProtocolError
from agent_vm.protocol.record import Record

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs guest boot time
if TYPE_CHECKING:
    from collections.abc import Iterator

MAGIC = b"AVMP"
VERSION = 1
HEADER = struct.Struct(">4sBBHIII")
HEADER_SIZE = HEADER.size  # 20
TRAILER = struct.Struct(">I")
TRAILER_SIZE = TRAILER.size
MAX_PAYLOAD = 1 << 20  # what each side accepts by default (every guest-to-host frame)
# The host may send one larger frame kind: an EXECUTE with a command line near Linux's
# own limit (ARG_MAX, 2 MiB of arguments and environment). The guest's decoder accepts it.
MAX_REQUEST_PAYLOAD = 4 << 20
MAX_REQUEST_ID = 0xFFFFFFFF

FLAG_EOF = 0x0001  # STDIN: no more input after this frame


class Frame(Record):
    __slots__ = ("flags", "payload", "request_id", "type")

    def __init__(self, type: int, request_id: int, payload: bytes = b"", flags: int = 0) -> None:
        self.type = type
        self.request_id = request_id
        self.payload = payload
        self.flags = flags


class BadFrame(Record):
    """Something on the wire that is not a valid frame; ``request_id`` if the header was sound."""

    __slots__ = ("reason", "request_id", "too_large")

    def __init__(self, reason: str, request_id: int | None = None, too_large: bool = False) -> None:
        self.reason = reason
        self.request_id = request_id
        self.too_large = too_large


def encode(frame: Frame, max_payload: int = MAX_PAYLOAD) -> bytes:
    if len(frame.payload) > max_payload:
        raise ProtocolError(f"payload of {len(frame.payload)} bytes exceeds {max_payload}")
    if not 0 <= frame.request_id <= MAX_REQUEST_ID:
        raise ProtocolError(f"request id {frame.request_id} out of range")
    head = HEADER.pack(
        MAGIC, VERSION, frame.type, frame.flags, frame.request_id, len(frame.payload), 0
    )[:-4]
    head += TRAILER.pack(zlib.crc32(head))
    return head + frame.payload + TRAILER.pack(zlib.crc32(frame.payload))


class FrameDecoder:
    """Feed bytes as they arrive; iterate :meth:`events` for frames and errors, in order.

    Memory stays bounded: the buffer never holds more than one maximal frame plus the
    chunk just fed, because oversized or corrupt headers are dropped as soon as seen.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._max_payload = max_payload
        self._garbage = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | memoryview) -> None:
        self._buf += data

    def events(self) -> Iterator[Frame | BadFrame]:
        while True:
            event = self._next()
            if event is None:
                return
            yield event

    def _flush_garbage(self) -> BadFrame | None:
        if self._garbage:
            count, self._garbage = self._garbage, 0
            return BadFrame(f"skipped {count} bytes that are not a frame")
        return None

    def _skip(self, count: int) -> None:
        del self._buf[:count]

    def _next(self) -> Frame | BadFrame | None:
        buf = self._buf
        start = buf.find(MAGIC)
        if start < 0:
            # Keep a tail that could be the start of a magic split across reads.
            keep = len(MAGIC) - 1
            if len(buf) > keep:
                self._garbage += len(buf) - keep
                self._skip(len(buf) - keep)
            return self._flush_garbage()
        if start > 0:
            self._garbage += start
            self._skip(start)
        if (bad := self._flush_garbage()) is not None:
            return bad
        if len(buf) < HEADER_SIZE:
            return None
        _magic, version, mtype, flags, request_id, length, head_crc = HEADER.unpack_from(buf)
        if zlib.crc32(bytes(buf[: HEADER_SIZE - 4])) != head_crc:
            self._skip(1)  # not a real header: resync after this magic
            return BadFrame("header checksum mismatch")
        if version != VERSION:
            self._skip(1)
            return BadFrame(f"unsupported protocol version {version}", request_id)
        if length > self._max_payload:
            self._skip(HEADER_SIZE)
            return BadFrame(
                f"frame announces {length} bytes, maximum is {self._max_payload}",
                request_id,
                too_large=True,
            )
        total = HEADER_SIZE + length + TRAILER_SIZE
        if len(buf) < total:
            return None
        with memoryview(buf) as view:  # one copy of the payload, not two
            payload = bytes(view[HEADER_SIZE : HEADER_SIZE + length])
        (payload_crc,) = TRAILER.unpack_from(buf, HEADER_SIZE + length)
        self._skip(total)
        if zlib.crc32(payload) != payload_crc:
            return BadFrame("payload checksum mismatch", request_id)
        return Frame(mtype, request_id, payload, flags)
