"""One exception root for the whole package, so callers can catch everything we raise.

Every error carries a human message and, where one exists, a ``hint`` saying what to do.
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
    """A snapshot operation failed."""


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
