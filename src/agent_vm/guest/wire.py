"""The guest agent's writing half and its books: what executions and file operations
need from the agent (``process.py`` and ``fileserver.py`` hold a ``Wire``, never the
dispatcher itself). Standard library only.

Frames of a superseded session are dropped under the write lock, so nothing of an older
session is ever written after the READY of a newer one.
"""

from __future__ import annotations

import threading

from agent_vm.guest.link import Link
from agent_vm.protocol.frame import MAX_PAYLOAD, Frame, encode
from agent_vm.protocol.messages import ErrorMessage, MessageType

TYPE_CHECKING = False  # typing is avoided here: imports cost boot time under TCG
if TYPE_CHECKING:
    from typing import Any

MAX_EXECUTIONS = 64


class Wire:
    def __init__(self, link: Link) -> None:
        self.link = link
        self.write_lock = threading.Lock()
        self.session: str | None = None
        self.executions: dict[int, Any] = {}  # request id -> process.Execution
        self.files: dict[int, Any] = {}  # request id -> fileserver.Operation
        self.exec_lock = threading.Lock()

    def send(
        self,
        mtype: MessageType,
        request_id: int,
        payload: bytes = b"",
        session: str | None = None,
        flags: int = 0,
    ) -> bool:
        """Write one frame (split if large). Frames of a superseded session are dropped."""
        with self.write_lock:
            if session is not None and session != self.session:
                return False
            for start in range(0, max(len(payload), 1), MAX_PAYLOAD):
                chunk = payload[start : start + MAX_PAYLOAD]
                self.link.write_all(encode(Frame(mtype, request_id, chunk, flags)))
        return True

    def send_error(self, request_id: int, code: str, message: str) -> None:
        self.send(MessageType.ERROR, request_id, ErrorMessage(code, message).to_payload())

    def forget(self, request_id: int, execution: object) -> None:
        with self.exec_lock:
            if self.executions.get(request_id) is execution:
                del self.executions[request_id]

    def forget_file(self, request_id: int, operation: object) -> None:
        with self.exec_lock:
            if self.files.get(request_id) is operation:
                del self.files[request_id]
