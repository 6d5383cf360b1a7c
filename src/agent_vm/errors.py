"""One exception root for the whole package, so callers can catch everything we raise.

Every error carries a human message and, where one exists, a ``hint`` saying what to do.
Standard library only: the guest agent imports this module too.

AgentVMError
├── HostError                 the host cannot run VMs (package missing, daemon down, ...)
│   └── LibvirtUnavailableError   libvirtd cannot be reached
├── ConfigError               invalid settings or arguments
├── ImageError                building or finding a guest image failed
├── VMError                   a libvirt domain operation failed (keeps the libvirt cause)
│   └── VMDiedError           the VM's QEMU process went away while we used it
├── SnapshotError             snapshot create/list/restore/delete failed
├── NetworkError              the sandbox network or its egress policy cannot be set up
├── ProtocolError             a frame on the control channel is malformed
│   └── FrameTooLargeError    a frame announces more bytes than the protocol allows
├── ChannelError              the host side of the control channel failed
│   ├── HandshakeError        the guest agent never answered the handshake
│   └── ChannelClosedError    the channel closed while requests were in flight
└── PoolError                 the VM pool cannot serve the request
    ├── PoolExhaustedError    no VM became free within the acquire timeout
    └── PoolClosedError       the pool was shut down
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


class ConfigError(AgentVMError):
    """A setting or argument is invalid."""


class ImageError(AgentVMError):
    """A guest image could not be built, found or removed."""


class VMError(AgentVMError):
    """A libvirt domain operation failed."""


class VMDiedError(VMError):
    """The VM stopped (QEMU exited or was killed) while it was in use."""


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


class HandshakeError(ChannelError):
    """The guest agent did not complete the handshake in time."""


class ChannelClosedError(ChannelError):
    """The control channel closed (VM gone, agent restarted, or closed by us)."""


class PoolError(AgentVMError):
    """The VM pool cannot serve the request."""


class PoolExhaustedError(PoolError):
    """No VM became available within the acquire timeout."""


class PoolClosedError(PoolError):
    """The pool has been shut down."""
