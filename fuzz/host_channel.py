"""Fuzz the host's side of the control channel: frame decoding and message handling.

    .venv/bin/python -m fuzz.host_channel [--inputs 1000000] [--seed N]

Everything the guest sends is untrusted. Inputs are valid frames of every guest-to-host
type (and others), mutated: bit flips, truncations, splices, wrong and huge lengths,
random payloads, garbage between frames, and random bytes alone, fed to the decoder in
random chunk sizes. Each decoded event goes through the channel's own handling
(``AgentChannel._handle``, with a request pending so that replies are parsed). The only
exceptions allowed are the protocol's own, the ones the channel's read loop turns into a
closed channel (``ProtocolError`` for an oversized frame, ``ChannelClosedError`` for a
READY of another session); any other is a bug and is printed with its input. Prints a
summary line and writes JSON (default ``bench/results/fuzz-host-channel-<time>.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import struct
import time
import traceback
import zlib
from pathlib import Path

from agent_vm import logs
from agent_vm.communication.channel import AgentChannel, ChannelState
from agent_vm.communication.waiters import Pending
from agent_vm.errors import ChannelClosedError, ProtocolError
from agent_vm.protocol.frame import HEADER, MAGIC, MAX_PAYLOAD, VERSION, Frame, FrameDecoder, encode
from agent_vm.protocol.messages import MessageType, Ready, Result, Status

GUEST_TYPES = [t for t in MessageType]
SAMPLES = {
    MessageType.STDOUT: [b"hello", b"", bytes(range(256))],
    MessageType.STDERR: [b"err\n"],
    MessageType.RESULT: [Result(0, None, False, 0.1).to_payload(), b'{"exit_code": 1}'],
    MessageType.STATUS: [Status(1.0, 0, 0.0, 1000, True).to_payload()],
    MessageType.READY: [Ready("s" * 16, "1", 1, "b", 0.5).to_payload()],
    MessageType.ERROR: [b'{"code": "bad_request", "message": "x"}'],
}


class NullTransport:
    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        raise OSError("not used")

    def describe(self) -> str:
        return "fuzz"


def valid_frame(rng: random.Random) -> bytes:
    kind = rng.choice(GUEST_TYPES)
    payload = rng.choice(SAMPLES.get(kind, [b"{}"]))
    return encode(Frame(kind, rng.choice([0, 1, 2, 7, 2**32 - 1]), payload))


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        if op == 0 and buf:  # flip bits
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # truncate
            del buf[rng.randrange(len(buf)) :]
        elif op == 2:  # splice garbage in
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.randbytes(rng.randint(1, 64))
        elif op == 3 and len(buf) >= 20:  # a wrong length, the header CRC recomputed
            length = rng.choice(
                [0, 1, MAX_PAYLOAD, MAX_PAYLOAD + 1, 2**32 - 1, rng.randrange(2**20)]
            )
            struct.pack_into(">I", buf, 12, length)
            struct.pack_into(">I", buf, 16, zlib.crc32(bytes(buf[:16])))
        elif op == 4:  # another frame glued on
            buf += valid_frame(rng)
        elif op == 5 and len(buf) >= 20:  # a random payload with a valid CRC
            payload = rng.randbytes(rng.randint(0, 300))
            head = HEADER.pack(MAGIC, VERSION, buf[5], 0, rng.randrange(8), len(payload), 0)[:-4]
            buf = bytearray(head + zlib.crc32(head).to_bytes(4, "big") + payload)
            buf += zlib.crc32(payload).to_bytes(4, "big")
        else:  # pure noise
            buf = bytearray(rng.randbytes(rng.randint(0, 200)))
    return bytes(buf)


def one_input(rng: random.Random) -> bytes:
    if rng.random() < 0.1:
        return rng.randbytes(rng.randint(0, 512))
    return b"".join(mutate(valid_frame(rng), rng) for _ in range(rng.randint(1, 3)))


async def run(inputs: int, seed: int) -> dict[str, object]:
    logs.configure("error")  # every bad frame would be logged as a warning
    rng = random.Random(seed)
    channel = AgentChannel(NullTransport(), name="fuzz", max_output=1 << 20)
    channel.state = ChannelState.READY  # as after a handshake: replies are dispatched
    loop = asyncio.get_running_loop()
    failures: list[dict[str, str]] = []
    protocol_errors = frames = bad = 0
    started = time.perf_counter()
    decoder = FrameDecoder()
    for n in range(inputs):
        if n % 1000 == 0:  # a request the guest can answer (or forge answers for)
            channel.waiters.pending.clear()
            channel.waiters.pings.clear()
            for rid in (1, 2, 7):
                result: asyncio.Future[Result] = loop.create_future()
                status: asyncio.Future[Status] = loop.create_future()
                for future in (result, status):  # answered or failed: nobody awaits them
                    future.add_done_callback(lambda f: f.cancelled() or f.exception())
                channel.waiters.pending[rid] = Pending(rid, result, None, None, 1 << 16)
                channel.waiters.pings[rid + 100] = status
            decoder = FrameDecoder()
        data = one_input(rng)
        if rng.random() < 0.9:
            decoder = FrameDecoder()  # mostly one input per stream; sometimes a long stream
        try:
            view = memoryview(data)
            while view:
                size = rng.choice([1, 7, 64, 4096, len(view)])
                decoder.feed(bytes(view[:size]))
                view = view[size:]
                for event in decoder.events():
                    if isinstance(event, Frame):
                        frames += 1
                    else:
                        bad += 1
                    try:
                        channel._handle(event)
                    except (ProtocolError, ChannelClosedError):
                        protocol_errors += 1
                        decoder = FrameDecoder()  # the channel would be closed: start over
        except Exception as exc:  # anything else is a bug
            failures.append(
                {"input": data.hex(), "error": repr(exc), "trace": traceback.format_exc()}
            )
            decoder = FrameDecoder()
            if len(failures) >= 20:
                break
        if decoder.buffered > MAX_PAYLOAD + 64:
            failures.append({"input": data.hex(), "error": f"decoder holds {decoder.buffered} B"})
    seconds = time.perf_counter() - started
    return {
        "inputs": n + 1,
        "seed": seed,
        "seconds": round(seconds, 1),
        "frames_decoded": frames,
        "bad_frames": bad,
        "protocol_errors": protocol_errors,
        "other_exceptions": len(failures),
        "failures": failures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = asyncio.run(run(args.inputs, args.seed))
    for failure in report["failures"]:  # type: ignore[attr-defined]
        print(failure["error"], failure.get("trace", ""), sep="\n")
    print(
        f"{report['inputs']} inputs (seed {report['seed']}) in {report['seconds']} s: "
        f"{report['frames_decoded']} frames, {report['bad_frames']} bad frames, "
        f"{report['protocol_errors']} protocol errors, "
        f"{report['other_exceptions']} other exceptions"
    )
    out = (
        args.out
        or Path("bench/results") / f"fuzz-host-channel-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    raise SystemExit(1 if report["other_exceptions"] else 0)


if __name__ == "__main__":
    main()
