"""One exception root for the whole package, so callers can catch everything we raise.

Every error carries a human message and, where one exists, a ``hint`` saying what to do.
Errors cross the HTTP API by name (``to_wire``/``from_wire`` and one status table), so a
client gets the class the server raised, with its fields.
Errors a caller may want to branch on carry fields, not only text: the guest agent's
refusal ``code``, QMP's ``error_class``. Standard library only: the guest imports it too.

AgentVMError
├── HostError                 the host cannot run VMs (package missing, daemon down, ...)
│   └── LibvirtUnavailableError   libvirtd cannot be reached
├── ConfigError               invalid settings or arguments (also a ValueError)
├── ImageError                building or finding a guest image failed
│   └── ImageNotFoundError    a named image was never built
├── VMError                   a libvirt domain operation failed (keeps the libvirt cause)
│   ├── VMDiedError           the VM's QEMU process went away while we used it
│   └── QMPError              QEMU refused a QMP command (``error_class``)
├── SnapshotError             snapshot create/list/restore/delete failed
├── NetworkError              the sandbox network or its egress policy cannot be set up
├── ProtocolError             a frame on the control channel is malformed
│   └── FrameTooLargeError    a frame announces more bytes than the protocol allows
├── ChannelError              the host side of the control channel failed
│   ├── ChannelClosedError    the channel closed while requests were in flight
│   └── AgentRefusedError     the guest agent answered ERROR (``code``)
├── PoolError                 the VM pool cannot serve the request
│   └── PoolClosedError       the pool was shut down
├── SandboxFileError          a file operation in the sandbox failed (``code``, ``path``)
├── NotFoundError             no such sandbox or command (for this caller)
├── QuotaError                a quota is used up
├── SandboxStateError         the call is not allowed in the sandbox's state (``state``)
├── ServerError               an agent-vm server failed to do what was asked
│   └── ServerUnavailableError    the server cannot be reached (or stopped answering)
└── AgentVMTimeout            something did not happen in time (also a TimeoutError)
    ├── HandshakeError        the guest agent never answered the handshake (a ChannelError)
    ├── AgentReplyTimeout     no RESULT/STATUS from the agent in time (a ChannelError)
    ├── BootTimeout           a VM or a pool did not become ready in time (a VMError)
    └── PoolExhaustedError    no VM became free within the acquire timeout (a PoolError)
"""

from __future__ import annotations


class AgentVMError(Exception):
    """Root of every error agent-vm raises on purpose."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} (hint: {self.hint})"
        return self.message


class HostError(AgentVMError):
    """The host is not able to run VMs as configured."""


class LibvirtUnavailableError(HostError):
    """libvirtd cannot be reached at the configured URI."""


class ConfigError(AgentVMError, ValueError):
    """A setting or argument is invalid (a ValueError too, for callers that expect one)."""


class ImageError(AgentVMError):
    """A guest image could not be built, found or removed."""


class ImageNotFoundError(ImageError):
    """A named image was asked for that was never built."""


class VMError(AgentVMError):
    """A libvirt domain operation failed."""


class VMDiedError(VMError):
    """The VM stopped (QEMU exited or was killed) while it was in use."""


class QMPError(VMError):
    """QEMU answered a QMP command with an error; ``error_class`` is QEMU's class."""

    def __init__(self, message: str, *, error_class: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.error_class = error_class


class SnapshotError(AgentVMError):
    """A snapshot operation failed (a name taken, a snapshot still in use)."""


class DiskFullError(AgentVMError):
    """Not enough disk for what was asked (a pause's or a snapshot's memory)."""


class NetworkError(AgentVMError):
    """The sandbox network or an egress policy cannot be set up or applied."""


class ProtocolError(AgentVMError):
    """Bytes on the control channel do not form a valid frame or message."""


class FrameTooLargeError(ProtocolError):
    """A frame header announces a payload larger than the protocol maximum."""


class ChannelError(AgentVMError):
    """The host side of the control channel failed."""


class ChannelClosedError(ChannelError):
    """The control channel closed (VM gone, agent restarted, or closed by us)."""


class AgentRefusedError(ChannelError):
    """The guest agent refused a request; ``code`` is its machine-readable reason
    (``bad_request``, ``bad_frame``, ``stdin_overflow``, ``internal``, ...)."""

    def __init__(
        self, message: str, *, code: str, detail: str = "", hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.code = code
        self.detail = detail  # the guest's own words


class SandboxFileError(AgentVMError):
    """A file operation inside the sandbox failed; ``code`` is the guest's reason
    (``not_found``, ``permission_denied``, ``no_space``, ...), ``path`` the path."""

    def __init__(self, message: str, *, code: str, path: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code
        self.path = path


class SandboxFileNotFoundError(SandboxFileError, FileNotFoundError):
    """No such file or directory in the sandbox (also a FileNotFoundError)."""


class SandboxPermissionError(SandboxFileError, PermissionError):
    """The sandbox refused access (also a PermissionError)."""


class SandboxFileExistsError(SandboxFileError, FileExistsError):
    """The path already exists in the sandbox (also a FileExistsError)."""


class SandboxNotADirectoryError(SandboxFileError, NotADirectoryError):
    """A directory was expected in the sandbox (also a NotADirectoryError)."""


class SandboxIsADirectoryError(SandboxFileError, IsADirectoryError):
    """A file was expected in the sandbox, not a directory (also an IsADirectoryError)."""


class ExtractionError(AgentVMError):
    """Files from the sandbox were not (all) written to the host: a size or count cap
    was reached, or an entry was unsafe."""


class WorkspaceError(AgentVMError):
    """The workspace cannot be shared as asked (path, owner, file system, quota)."""


class PoolError(AgentVMError):
    """The VM pool cannot serve the request."""


class PoolClosedError(PoolError):
    """The pool has been shut down."""


class AgentVMTimeout(AgentVMError, TimeoutError):
    """Something agent-vm waited for did not happen in time."""


class HandshakeError(ChannelError, AgentVMTimeout):
    """The guest agent did not complete the handshake in time."""


class AgentReplyTimeout(ChannelError, AgentVMTimeout):
    """The guest agent did not answer a request (RESULT, STATUS) in time."""


class BootTimeout(VMError, AgentVMTimeout):
    """A VM (or a pool's first VMs) did not become ready in time."""


class PoolExhaustedError(PoolError, AgentVMTimeout):
    """No VM became available within the acquire timeout."""


class NotFoundError(AgentVMError):
    """No such sandbox or command (also when another token owns it: a 404 either way)."""


class QuotaError(AgentVMError):
    """A quota is used up (sandboxes or commands per token, snapshot disk, ...)."""


class SandboxStateError(AgentVMError):
    """The call is not allowed while the sandbox (or channel) is in ``state``: it fails at
    once instead of waiting (e.g. a command on a paused sandbox)."""

    def __init__(self, message: str, *, state: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.state = state


class ServerError(AgentVMError):
    """The agent-vm server failed to do what was asked (a 5xx without a known cause)."""


class ServerUnavailableError(ServerError):
    """The agent-vm server cannot be reached, or stopped answering and did not come back
    within the reconnect budget."""


# ---------------------------------------------------------------- errors on the wire

# Most specific first: the first class an error is an instance of gives its HTTP status.
STATUS: tuple[tuple[type[AgentVMError], int], ...] = (
    (SandboxFileNotFoundError, 404),
    (SandboxPermissionError, 403),
    (SandboxFileError, 409),
    (NotFoundError, 404),
    (QuotaError, 429),
    (SandboxStateError, 409),
    (SnapshotError, 409),
    (DiskFullError, 507),
    (ConfigError, 400),
    (ImageNotFoundError, 400),
    (ExtractionError, 400),
    (WorkspaceError, 400),
    (PoolExhaustedError, 503),
    (ServerUnavailableError, 503),
    (AgentVMTimeout, 504),
    (AgentVMError, 502),
)
_FIELDS = ("code", "path", "state", "error_class", "detail")


def status_of(exc: AgentVMError) -> int:
    """The HTTP status an error is answered with."""
    for kind, status in STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def to_wire(exc: AgentVMError) -> dict[str, object]:
    """The JSON body of an error answer: the class by name, message, hint and fields."""
    body: dict[str, object] = {"error": type(exc).__name__, "detail": exc.message}
    if exc.hint:
        body["hint"] = exc.hint
    for name in _FIELDS:
        value = getattr(exc, name, None)
        if isinstance(value, str):
            body[name] = value
    return body


def _known() -> dict[str, type[AgentVMError]]:
    found: dict[str, type[AgentVMError]] = {}
    pending: list[type[AgentVMError]] = [AgentVMError]
    while pending:
        kind = pending.pop()
        found[kind.__name__] = kind
        pending.extend(kind.__subclasses__())
    return found


def from_wire(status: int, body: object) -> AgentVMError:
    """The error a server answered with, as the class it raised (by name; by status for
    a name this side does not know). Fields missing from ``body`` become empty."""
    data = body if isinstance(body, dict) else {"detail": str(body)}
    detail = data.get("detail")
    message = detail if isinstance(detail, str) else f"the server answered {status}"
    hint = data.get("hint") if isinstance(data.get("hint"), str) else None
    kind = _known().get(str(data.get("error")))
    if kind is None:
        kind = next((k for k, s in STATUS if s == status), ServerError)
        if status >= 500 and kind is AgentVMError:
            kind = ServerError
    fields = {name: str(data.get(name) or "") for name in _FIELDS}
    try:
        if issubclass(kind, SandboxFileError):
            return kind(message, code=fields["code"], path=fields["path"], hint=hint)
        if issubclass(kind, SandboxStateError):
            return kind(message, state=fields["state"], hint=hint)
        if issubclass(kind, QMPError):
            return kind(message, error_class=fields["error_class"], hint=hint)
        if issubclass(kind, AgentRefusedError):
            return kind(message, code=fields["code"], detail=fields["detail"], hint=hint)
        return kind(message, hint=hint)
    except TypeError:  # a subclass with a constructor of its own: keep the text
        return ServerError(message, hint=hint)
