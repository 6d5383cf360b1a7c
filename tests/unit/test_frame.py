"""Framing: round trip, arbitrary chunking, corruption, oversized lengths, resync."""

from __future__ import annotations

import struct
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from agent_vm.errors import ProtocolError
from agent_vm.protocol.frame import (
    HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD,
    VERSION,
    BadFrame,
    Frame,
    FrameDecoder,
    encode,
)

frames = st.builds(
    Frame,
    type=st.integers(0, 255),
    request_id=st.integers(0, 0xFFFFFFFF),
    payload=st.binary(max_size=4096),
    flags=st.integers(0, 0xFFFF),
)


def decode_all(data: bytes, cuts: list[int] | None = None) -> list[Frame | BadFrame]:
    decoder = FrameDecoder()
    out: list[Frame | BadFrame] = []
    start = 0
    for cut in [*sorted(cuts or []), len(data)]:
        decoder.feed(data[start:cut])
        out.extend(decoder.events())
        start = cut
    return out


@given(frames)
def test_round_trip(frame: Frame) -> None:
    assert decode_all(encode(frame)) == [frame]


@given(st.lists(frames, max_size=8), st.data())
def test_any_chunking_of_a_stream_gives_the_same_frames(
    frames_: list[Frame], data: st.DataObject
) -> None:
    stream = b"".join(encode(f) for f in frames_)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    assert decode_all(stream, cuts) == frames_


@given(frames, st.data())
def test_a_flipped_bit_is_never_accepted(frame: Frame, data: st.DataObject) -> None:
    encoded = bytearray(encode(frame))
    bit = data.draw(st.integers(0, len(encoded) * 8 - 1))
    encoded[bit // 8] ^= 1 << (bit % 8)
    events = decode_all(bytes(encoded))
    assert not any(isinstance(e, Frame) for e in events)
    # Whatever was corrupted, the decoder says so (unless it is still waiting for bytes
    # that a corrupted length announced; then the next frame makes it give up, below).
    follow_up = Frame(1, 7, b"next")
    after = decode_all(bytes(encoded) + encode(follow_up) * 2)
    assert any(isinstance(e, BadFrame) for e in after)
    assert after[-1] == follow_up


def _header(length: int, version: int = VERSION) -> bytes:
    head = MAGIC + struct.pack(">BBHII", version, 0x10, 0, 5, length)
    return head + struct.pack(">I", zlib.crc32(head))


def test_oversized_length_is_rejected_from_the_header_alone() -> None:
    decoder = FrameDecoder()
    decoder.feed(_header(MAX_PAYLOAD + 1))
    events = list(decoder.events())
    assert len(events) == 1
    bad = events[0]
    assert isinstance(bad, BadFrame) and bad.too_large and bad.request_id == 5
    assert decoder.buffered < HEADER_SIZE  # nothing kept, nothing allocated for the payload


@given(st.integers(MAX_PAYLOAD + 1, 0xFFFFFFFF))
def test_any_oversized_length_is_rejected(length: int) -> None:
    decoder = FrameDecoder()
    decoder.feed(_header(length))
    (bad,) = list(decoder.events())
    assert isinstance(bad, BadFrame) and bad.too_large


def test_unsupported_version_is_reported_and_skipped() -> None:
    good = Frame(2, 1, b"ok")
    events = decode_all(_header(0, version=VERSION + 1) + b"\0\0\0\0" + encode(good))
    assert isinstance(events[0], BadFrame) and "version" in events[0].reason
    assert events[-1] == good


@settings(max_examples=200)
@given(st.binary(max_size=2000), frames)
def test_garbage_before_a_frame_is_reported_then_the_frame_decodes(
    garbage: bytes, frame: Frame
) -> None:
    events = decode_all(garbage.replace(MAGIC, b"") + encode(frame))
    assert events[-1] == frame
    assert all(isinstance(e, BadFrame) for e in events[:-1])


def test_pure_garbage_is_reported_without_waiting_for_a_magic() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"x" * 100)
    (bad,) = list(decoder.events())
    assert isinstance(bad, BadFrame) and "skipped 97 bytes" in bad.reason
    assert decoder.buffered == 3  # a possible start of a magic is kept


def test_encode_refuses_oversized_payloads() -> None:
    try:
        encode(Frame(1, 1, b"\0" * (MAX_PAYLOAD + 1)))
    except ProtocolError as exc:
        assert "exceeds" in str(exc)
    else:
        raise AssertionError("oversized payload was encoded")
