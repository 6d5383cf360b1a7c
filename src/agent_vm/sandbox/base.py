"""What one sandbox is, wherever its VM runs: the two interfaces every front door stands on.

``SandboxHandle`` is one sandbox (commands, terminals, files, policy and blocked
attempts, figures, lifecycle, close); ``Backend`` is where sandboxes come from (acquire,
get, list, release, pools). The local backend (``local.py``) implements them over the
runtime; the HTTP backend (``http.py``) over an ``agent-vm serve``; the server's service
holds handles from a backend, so a backend for other hosts plugs in below it and nothing
above changes. The facade (``_async.py``) never asks which one it has.

Lifecycle: one ``SandboxState`` per handle, and one table (``ALLOWED``) of which call is
legal in which state; a call in a state that forbids it raises ``SandboxStateError`` at
once (a command on a paused sandbox never waits for a timeout).

Nothing here imports the VM machinery (libvirt, the runtime): a client-only install
uses this module.
"""

from __future__ import annotations

import builtins
import enum
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from agent_vm.errors import SandboxStateError
from agent_vm.secrets import Secret

if TYPE_CHECKING:
    from agent_vm.communication.fileapi import Files
    from agent_vm.communication.workspace import Workspace
    from agent_vm.core.template import ResourceProfile
    from agent_vm.network.policy import Blocked, EgressPolicy

Progress = Callable[[str], None]


class SandboxState(enum.Enum):
    STARTING = "starting"  # the VM is being acquired or booted
    RUNNING = "running"
    PAUSED = "paused"  # nothing runs in it; resume() continues it
    CLOSING = "closing"  # being released; gone for its users
    CLOSED = "closed"
    FAILED = "failed"  # its VM died or could not start: only close() is left


_LIVE = frozenset({SandboxState.RUNNING, SandboxState.PAUSED})
_ENDED = frozenset({SandboxState.CLOSING, SandboxState.CLOSED})
# call -> states it is legal in. Anything not RUNNING-only says so here, in one place.
ALLOWED: dict[str, frozenset[SandboxState]] = {
    "run": frozenset({SandboxState.RUNNING}),
    "files": frozenset({SandboxState.RUNNING}),
    "set_policy": frozenset({SandboxState.RUNNING}),
    "command": _LIVE,  # reattach (a paused command's output so far)
    "commands": _LIVE,
    "policy": _LIVE,
    "blocked": _LIVE,
    "blocked_count": _LIVE,
    "stats": frozenset({SandboxState.RUNNING}),
    "expose": frozenset({SandboxState.RUNNING}),
    "pause": _LIVE,  # idempotent
    "resume": _LIVE,  # idempotent
    "snapshot": frozenset({SandboxState.RUNNING}),
    "fork": frozenset({SandboxState.RUNNING}),
    "close": frozenset(SandboxState),  # idempotent
}
_HINTS = {
    SandboxState.STARTING: "wait for create() to return",
    SandboxState.PAUSED: "resume() it first",
    SandboxState.CLOSING: "it is being removed: create a new one",
    SandboxState.CLOSED: "it was removed: create a new one",
    SandboxState.FAILED: "its VM is gone: kill() it and create a new one",
}


def check(sandbox_id: str, state: SandboxState, call: str) -> None:
    """Raise ``SandboxStateError`` when ``call`` is not legal in ``state``."""
    if state not in ALLOWED[call]:
        raise SandboxStateError(
            f"sandbox {sandbox_id} is {state.value}: {call} needs it "
            + " or ".join(sorted(s.value for s in ALLOWED[call])),
            state=state.value,
            hint=_HINTS.get(state),
        )


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class SandboxSpec:
    """What a sandbox is asked for (checked by its backend before any VM starts)."""

    image: str | None = None
    profile: str | ResourceProfile = "light"
    network: str = "nat"  # nat, isolated or bridge:NAME
    policy: EgressPolicy | None = None
    workspace: Workspace | None = None
    cold: bool = False  # boot the kernel instead of a golden state's clone
    labels: Mapping[str, str] = field(default_factory=dict)
    lifetime: float = 3600.0  # a server reclaims it after this long without keepalive
    anomaly_action: str | None = None  # log, pause or kill (None: the server's)
    acquire_timeout: float = 60.0  # waiting for a pool's VM
    snapshot: str | None = None  # start from this snapshot (its image, hardware, policy)
    on_expiry: str = "kill"  # a server's lifetime ran out: kill, or pause (to disk)
    auto_resume: bool = False  # a command or file call on a paused sandbox resumes it
    # injected by the host's egress proxy (memory only: never saved with a pause)
    proxied: Mapping[str, Secret] = field(default_factory=dict)


@dataclass(frozen=True)
class ExposedPort:
    """A sandbox port on the host: ``host`` (``address:port``) and ``url``; with a
    ``token`` (a server's), every connection's first request must carry it (header
    ``X-Agent-VM-Port-Token``, or ``?agentvm_token=`` for a browser)."""

    port: int
    host: str
    url: str
    token: str | None = None


@dataclass(frozen=True)
class CommandSpec:
    """One command: ``cmd`` (a string runs through bash, a sequence is exec'd) or
    ``code`` (Python source). ``stdin`` is sent first; with ``stdin_open`` stdin stays
    open for ``send_stdin`` until ``close_stdin``. ``pty`` (cols, rows) runs it in a
    terminal (its output all on stdout; keys through ``send_stdin``)."""

    cmd: str | tuple[str, ...] | None = None
    code: str | None = None
    envs: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    user: str | None = None
    timeout: float | None = 60.0
    stdin: bytes | None = None
    stdin_open: bool = False
    pty: tuple[int, int] | None = None


# ---------------------------------------------------------------- what commands emit


@dataclass(frozen=True)
class Output:
    """A chunk of a command's output, exactly as the guest wrote it."""

    seq: int
    stream: str  # stdout or stderr (a terminal's all on stdout)
    data: bytes


@dataclass(frozen=True)
class Exit:
    """How a command ended: the last event of its stream. ``failure`` is set when
    agent-vm (not the command) failed: the error on the wire (``errors.to_wire``)."""

    seq: int
    exit_code: int | None
    signal: int | None = None
    timed_out: bool = False
    error: str | None = None
    duration: float = 0.0
    output: tuple[tuple[str, int, bool], ...] = ()  # a layout workspace's output/ entries
    failure: Mapping[str, Any] | None = None


Event = Output | Exit


@dataclass(frozen=True)
class CommandInfo:
    """A command a sandbox runs (or ran, while it is kept for reattaching)."""

    id: str
    sandbox_id: str
    cmd: str | list[str] | None
    pty: bool
    started_at: datetime
    done: bool
    exit: Exit | None = None


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox as its backend describes it."""

    id: str
    state: SandboxState
    image: str | None
    profile: str
    network: str
    created_at: datetime
    labels: Mapping[str, str] = field(default_factory=dict)
    domain: str | None = None  # the libvirt domain, where the backend has one
    expires_at: datetime | None = None
    paused_because: str | None = None
    pooled: bool = False  # its VM came from a warm pool


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot: a running sandbox captured, to start new ones from."""

    name: str
    created_at: datetime
    image: str
    profile: str
    network: str
    source: str  # the sandbox it was taken from
    memory_bytes: int  # the saved memory on disk (what the guest had touched)
    disk_bytes: int  # all it holds on disk
    pause_seconds: float  # how long the source stood still


@dataclass(frozen=True)
class PoolInfo:
    image: str | None
    profile: str
    network: str
    min_size: int
    max_size: int
    idle: int
    in_use: int
    starting: int
    standby: int = 0
    started: int = 0
    replaced_dead: int = 0


@dataclass(frozen=True)
class GuestFigures:
    """What the guest agent reports about itself (``stats``)."""

    uptime: float
    running: int
    load1: float
    mem_available_kib: int


# ---------------------------------------------------------------- the interfaces


class CommandSource(Protocol):
    """One command of one sandbox, as its backend serves it: events from any sequence
    number (so a client can come back), and the calls that drive it."""

    @property
    def id(self) -> str: ...

    def info(self) -> CommandInfo: ...

    def follow(self, after: int = -1) -> AsyncIterator[Event]:
        """Events with ``seq > after``, live until ``Exit``."""
        ...

    async def send_stdin(self, data: bytes) -> None: ...

    async def close_stdin(self) -> None: ...

    async def signal(self, signum: int) -> None: ...

    async def kill(self) -> None: ...

    async def resize(self, cols: int, rows: int) -> None: ...


class SandboxHandle(ABC):
    """One sandbox. Subclasses keep ``state`` true and call ``check`` first in each call
    (``_require``); the facade, the server's service and every door use only this."""

    id: str
    state: SandboxState
    # a front door's notes about the sandbox (a server's: its owner), kept with a pause
    keep: dict[str, Any]
    on_disk: bool = False  # paused to disk (it outlives the process that holds it)

    def _require(self, call: str) -> None:
        check(self.id, self.state, call)

    @abstractmethod
    def info(self) -> SandboxInfo:
        """The sandbox as last known (no round trip)."""

    @abstractmethod
    async def run(self, spec: CommandSpec) -> CommandSource:
        """Start a command and return at once."""

    @abstractmethod
    async def command(self, command_id: str) -> CommandSource:
        """A command started earlier (``NotFoundError`` if unknown or forgotten)."""

    @abstractmethod
    async def commands(self) -> list[CommandInfo]:
        """Commands running, and ended ones still kept."""

    @property
    @abstractmethod
    def files(self) -> Files:
        """The sandbox's file system (``communication/fileapi.py``)."""

    @abstractmethod
    async def policy(self) -> EgressPolicy | None:
        """The egress policy in force (None: the sandbox has no filtered network)."""

    @abstractmethod
    async def set_policy(self, policy: EgressPolicy) -> None: ...

    @abstractmethod
    async def blocked(self) -> list[Blocked]:
        """Recent blocked attempts (the last thousand)."""

    @abstractmethod
    async def blocked_count(self) -> int:
        """Every blocked attempt so far."""

    @abstractmethod
    async def stats(self) -> GuestFigures: ...

    @abstractmethod
    async def expose(
        self, port: int, *, token: str | None = None, host: str = "127.0.0.1"
    ) -> ExposedPort:
        """A host address that reaches TCP ``port`` inside the sandbox while it runs
        (``token``, ``host``: where a server lets it listen, and what it asks for)."""

    @abstractmethod
    async def pause(self, reason: str = "requested", to_disk: bool = True) -> None:
        """To disk (its VM freed), or with ``to_disk=False`` frozen where it is (at
        once, no help from the guest needed: what an anomaly action does)."""

    @abstractmethod
    async def resume(self) -> None: ...

    @abstractmethod
    async def snapshot(self, name: str) -> SnapshotInfo:
        """Capture the running sandbox as snapshot ``name``; it runs on."""

    @abstractmethod
    async def fork(self, count: int = 1) -> builtins.list[SandboxHandle]:
        """``count`` new running sandboxes continuing from this moment (held by the
        same backend); this one runs on."""

    @abstractmethod
    async def close(self) -> None:
        """Release the sandbox (a pool takes it back; else it is destroyed). Idempotent."""


class Backend(Protocol):
    """Where sandboxes come from."""

    def check(self, spec: SandboxSpec) -> None:
        """Refuse (``ConfigError``) what this backend cannot give, before anything starts."""
        ...

    async def acquire(self, spec: SandboxSpec, progress: Progress | None = None) -> SandboxHandle:
        """A running sandbox as ``spec`` asks."""
        ...

    async def get(self, sandbox_id: str) -> SandboxHandle:
        """A sandbox this backend holds (``NotFoundError`` otherwise)."""
        ...

    async def list(self) -> builtins.list[SandboxHandle]: ...

    async def release(self, handle: SandboxHandle) -> None: ...

    async def pools(self) -> builtins.list[PoolInfo]: ...

    async def snapshots(self) -> builtins.list[SnapshotInfo]: ...

    async def remove_snapshot(self, name: str) -> None:
        """Refused (``SnapshotError``) while sandboxes run from it."""
        ...

    async def close(self) -> None:
        """Release every sandbox it handed out, and what it holds itself."""
        ...
