"""The HTTP API's bodies, both ways (pydantic: requests are checked, and the OpenAPI
document describes every answer). Answers are made by ``sandbox/wire.py``, which the
HTTP backend reads back: a unit test checks that these models accept what it makes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent_vm.core.template import ResourceProfile
from agent_vm.network.policy import EgressPolicy
from agent_vm.protocol.messages import MAX_USER
from agent_vm.secrets import Secret

MAX_LIFETIME = 7 * 86400.0
SIGNALS = Literal["HUP", "INT", "QUIT", "KILL", "USR1", "USR2", "TERM", "CONT", "STOP"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- requests


class WorkspaceRequest(_Body):
    path: str = Field(description="a directory below the server's --workspace-root")
    readonly: bool = False


class ProxiedSecret(_Body):
    """A secret the server's egress proxy injects (kept in its memory only)."""

    value: str = Field(min_length=4, max_length=8192)
    hosts: list[str] = Field(min_length=1, max_length=32)
    header: str | None = None
    placeholder: str = Field(max_length=128)

    def secret(self) -> Secret:
        return Secret(self.value, tuple(self.hosts), self.header, self.placeholder)


class CreateSandbox(_Body):
    image: str | None = None
    profile: Literal["light", "standard", "intensive"] | ResourceProfile = Field(
        default="light", description="a preset's name, or the resources themselves"
    )
    network: str = Field(
        default="nat", pattern=r"^(nat|nat_filtered|isolated|bridge:[A-Za-z0-9_.-]+)$"
    )
    labels: dict[str, Annotated[str, Field(max_length=256)]] = Field(default={}, max_length=32)
    lifetime_seconds: float = Field(default=3600.0, gt=0, le=MAX_LIFETIME)
    policy: EgressPolicy | None = None
    workspace: WorkspaceRequest | None = None
    cold: bool = Field(default=False, description="boot the kernel instead of a golden state")
    anomaly_action: Literal["log", "pause", "kill"] | None = Field(
        default=None, description="what an anomaly rule's alert does here (default: server's)"
    )
    snapshot: str | None = Field(
        default=None, max_length=64, description="start from this snapshot (one of yours)"
    )
    on_expiry: Literal["kill", "pause"] = Field(
        default="kill", description="when its lifetime runs out: remove it, or pause it to disk"
    )
    auto_resume: bool = Field(
        default=False, description="a command or file call on it while paused resumes it"
    )
    proxied_secrets: dict[str, ProxiedSecret] = Field(
        default={}, max_length=32,
        description="secrets the egress proxy puts into requests to their hosts; the "
        "guest holds only the placeholders",
    )


class TakeSnapshot(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Fork(_Body):
    count: int = Field(default=1, ge=1, le=64)


class KeepAlive(_Body):
    lifetime_seconds: float = Field(gt=0, le=MAX_LIFETIME)


class TerminalSize(_Body):
    cols: int = Field(ge=1, le=1000)
    rows: int = Field(ge=1, le=1000)


class RunCommand(_Body):
    cmd: str | list[str] | None = Field(
        default=None, description="a string runs through bash; a list is exec'd"
    )
    code: str | None = Field(default=None, description="Python source, run with python3")
    env: dict[str, str] = {}
    cwd: str | None = None
    user: str | None = Field(
        default=None, max_length=MAX_USER, description="any user of the guest, name or uid"
    )
    timeout: float | None = Field(default=60.0, gt=0, le=7 * 86400)
    stdin: str | None = Field(default=None, description="bytes for stdin, base64")
    stdin_open: bool = Field(
        default=False, description="keep stdin open (POST .../stdin, then ?close=true)"
    )
    pty: TerminalSize | None = Field(default=None, description="run it in a terminal")

    @model_validator(mode="after")
    def _one_of(self) -> RunCommand:
        if (self.cmd is None) == (self.code is None):
            raise ValueError("give cmd or code (one of them)")
        return self


class SendSignal(_Body):
    signal: SIGNALS = Field(description="delivered to the command's process group in the guest")


# ---------------------------------------------------------------- answers


class SandboxView(BaseModel):
    id: str
    state: Literal["starting", "running", "paused", "closing", "closed", "failed"]
    image: str | None
    profile: str
    network: str
    created_at: str
    labels: dict[str, str]
    expires_at: str | None
    paused_because: str | None
    pooled: bool


class ExitView(BaseModel):
    seq: int
    type: Literal["exit"] = "exit"
    exit_code: int | None
    signal: int | None
    timed_out: bool
    error: str | None
    duration: float
    output: list[tuple[str, int, bool]] = Field(description="a layout workspace's output/")
    failure: dict[str, Any] | None = Field(description="agent-vm's own error, if it failed")


class OutputView(BaseModel):
    seq: int
    type: Literal["stdout", "stderr"]
    data: str = Field(description="the bytes, base64")


class ExecutionView(BaseModel):
    id: str
    sandbox: str
    cmd: str | list[str] | None
    pty: bool
    started_at: str
    done: bool
    exit: ExitView | None
    events: str = Field(description="server-sent events: OutputView..., then one ExitView")


class ExecutionOutcome(BaseModel):
    """``?wait=true``: the whole result at once."""

    id: str
    stdout: str = Field(description="UTF-8, invalid bytes replaced (stdout_b64: exact)")
    stderr: str
    stdout_b64: str
    stderr_b64: str
    exit: ExitView


class BlockedView(BaseModel):
    at: str
    kind: str
    destination: str
    port: int | None
    reason: str


class FileEntryView(BaseModel):
    path: str
    name: str
    type: str
    size: int
    mode: int
    modified: str
    uid: int
    gid: int
    symlink_target: str | None


class SnapshotView(BaseModel):
    name: str
    created_at: str
    image: str
    profile: str
    network: str
    source: str
    memory_bytes: int
    disk_bytes: int
    pause_seconds: float


class PoolView(BaseModel):
    image: str | None
    profile: str
    network: str
    min_size: int
    max_size: int
    idle: int
    in_use: int
    starting: int
    standby: int
    started: int
    replaced_dead: int


class FiguresView(BaseModel):
    uptime: float
    running: int
    load1: float
    mem_available_kib: int


class Written(BaseModel):
    path: str
    bytes: int


class Made(BaseModel):
    path: str
    made: bool


class Exists(BaseModel):
    path: str
    exists: bool


class Renamed(BaseModel):
    old: str
    new: str


class Signalled(BaseModel):
    id: str
    done: bool
    signal: str | None = None


class ErrorView(BaseModel):
    """Every refusal: the error's class (the SDK raises the same), what happened, what
    to do, and the fields a caller can branch on."""

    error: str
    detail: str
    hint: str | None = None
    code: str | None = None
    path: str | None = None
    state: str | None = None
