"""The host channel against the real guest agent code, in one process (no VM).

What is tested here is the protocol logic on both sides: sessions, stale bytes,
concurrent requests, backpressure, malformed frames in both directions, refusals and
reconnects. Commands run on this host through the agent's real execution code.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from agent_vm.communication.channel import AgentChannel
from agent_vm.errors import (
    AgentRefusedError,
    AgentVMError,
    ChannelClosedError,
    ChannelError,
    FrameTooLargeError,
    HandshakeError,
    ProtocolError,
)
from agent_vm.guest.agent import MAX_EXECUTIONS, Agent
from agent_vm.protocol.frame import HEADER, MAGIC, MAX_PAYLOAD, Frame, encode
from agent_vm.protocol.messages import Execute, Hello, MessageType, Result
from tests.unit.fakeport import FakePort, Shutdowns, start_agent


@pytest.fixture
def agents() -> list[Agent]:
    return []


@pytest_asyncio.fixture
async def port(agents: list[Agent]) -> FakePort:
    port = FakePort()
    agents.append(start_agent(port))
    return port


@pytest_asyncio.fixture
async def channel(port: FakePort) -> AsyncIterator[AgentChannel]:
    channel = AgentChannel(port, name="fake")
    await channel.connect(timeout=10)
    yield channel
    await channel.close()


def sh(script: str, **options: object) -> Execute:
    return Execute(argv=["sh", "-c", script], **options)  # type: ignore[arg-type]


async def test_handshake_and_a_command(channel: AgentChannel) -> None:
    assert channel.ready is not None and channel.ready.session
    raw = await channel.execute(sh("echo out; echo err >&2; exit 3"), wait_timeout=10)
    assert (raw.stdout, raw.stderr, raw.result.exit_code) == (b"out\n", b"err\n", 3)


async def test_concurrent_requests_get_their_own_output(channel: AgentChannel) -> None:
    async def one(i: int) -> bytes:
        raw = await channel.execute(sh(f"sleep 0.0{i % 5}; echo {i}"), wait_timeout=20)
        return raw.stdout

    outputs = await asyncio.gather(*(one(i) for i in range(40)))
    assert outputs == [f"{i}\n".encode() for i in range(40)]


async def test_stdin_streams_in_chunks(channel: AgentChannel) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB: sixteen STDIN frames
    raw = await channel.execute(Execute(argv=["wc", "-c"], stdin=True), stdin=data, wait_timeout=20)
    assert raw.stdout.strip() == str(len(data)).encode()


async def test_a_new_session_kills_the_old_ones_commands(port: FakePort) -> None:
    first = AgentChannel(port, name="first")
    await first.connect(timeout=10)
    running = asyncio.create_task(first.execute(sh("sleep 30; echo never"), wait_timeout=60))
    await asyncio.sleep(0.3)
    second = AgentChannel(port, name="second")
    await second.connect(timeout=10)  # new HELLO: the agent ends the old session's work
    with pytest.raises(ChannelClosedError):
        await asyncio.wait_for(running, 10)
    assert (await second.execute(sh("echo fresh"), wait_timeout=10)).stdout == b"fresh\n"
    await first.close()
    await second.close()


async def test_stale_bytes_of_an_old_session_are_never_taken_for_answers(
    port: FakePort,
) -> None:
    old = AgentChannel(port, name="old")
    await old.connect(timeout=10)
    # request id 1 of the old session will print "stale" after its host went away
    pending = asyncio.create_task(old.execute(sh("sleep 0.5; echo stale"), wait_timeout=30))
    await asyncio.sleep(0.1)
    port.disconnect()
    with pytest.raises(ChannelClosedError):
        await pending
    await asyncio.sleep(1.0)  # the agent wrote STDOUT and RESULT for request 1 meanwhile
    new = AgentChannel(port, name="new")
    await new.connect(timeout=10)  # its first request is request id 1 again
    raw = await new.execute(sh("echo fresh"), wait_timeout=10)
    assert raw.stdout == b"fresh\n"
    await old.close()
    await new.close()


async def test_backpressure_a_host_that_does_not_read_stops_the_command(
    port: FakePort, agents: list[Agent]
) -> None:
    """The agent writes with blocking writes: while the host reads nothing, the command
    blocks on its pipe instead of the agent buffering its output (32 MiB would take a
    fraction of a second to produce)."""
    reader, writer = await port.open()
    writer.write(encode(Frame(MessageType.HELLO, 0, Hello("s" * 16).to_payload())))
    request = Execute(argv=["sh", "-c", "head -c 33554432 /dev/zero; echo done >&2"])
    writer.write(encode(Frame(MessageType.EXECUTE, 7, request.to_payload())))
    await writer.drain()
    await asyncio.sleep(1.0)  # nothing is read meanwhile
    assert 7 in agents[0].executions, "the command finished: its output went somewhere"
    received = bytearray()
    deadline = time.monotonic() + 60
    while b"done" not in received and time.monotonic() < deadline:
        received += await asyncio.wait_for(reader.read(1 << 22), 10)
    assert len(received) > 32 * 2**20  # everything arrived once the host read
    writer.close()


async def test_garbage_from_the_host_gets_an_error_and_the_agent_keeps_serving(
    channel: AgentChannel,
) -> None:
    await channel.send_raw(b"this is not a frame" * 10)
    bad_crc = bytearray(encode(Frame(MessageType.PING, 99, b"")))
    bad_crc[-1] ^= 0xFF
    await channel.send_raw(bytes(bad_crc))
    await asyncio.sleep(0.3)
    assert any(error.code == "bad_frame" for _, error in channel.agent_errors)
    assert (await channel.execute(sh("echo alive"), wait_timeout=10)).stdout == b"alive\n"


async def test_garbage_from_the_guest_is_counted_and_skipped(
    port: FakePort, channel: AgentChannel
) -> None:
    port.write_all(b"\x00garbage from a hostile guest\xff" * 100)
    port.write_all(encode(Frame(0x55, 1, b"unknown type")))
    await asyncio.sleep(0.3)
    assert channel.bad_frames >= 2
    assert (await channel.execute(sh("echo still"), wait_timeout=10)).stdout == b"still\n"


async def test_a_forged_reply_fails_only_its_own_request(
    port: FakePort, channel: AgentChannel
) -> None:
    slow = asyncio.create_task(channel.execute(sh("sleep 1; echo ok"), wait_timeout=20))
    await asyncio.sleep(0.2)
    forged = asyncio.create_task(channel.execute(sh("sleep 5"), wait_timeout=20))
    await asyncio.sleep(0.2)
    port.write_all(encode(Frame(MessageType.RESULT, 2, b'{"exit_code": "zero"}')))
    with pytest.raises(ProtocolError):
        await forged
    assert (await slow).stdout == b"ok\n"


async def test_an_oversized_frame_from_the_guest_closes_the_channel(
    port: FakePort, channel: AgentChannel
) -> None:
    import zlib

    head = HEADER.pack(MAGIC, 1, MessageType.STDOUT, 0, 1, MAX_PAYLOAD + 1, 0)[:-4]
    port.write_all(head + zlib.crc32(head).to_bytes(4, "big"))
    await asyncio.sleep(0.3)
    assert channel.closed
    with pytest.raises(FrameTooLargeError, match="oversized"):
        await channel.execute(sh("true"), wait_timeout=5)


async def test_refusals_keep_the_agents_code(channel: AgentChannel) -> None:
    sleepers = [
        asyncio.create_task(channel.execute(sh("sleep 20"), wait_timeout=60))
        for _ in range(MAX_EXECUTIONS)
    ]
    await asyncio.sleep(1.0)
    with pytest.raises(AgentRefusedError) as refused:
        await channel.execute(sh("true"), wait_timeout=10)
    assert refused.value.code == "bad_request" and "too many" in refused.value.message
    for task in sleepers:
        task.cancel()  # cancelling sends SIGKILL for each
    await asyncio.gather(*sleepers, return_exceptions=True)


async def test_timeouts_kill_the_command_and_say_so(channel: AgentChannel) -> None:
    started = time.monotonic()
    raw = await channel.execute(sh("sleep 30", timeout=0.5), wait_timeout=10)
    assert raw.result.timed_out and raw.result.signal == 9
    assert time.monotonic() - started < 5


async def test_no_agent_is_a_handshake_timeout() -> None:
    silent = FakePort()  # nobody serves it
    channel = AgentChannel(silent, name="silent")
    with pytest.raises(HandshakeError) as caught:
        await channel.connect(timeout=0.5)
    assert isinstance(caught.value, TimeoutError) and isinstance(caught.value, AgentVMError)


async def test_reconnect_after_the_host_side_closed(port: FakePort) -> None:
    first = AgentChannel(port, name="a")
    await first.connect(timeout=10)
    await first.close()
    with pytest.raises(ChannelError):
        await first.execute(sh("true"))
    again = AgentChannel(port, name="b")
    await again.connect(timeout=10)
    assert (await again.execute(sh("echo back"), wait_timeout=10)).stdout == b"back\n"
    await again.close()
    assert port.connections == 2


async def test_ping_and_shutdown(channel: AgentChannel, agents: list[Agent]) -> None:
    status = await channel.ping()
    assert status.running == 0 and status.mem_available_kib > 0
    await channel.request_shutdown()
    await asyncio.sleep(0.2)
    shutdowns = agents[0].on_shutdown
    assert isinstance(shutdowns, Shutdowns) and shutdowns.count == 1


def test_result_payloads_are_validated_strictly() -> None:
    with pytest.raises(ProtocolError):
        Result.from_payload(b'{"exit_code": 0, "signal": null, "timed_out": false, "x": 1}')
