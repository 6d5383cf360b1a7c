"""Message types and their payloads: JSON objects for control, raw bytes for streams.

Both ends validate what they receive with these ``from_payload`` constructors, which
accept exactly the documented fields and types; anything else raises ``ProtocolError``.
Standard library only (the guest imports this module).
"""

from __future__ import annotations

import enum
import json

from agent_vm.errors import ProtocolError
from agent_vm.protocol.record import Record

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs guest boot time
if TYPE_CHECKING:
    from typing import Any

PROTOCOL_VERSION = 1
MAX_ARGV_BYTES = 2 << 20  # Linux's ARG_MAX with the usual 8 MiB stack (arguments + env)
MAX_ARG_BYTES = 128 * 1024  # Linux's MAX_ARG_STRLEN: one argument (or a bash -c script)
MAX_USER = 64
MAX_ENV_ENTRIES = 1024


class MessageType(enum.IntEnum):
    HELLO = 0x01  # host -> guest: start a session (discard everything from before)
    READY = 0x02  # guest -> host: agent is serving; answers HELLO, or announces itself
    EXECUTE = 0x10  # host -> guest: run a command (request id = the execution)
    STDIN = 0x11  # host -> guest: bytes for the command's stdin; FLAG_EOF closes it
    STDOUT = 0x12  # guest -> host: bytes the command wrote
    STDERR = 0x13  # guest -> host
    RESULT = 0x14  # guest -> host: the command ended (last frame of a request)
    SIGNAL = 0x15  # host -> guest: deliver a signal to the command's process group
    RESIZE = 0x16  # host -> guest: new terminal size of a command run in a PTY
    PING = 0x20  # host -> guest
    STATUS = 0x21  # guest -> host: answer to PING and CONFIGURE
    CONFIGURE = 0x22  # host -> guest: clock, entropy and identity of a new sandbox
    WORKSPACE = 0x23  # host -> guest: mount (or unmount) the shared workspace; STATUS
    SHUTDOWN = 0x30  # host -> guest: power the VM off cleanly
    FILE = 0x40  # host -> guest: a file operation (protocol/files.py); one request id each
    DATA = 0x41  # either way: bytes of a file operation's stream; FLAG_EOF ends it
    ACK = 0x42  # either way: the receiver consumed this many stream bytes (credit)
    DONE = 0x43  # guest -> host: a file operation ended; its result (last frame)
    EVENTS = 0x44  # guest -> host: file system events of a watch
    CANCEL = 0x45  # host -> guest: stop a file operation (a watch, a stream)
    ERROR = 0x7F  # either way: a request or frame was refused


def _loads(payload: bytes) -> dict[str, Any]:
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"payload is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ProtocolError("payload must be a JSON object")
    return data


def _dumps(data: dict[str, object]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _field(data: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any = ...) -> Any:
    if name not in data:
        if default is ...:
            raise ProtocolError(f"missing field {name!r}")
        return default
    value = data[name]
    # bool is an int subclass: never let True pass as a number.
    if isinstance(value, bool) and bool not in kinds:
        raise ProtocolError(f"field {name!r} has type bool")
    if not isinstance(value, kinds):
        raise ProtocolError(f"field {name!r} has type {type(value).__name__}")
    return value


def _check_only(data: dict[str, Any], allowed: set[str]) -> None:
    extra = set(data) - allowed
    if extra:
        raise ProtocolError(f"unknown fields {sorted(extra)}")


class JsonMessage(Record):
    """A control message whose payload is its fields as a JSON object."""

    __slots__ = ()

    def to_payload(self) -> bytes:
        return _dumps(self.asdict())


class Hello(JsonMessage):
    __slots__ = ("protocol", "session")

    def __init__(self, session: str, protocol: int = PROTOCOL_VERSION) -> None:
        self.session = session
        self.protocol = protocol

    @classmethod
    def from_payload(cls, payload: bytes) -> Hello:
        data = _loads(payload)
        _check_only(data, {"session", "protocol"})
        session = _field(data, "session", (str,))
        if not 8 <= len(session) <= 64:
            raise ProtocolError("session id must be 8..64 characters")
        return cls(session, _field(data, "protocol", (int,)))


class Ready(JsonMessage):
    __slots__ = ("agent_version", "boot_id", "protocol", "session", "uptime")

    def __init__(
        self, session: str | None, agent_version: str, protocol: int, boot_id: str, uptime: float
    ) -> None:
        self.session = session
        self.agent_version = agent_version
        self.protocol = protocol
        self.boot_id = boot_id
        self.uptime = uptime

    @classmethod
    def from_payload(cls, payload: bytes) -> Ready:
        data = _loads(payload)
        _check_only(data, {"session", "agent_version", "protocol", "boot_id", "uptime"})
        return cls(
            session=_field(data, "session", (str, type(None))),
            agent_version=_field(data, "agent_version", (str,))[:64],
            protocol=_field(data, "protocol", (int,)),
            boot_id=_field(data, "boot_id", (str,))[:64],
            uptime=float(_field(data, "uptime", (int, float))),
        )


class Execute(JsonMessage):
    """Run ``argv`` directly, or ``shell`` through bash (sh if absent); exactly one is set."""

    __slots__ = ("argv", "cwd", "env", "pids_max", "pty", "shell", "stdin", "timeout", "user")

    def __init__(
        self,
        argv: list[str] | None = None,
        shell: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        stdin: bool = False,
        pids_max: int | None = None,
        pty: list[int] | None = None,
    ) -> None:
        self.argv = argv
        self.shell = shell
        self.env = env if env is not None else {}
        self.cwd = cwd
        self.user = user
        self.timeout = timeout
        self.stdin = stdin
        self.pids_max = pids_max  # processes the command may have at once (its cgroup)
        self.pty = pty  # [cols, rows]: run in a terminal (stdin, stdout and stderr its)
        self._validate()

    def _validate(self) -> None:
        if (self.argv is None) == (self.shell is None):
            raise ProtocolError("exactly one of argv and shell must be given")
        if self.argv is not None and not self.argv:
            raise ProtocolError("argv must not be empty")
        size = sum(len(a.encode()) + 1 for a in (self.argv or [self.shell or ""]))
        size += sum(len(k.encode()) + len(v.encode()) + 2 for k, v in self.env.items())
        if size > MAX_ARGV_BYTES:
            raise ProtocolError(
                f"command line and environment are {size} bytes; Linux allows {MAX_ARGV_BYTES}"
                " (send large programs as a file or on stdin)"
            )
        longest = max(len(a.encode()) for a in (self.argv or [self.shell or ""]))
        if longest > MAX_ARG_BYTES:
            what = "the shell command" if self.shell is not None else "one argument"
            raise ProtocolError(
                f"{what} is {longest} bytes; Linux allows {MAX_ARG_BYTES} per argument"
                " (send large programs as a file or on stdin)"
            )
        if len(self.env) > MAX_ENV_ENTRIES:
            raise ProtocolError(f"more than {MAX_ENV_ENTRIES} environment variables")
        for key, value in self.env.items():
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise ProtocolError(f"invalid environment variable {key!r}")
        if self.timeout is not None and not 0 < self.timeout <= 7 * 86400:
            raise ProtocolError("timeout must be between 0 and 7 days")
        if self.user is not None and not valid_user(self.user):
            raise ProtocolError(
                f"user {self.user[:MAX_USER]!r} is not a user name or a numeric uid"
            )
        if self.pids_max is not None and not 1 <= self.pids_max <= 4_194_304:
            raise ProtocolError("pids_max must be between 1 and 4194304")
        if self.pty is not None:
            _terminal_size(self.pty)

    @classmethod
    def from_payload(cls, payload: bytes) -> Execute:
        data = _loads(payload)
        _check_only(
            data, {"argv", "shell", "env", "cwd", "user", "timeout", "stdin", "pids_max", "pty"}
        )
        argv = _field(data, "argv", (list, type(None)), None)
        if argv is not None and not all(isinstance(a, str) for a in argv):
            raise ProtocolError("argv must be a list of strings")
        env = _field(data, "env", (dict,), {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ProtocolError("env must map strings to strings")
        timeout = _field(data, "timeout", (int, float, type(None)), None)
        return cls(
            argv=argv,
            shell=_field(data, "shell", (str, type(None)), None),
            env=env,
            cwd=_field(data, "cwd", (str, type(None)), None),
            user=_field(data, "user", (str, type(None)), None),
            timeout=float(timeout) if timeout is not None else None,
            stdin=_field(data, "stdin", (bool,), False),
            pids_max=_field(data, "pids_max", (int, type(None)), None),
            pty=_field(data, "pty", (list, type(None)), None),
        )


def valid_user(user: str) -> bool:
    """A user name as Debian's ``adduser`` allows it (letters, digits, ``_.-``, a
    trailing ``$``; not starting with ``-``), or a numeric uid."""
    if user.isdigit():
        return len(user) <= 10 and int(user) < 2**32 - 1
    if not 0 < len(user) <= MAX_USER or user[0] == "-" or user[0].isdigit():
        return False
    body = user[:-1] if user.endswith("$") else user
    return all(c.isascii() and (c.isalnum() or c in "_.-") for c in body)


def _terminal_size(size: object) -> tuple[int, int]:
    if (
        not isinstance(size, list)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1000 for v in size)
    ):
        raise ProtocolError("a terminal size is [cols, rows], each 1 to 1000")
    return size[0], size[1]


class Resize(JsonMessage):
    """A PTY's new size (the guest's kernel sends SIGWINCH to its foreground group)."""

    __slots__ = ("cols", "rows")

    def __init__(self, cols: int, rows: int) -> None:
        self.cols, self.rows = _terminal_size([cols, rows])

    @classmethod
    def from_payload(cls, payload: bytes) -> Resize:
        data = _loads(payload)
        _check_only(data, {"cols", "rows"})
        return cls(_field(data, "cols", (int,)), _field(data, "rows", (int,)))


class Result(JsonMessage):
    __slots__ = ("duration", "error", "exit_code", "signal", "timed_out")

    def __init__(
        self,
        exit_code: int | None,
        signal: int | None,
        timed_out: bool,
        duration: float,
        error: str | None = None,
    ) -> None:
        self.exit_code = exit_code
        self.signal = signal
        self.timed_out = timed_out
        self.duration = duration
        self.error = error

    @classmethod
    def from_payload(cls, payload: bytes) -> Result:
        data = _loads(payload)
        _check_only(data, {"exit_code", "signal", "timed_out", "duration", "error"})
        exit_code = _field(data, "exit_code", (int, type(None)))
        signal = _field(data, "signal", (int, type(None)))
        if exit_code is not None and not -255 <= exit_code <= 255:
            raise ProtocolError("exit code out of range")
        if signal is not None and not 0 < signal < 128:
            raise ProtocolError("signal out of range")
        error = _field(data, "error", (str, type(None)), None)
        return cls(
            exit_code=exit_code,
            signal=signal,
            timed_out=_field(data, "timed_out", (bool,)),
            duration=float(_field(data, "duration", (int, float))),
            error=error[:4096] if error else None,
        )


class Signal(JsonMessage):
    __slots__ = ("signal",)

    def __init__(self, signal: int) -> None:
        self.signal = signal

    @classmethod
    def from_payload(cls, payload: bytes) -> Signal:
        data = _loads(payload)
        _check_only(data, {"signal"})
        sig = _field(data, "signal", (int,))
        if not 0 < sig < 65:
            raise ProtocolError("signal out of range")
        return cls(sig)


class Status(JsonMessage):
    __slots__ = ("load1", "mem_available_kib", "running", "settled", "uptime")

    def __init__(
        self,
        uptime: float,
        running: int,
        load1: float,
        mem_available_kib: int,
        settled: bool = False,
    ) -> None:
        self.uptime = uptime
        self.running = running
        self.load1 = load1
        self.mem_available_kib = mem_available_kib
        self.settled = settled  # init finished its late start-up work (modules, button)

    @classmethod
    def from_payload(cls, payload: bytes) -> Status:
        data = _loads(payload)
        _check_only(data, {"uptime", "running", "load1", "mem_available_kib", "settled"})
        return cls(
            uptime=float(_field(data, "uptime", (int, float))),
            running=_field(data, "running", (int,)),
            load1=float(_field(data, "load1", (int, float))),
            mem_available_kib=_field(data, "mem_available_kib", (int,)),
            settled=_field(data, "settled", (bool,), False),
        )


class ErrorMessage(JsonMessage):
    __slots__ = ("code", "message")

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message

    @classmethod
    def from_payload(cls, payload: bytes) -> ErrorMessage:
        data = _loads(payload)
        _check_only(data, {"code", "message"})
        return cls(_field(data, "code", (str,))[:64], _field(data, "message", (str,))[:4096])
