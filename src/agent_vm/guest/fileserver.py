"""File operations for the host, inside the guest. Standard library only.

Each FILE request runs in a thread of its own (``Operation``). Streams follow the credit
rules of ``protocol/files.py``: what the host sends is queued up to ``WINDOW`` bytes and
acknowledged as it is written; what we send waits for the host's acknowledgements, so a
slow host (or a 1 GB file) never makes either side hold more than the window.

Reading refuses anything but regular files (a FIFO would block forever); ``write``
replaces its target atomically (a temporary file renamed over it); ``tar`` streams a tree
without following symlinks.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import stat
import threading

from agent_vm.errors import ProtocolError
from agent_vm.guest.filebits import (
    ERRNO_CODES,
    Cancelled,
    Failed,
    Reader,
    Writer,
    entry,
    staging,
    take,
)
from agent_vm.protocol.files import (
    ACK_EVERY,
    DATA_CHUNK,
    MAX_EVENTS_PER_FRAME,
    SEGMENT,
    WINDOW,
    Ack,
    Done,
    FileRequest,
    Segment,
)
from agent_vm.protocol.frame import FLAG_EOF
from agent_vm.protocol.messages import MessageType

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from agent_vm.guest.wire import Wire


class Operation:
    """One FILE request: its thread, its incoming queue, its outgoing credit."""

    def __init__(self, agent: Wire, request_id: int, session: str, req: FileRequest) -> None:
        self.agent = agent
        self.request_id = request_id
        self.session = session
        self.req = req
        self.cancelled = threading.Event()
        self._incoming: queue.Queue[bytes | Segment | None] = queue.Queue()
        self._queued = 0
        self._lock = threading.Lock()
        self._credit = threading.Condition(self._lock)
        self._in_flight = 0
        self._segments = 0
        # what one DATA frame (or one staged segment) carries
        self.unit = SEGMENT if req.staged else DATA_CHUNK

    # -- called from the reader thread --

    def feed(self, data: bytes, eof: bool) -> None:
        if self.req.op not in ("write", "untar"):
            raise ProtocolError(f"{self.req.op} takes no data")
        item: bytes | Segment = data
        size = len(data)
        if data and self.req.staged:
            item = Segment.from_payload(data)
            size = item.bytes
        with self._lock:
            self._queued += size
            over = self._queued > WINDOW
        if over:
            raise ProtocolError(f"more than {WINDOW} unacknowledged bytes for {self.req.op}")
        if data:
            self._incoming.put(item)
        if eof:
            self._incoming.put(None)

    def ack(self, consumed: int) -> None:
        with self._credit:
            self._in_flight = max(0, self._in_flight - consumed)
            self._credit.notify_all()

    def cancel(self) -> None:
        self.cancelled.set()
        self._incoming.put(None)
        with self._credit:
            self._credit.notify_all()

    # -- the operation's thread --

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"file-{self.request_id}", daemon=True).start()

    def _run(self) -> None:
        try:
            if self.req.staged:
                from agent_vm.guest import workspace

                workspace.ensure_share()
            value = getattr(self, f"_op_{self.req.op}")()
        except Cancelled:
            pass  # the host asked for it and no longer listens: nothing to say
        except Failed as exc:
            self.agent.send_error(self.request_id, exc.code, str(exc))
        except OSError as exc:
            code = ERRNO_CODES.get(exc.errno or 0, "io_error")
            self.agent.send_error(self.request_id, code, f"{exc.strerror}: {self.req.path}")
        except (ProtocolError, ValueError) as exc:
            self.agent.send_error(self.request_id, "bad_request", str(exc))
        except Exception as exc:  # the agent keeps serving whatever one operation does
            self.agent.send_error(self.request_id, "io_error", repr(exc))
        else:
            self.agent.send(MessageType.DONE, self.request_id, Done(value).to_payload(),
                            self.session)  # fmt: skip
        finally:
            self.agent.forget_file(self.request_id, self)

    # sending (credit-bounded)

    def send_data(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            chunk = view[: self.unit]
            view = view[self.unit :]
            with self._credit:
                while self._in_flight + len(chunk) > WINDOW and not self.cancelled.is_set():
                    self._credit.wait(1.0)
                if self.cancelled.is_set():
                    raise Cancelled()
                self._in_flight += len(chunk)
            payload = self._stage(chunk) if self.req.staged else bytes(chunk)
            if not self.agent.send(MessageType.DATA, self.request_id, payload, self.session):
                raise Cancelled()  # a new session: nobody is listening

    def _stage(self, chunk: memoryview) -> bytes:
        """Write one segment into the staging directory; the DATA payload naming it."""
        self._segments += 1
        name = f"{self.request_id}-{self._segments}"
        fd = os.open(staging(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = chunk
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        return Segment(name, len(chunk)).to_payload()

    def end_data(self) -> None:
        self.agent.send(MessageType.DATA, self.request_id, b"", self.session, flags=FLAG_EOF)

    # receiving (acknowledged as consumed)

    def chunks(self) -> Any:
        """The host's bytes as they come (a staged segment read and removed)."""
        pending = 0
        while True:
            data = self._incoming.get()
            if self.cancelled.is_set():
                raise Cancelled()
            if data is None:
                if pending:
                    self._ack(pending)
                return
            size = data.bytes if isinstance(data, Segment) else len(data)
            if isinstance(data, Segment):
                data = take(data)
            with self._lock:
                self._queued -= size
            yield data
            pending += size
            if pending >= ACK_EVERY:
                self._ack(pending)
                pending = 0

    def _ack(self, consumed: int) -> None:
        while consumed:
            part = min(consumed, WINDOW)
            self.agent.send(MessageType.ACK, self.request_id, Ack(part).to_payload(), self.session)
            consumed -= part

    # -- operations --

    def _op_stat(self) -> dict[str, Any]:
        return entry(self.req.path, os.lstat(self.req.path))

    def _op_exists(self) -> bool:
        return os.path.lexists(self.req.path)

    def _op_make_dir(self) -> bool:
        if os.path.isdir(self.req.path):
            return False
        os.makedirs(self.req.path, mode=self.req.mode or 0o755)
        return True

    def _op_remove(self) -> None:
        st = os.lstat(self.req.path)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(self.req.path)
        else:
            os.unlink(self.req.path)

    def _op_rename(self) -> None:
        assert self.req.to is not None
        os.rename(self.req.path, self.req.to)

    def _op_list(self) -> int:
        """Entries below ``path`` to ``depth`` levels, as JSON lines in DATA frames."""
        root = self.req.path
        if not os.path.isdir(root):
            os.lstat(root)  # not_found if missing
            raise Failed("not_a_directory", f"not a directory: {root}")
        count = 0
        buffer: list[bytes] = []
        size = 0
        levels = [(root, 1)]
        while levels:
            directory, level = levels.pop()
            with os.scandir(directory) as it:
                for item in it:
                    st = item.stat(follow_symlinks=False)
                    line = json.dumps(entry(item.path, st, item.name)).encode() + b"\n"
                    buffer.append(line)
                    size += len(line)
                    count += 1
                    if stat.S_ISDIR(st.st_mode) and level < self.req.depth:
                        levels.append((item.path, level + 1))
                    if size >= DATA_CHUNK // 2:
                        self.send_data(b"".join(buffer))
                        buffer, size = [], 0
        if buffer:
            self.send_data(b"".join(buffer))
        self.end_data()
        return count

    def _op_read(self) -> int:
        fd = os.open(self.req.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise Failed("is_a_directory", f"is a directory: {self.req.path}")
            if not stat.S_ISREG(st.st_mode):
                raise Failed("not_a_file", f"not a regular file: {self.req.path}")
            os.set_blocking(fd, True)
            total = 0
            while True:
                data = os.read(fd, self.unit)
                if not data:
                    break
                self.send_data(data)
                total += len(data)
        finally:
            os.close(fd)
        self.end_data()
        return total

    def _op_write(self) -> int:
        path = self.req.path
        if os.path.isdir(path):
            raise Failed("is_a_directory", f"is a directory: {path}")
        parent = os.path.dirname(path) or "."
        os.makedirs(parent, exist_ok=True)
        temporary = os.path.join(parent, f".{os.path.basename(path)}.agentvm-{self.request_id}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     self.req.mode if self.req.mode is not None else 0o644)  # fmt: skip
        total = 0
        try:
            try:
                for data in self.chunks():
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    total += len(data)
            finally:
                os.close(fd)
            if self.req.mode is not None:
                os.chmod(temporary, self.req.mode)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        return total

    def _op_tar(self) -> int:
        import tarfile

        root = self.req.path
        if not os.path.isdir(root):
            os.lstat(root)
            raise Failed("not_a_directory", f"not a directory: {root}")
        writer = Writer(self)
        # the stubs want a typed file object; tarfile needs only write()
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for name in sorted(os.listdir(root)):
                tar.add(os.path.join(root, name), arcname=name, recursive=True)
        writer.flush()
        self.end_data()
        return writer.total

    def _op_untar(self) -> int:
        import tarfile

        os.makedirs(self.req.path, exist_ok=True)
        reader = Reader(self.chunks())
        with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                tar.extract(member, self.req.path)
        for _ in reader.rest():  # a tar's trailing padding
            pass
        return reader.total

    def _op_watch(self) -> None:
        from agent_vm.guest.inotify import Watcher

        with Watcher(self.req.path, self.req.recursive) as watcher:
            ready = json.dumps({"events": []}).encode()  # the watch is in place: say so
            if not self.agent.send(MessageType.EVENTS, self.request_id, ready, self.session):
                return
            while not self.cancelled.is_set():
                events = watcher.read(timeout=0.2)
                for start in range(0, len(events), MAX_EVENTS_PER_FRAME):
                    part = events[start : start + MAX_EVENTS_PER_FRAME]
                    payload = json.dumps({"events": part}, separators=(",", ":")).encode()
                    if not self.agent.send(MessageType.EVENTS, self.request_id, payload,
                                           self.session):  # fmt: skip
                        return
        raise Cancelled()
