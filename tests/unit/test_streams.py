"""FileStream against what a hostile guest can send: past its window, and staged segments
that are links, FIFOs, of the wrong size or named like paths (real files in tmp_path)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from agent_vm.communication.streams import FileStream
from agent_vm.errors import ProtocolError
from agent_vm.protocol.files import SEGMENT, WINDOW, Segment
from agent_vm.protocol.frame import FLAG_EOF, Frame
from agent_vm.protocol.messages import MessageType

sent: list[Frame] = []


async def record(frame: Frame) -> None:
    sent.append(frame)


def data(payload: bytes, eof: bool = False) -> Frame:
    return Frame(MessageType.DATA, 5, payload, FLAG_EOF if eof else 0)


async def drain(stream: FileStream) -> bytes:
    out = b""
    async for chunk in stream.chunks():
        out += chunk
    return out


async def test_bytes_past_the_window_are_a_protocol_error() -> None:
    stream = FileStream(5, record, "vm")
    stream.on_data(data(b"x" * WINDOW))
    with pytest.raises(ProtocolError, match="credit window"):
        stream.on_data(data(b"x"))


async def test_segments_count_against_the_window_by_their_size(tmp_path: Path) -> None:
    stream = FileStream(5, record, "vm", staging=tmp_path)
    stream.on_data(data(Segment("5-1", SEGMENT).to_payload()))
    stream.on_data(data(Segment("5-2", SEGMENT).to_payload()))
    with pytest.raises(ProtocolError, match="credit window"):
        stream.on_data(data(Segment("5-3", 1).to_payload()))


async def test_a_good_segment_is_read_and_removed(tmp_path: Path) -> None:
    (tmp_path / "5-1").write_bytes(b"hello")
    stream = FileStream(5, record, "vm", staging=tmp_path)
    stream.on_data(data(Segment("5-1", 5).to_payload(), eof=True))
    assert await drain(stream) == b"hello"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("trap", ["symlink", "fifo", "longer", "shorter", "missing", "dir"])
async def test_a_bad_segment_ends_the_stream_without_blocking(tmp_path: Path, trap: str) -> None:
    outside = tmp_path.parent / f"{tmp_path.name}-secret"
    outside.write_bytes(b"12345")
    staging = tmp_path / "staging"
    staging.mkdir()
    segment = staging / "5-1"
    if trap == "symlink":
        segment.symlink_to(outside)
    elif trap == "fifo":
        os.mkfifo(segment)
    elif trap == "longer":
        segment.write_bytes(b"123456")
    elif trap == "shorter":
        segment.write_bytes(b"1234")
    elif trap == "dir":
        segment.mkdir()
    stream = FileStream(5, record, "vm", staging=staging)
    stream.on_data(data(Segment("5-1", 5).to_payload(), eof=True))
    with pytest.raises(ProtocolError, match="segment 5-1"):
        await asyncio.wait_for(drain(stream), 5)
    assert outside.read_bytes() == b"12345"


@pytest.mark.parametrize("name", ["../5-1", "/etc/passwd", "5-1/x", "5", "5-", "a-1", ""])
async def test_segment_names_are_never_paths(tmp_path: Path, name: str) -> None:
    stream = FileStream(5, record, "vm", staging=tmp_path)
    payload = json.dumps({"name": name, "bytes": 1}).encode()
    with pytest.raises(ProtocolError, match="segment name"):
        stream.on_data(data(payload))


async def test_staged_sends_are_whole_segments_within_the_window(tmp_path: Path) -> None:
    sent.clear()
    stream = FileStream(5, record, "vm", staging=tmp_path)
    await stream.send(b"a" * (SEGMENT + 10))
    await stream.send(b"b" * 10)
    assert len(sent) == 1 and Segment.from_payload(sent[0].payload).bytes == SEGMENT
    await stream.end()
    sizes = [Segment.from_payload(f.payload).bytes for f in sent if f.payload]
    assert sizes == [SEGMENT, 20] and sent[-1].flags & FLAG_EOF
    assert (tmp_path / "5-2").read_bytes() == b"a" * 10 + b"b" * 10
    # a third full segment would pass the window: it waits for the guest's ACK
    blocked = asyncio.ensure_future(stream.send(b"c" * SEGMENT * 2))
    await asyncio.sleep(0.05)
    assert not blocked.done()
    blocked.cancel()
