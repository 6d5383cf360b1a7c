"""Who waits for what the guest sends: commands (output, RESULT), status requests
(STATUS), file streams (DATA, ACK, DONE, EVENTS), each by request id. The channel reads
frames and hands each here; a malformed one fails only the request it names.

Everything here comes from the guest and is untrusted: payloads are parsed by strict
``from_payload`` constructors, stored output is capped (``max_output``) however much the
guest sends, and a frame for a request we did not make is dropped.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from agent_vm.communication.streams import FileStream
from agent_vm.errors import AgentRefusedError, ProtocolError
from agent_vm.logs import get_logger
from agent_vm.protocol.frame import Frame
from agent_vm.protocol.messages import ErrorMessage, MessageType, Result, Status

log = get_logger(__name__)
OutputCallback = Callable[[bytes], None]


@dataclass(frozen=True)
class RawExecution:
    result: Result
    stdout: bytes
    stderr: bytes
    truncated: bool


@dataclass
class Pending:
    request_id: int
    future: asyncio.Future[Result]
    on_stdout: OutputCallback | None
    on_stderr: OutputCallback | None
    max_output: int
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    truncated: bool = False

    def feed(self, stream: MessageType, data: bytes) -> None:
        buffer = self.stdout if stream is MessageType.STDOUT else self.stderr
        room = self.max_output - len(self.stdout) - len(self.stderr)
        if len(data) > room:
            self.truncated = True
        buffer += data[: max(room, 0)]
        callback = self.on_stdout if stream is MessageType.STDOUT else self.on_stderr
        if callback is not None:
            try:
                callback(data)
            except Exception as exc:  # a user's callback must not kill the channel
                log.warning("output_callback_failed", request=self.request_id, error=repr(exc))


class Waiters:
    def __init__(self, name: str) -> None:
        self.name = name
        self.pending: dict[int, Pending] = {}
        self.pings: dict[int, asyncio.Future[Status]] = {}
        self.streams: dict[int, FileStream] = {}
        self.bad_frames = 0
        self.agent_errors: deque[tuple[int, ErrorMessage]] = deque(maxlen=100)

    def dispatch(self, mtype: MessageType, frame: Frame) -> None:
        """Hand ``frame`` to who waits for it; a malformed payload fails that request."""
        try:
            self._route(mtype, frame)
        except ProtocolError as exc:
            self.bad_frames += 1
            log.warning("invalid_message_from_guest", vm=self.name, error=str(exc))
            pending = self.pending.get(frame.request_id)
            if pending is not None and not pending.future.done():
                pending.future.set_exception(exc)
            if (stream := self.streams.get(frame.request_id)) is not None:
                stream.fail(exc)

    def fail_all(self, error: BaseException) -> None:
        """The channel is gone: every waiter gets ``error``."""
        for pending in self.pending.values():
            if not pending.future.done():
                pending.future.set_exception(error)
        for future in self.pings.values():
            if not future.done():
                future.set_exception(error)
        for stream in self.streams.values():
            stream.fail(error)

    def _route(self, mtype: MessageType, frame: Frame) -> None:
        rid = frame.request_id
        if mtype in (MessageType.STDOUT, MessageType.STDERR):
            if (pending := self.pending.get(rid)) is not None:
                pending.feed(mtype, frame.payload)
        elif mtype is MessageType.RESULT:
            result = Result.from_payload(frame.payload)
            if (pending := self.pending.get(rid)) is not None and not pending.future.done():
                pending.future.set_result(result)
        elif mtype in _STREAM_TYPES:
            if (stream := self.streams.get(rid)) is not None:
                _STREAM_TYPES[mtype](stream, frame)
        elif mtype is MessageType.STATUS:
            status = Status.from_payload(frame.payload)
            if (ping := self.pings.get(rid)) is not None and not ping.done():
                ping.set_result(status)
        elif mtype is MessageType.ERROR:
            error = ErrorMessage.from_payload(frame.payload)
            refusal = AgentRefusedError(
                f"{self.name}: agent refused request: {error.code}: {error.message}",
                code=error.code,
                detail=error.message,
            )
            if (pending := self.pending.get(rid)) is not None and not pending.future.done():
                pending.future.set_exception(refusal)
            elif (ping := self.pings.get(rid)) is not None and not ping.done():
                ping.set_exception(refusal)
            elif (stream := self.streams.get(rid)) is not None:
                stream.fail(refusal)
            else:
                self.agent_errors.append((rid, error))
                log.warning("agent_error", vm=self.name, code=error.code, message=error.message)
        else:
            raise ProtocolError(f"{mtype.name} is not a guest-to-host message")


_STREAM_TYPES: dict[MessageType, Callable[[FileStream, Frame], None]] = {
    MessageType.DATA: FileStream.on_data,
    MessageType.ACK: lambda stream, frame: stream.on_ack(frame.payload),
    MessageType.DONE: lambda stream, frame: stream.on_done(frame.payload),
    MessageType.EVENTS: lambda stream, frame: stream.on_events(frame.payload),
}
