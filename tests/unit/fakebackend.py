"""A backend without VMs, for the service, the routes and the HTTP backend in one
process: sandboxes whose commands are a few scripted behaviours and whose files live in
a dict. It implements the same interfaces as the local backend (``sandbox/base.py``),
with the same state guards (``_require``), so everything above it runs as it would.

Commands (``cmd`` as a string):
    ``echo TEXT``     TEXT and a newline on stdout, exit 0
    ``bytes HEX``     those bytes on stdout (exactly), exit 0
    ``fail N``        ``failed`` on stderr, exit N
    ``cat``           stdin back on stdout until it is closed (a terminal: until ``\\x04``)
    ``wait``          runs until signalled (exit 128 + N) or killed
"""

from __future__ import annotations

import asyncio
import builtins
import signal
from collections.abc import AsyncGenerator, AsyncIterator

from agent_vm import timeutil
from agent_vm.communication.fileapi import FileEntry, Files, WatchEvent, WriteData, chunks_of
from agent_vm.errors import (
    NotFoundError,
    SandboxFileNotFoundError,
    SandboxIsADirectoryError,
)
from agent_vm.network.policy import Blocked, EgressPolicy
from agent_vm.sandbox.base import (
    CommandInfo,
    CommandSpec,
    Event,
    ExposedPort,
    GuestFigures,
    PoolInfo,
    Progress,
    SandboxHandle,
    SandboxInfo,
    SandboxSpec,
    SandboxState,
    SnapshotInfo,
)
from agent_vm.sandbox.journal import Journal


class FakeCommand:
    def __init__(self, sandbox_id: str, spec: CommandSpec, number: int) -> None:
        self.id = f"ex-{number}"
        self.sandbox_id = sandbox_id
        self.spec = spec
        self.journal = Journal()
        self.started = timeutil.now()
        self.stdin: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.signals: list[int] = []
        self._task = asyncio.ensure_future(self._run())

    def info(self) -> CommandInfo:
        cmd = self.spec.cmd if isinstance(self.spec.cmd, str | None) else list(self.spec.cmd)
        return CommandInfo(self.id, self.sandbox_id, cmd, self.spec.pty is not None,
                           self.started, self.journal.done, self.journal.exit)  # fmt: skip

    async def _run(self) -> None:
        cmd = self.spec.cmd if isinstance(self.spec.cmd, str) else " ".join(self.spec.cmd or ())
        verb, _, rest = cmd.partition(" ")
        if self.spec.stdin is not None:
            await self.stdin.put(self.spec.stdin)
            if not self.spec.stdin_open:
                await self.stdin.put(None)
        if verb == "echo":
            self.journal.output("stdout", rest.encode() + b"\n")
            self.journal.end(0)
        elif verb == "bytes":
            self.journal.output("stdout", bytes.fromhex(rest))
            self.journal.end(0)
        elif verb == "fail":
            self.journal.output("stderr", b"failed\n")
            self.journal.end(int(rest))
        elif verb == "cat":
            while (data := await self.stdin.get()) is not None:
                if self.spec.pty is not None and data == b"\x04":
                    break
                self.journal.output("stdout", data)
            self.journal.end(0)
        elif verb == "wait":
            await asyncio.Event().wait()  # until cancelled by a signal
        else:
            self.journal.end(127, error=f"{verb}: not found")

    def follow(self, after: int = -1) -> AsyncIterator[Event]:
        return self.journal.follow(after)

    async def send_stdin(self, data: bytes) -> None:
        await self.stdin.put(data)

    async def close_stdin(self) -> None:
        await self.stdin.put(None)

    async def signal(self, signum: int) -> None:
        self.signals.append(signum)
        if not self.journal.done:
            self._task.cancel()
            self.journal.end(128 + signum, signal=signum)

    async def kill(self) -> None:
        await self.signal(signal.SIGKILL)

    async def resize(self, cols: int, rows: int) -> None:
        self.signals.append(-cols)


class FakeFiles(Files):
    """A flat dict of path -> bytes; a directory is any prefix of a stored path."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def _is_dir(self, path: str) -> bool:
        prefix = path.rstrip("/") + "/"
        return path == "/" or any(p.startswith(prefix) for p in self.data)

    def _entry(self, path: str) -> FileEntry:
        if path in self.data:
            kind, size = "file", len(self.data[path])
        elif self._is_dir(path):
            kind, size = "dir", 0
        else:
            raise SandboxFileNotFoundError(f"{path}: no such file", code="not_found", path=path)
        return FileEntry(path, path.rsplit("/", 1)[-1], kind, size, 0o644,
                         timeutil.from_timestamp(0), 0, 0)  # fmt: skip

    async def stat(self, path: str) -> FileEntry:
        return self._entry(path)

    async def exists(self, path: str) -> bool:
        return path in self.data or self._is_dir(path)

    async def make_dir(self, path: str, mode: int = 0o755) -> bool:
        return not self._is_dir(path)

    async def remove(self, path: str) -> None:
        self._entry(path)
        for key in [k for k in self.data if k == path or k.startswith(path.rstrip("/") + "/")]:
            del self.data[key]

    async def rename(self, old: str, new: str) -> None:
        self.data[new] = self.data.pop(old)

    async def list(self, path: str, depth: int = 1) -> builtins.list[FileEntry]:
        prefix = path.rstrip("/") + "/"
        return [self._entry(k) for k in sorted(self.data) if k.startswith(prefix)]

    async def read_stream(self, path: str) -> AsyncGenerator[bytes, None]:
        if self._is_dir(path) and path not in self.data:
            raise SandboxIsADirectoryError(
                f"{path}: is a directory", code="is_a_directory", path=path
            )
        self._entry(path)
        data = self.data[path]
        for start in range(0, max(len(data), 1), 1 << 16):
            yield data[start : start + (1 << 16)]

    async def write(self, path: str, data: WriteData, mode: int | None = None) -> int:
        self.data[path] = b"".join([chunk async for chunk in chunks_of(data)])
        return len(self.data[path])

    async def untar(self, remote: str, data: WriteData) -> int:
        raise NotImplementedError

    async def tar_stream(self, remote: str) -> AsyncGenerator[bytes, None]:
        raise NotImplementedError
        yield b""

    async def watch(self, path: str, recursive: bool = False) -> AsyncIterator[WatchEvent]:
        yield WatchEvent("create", f"{path}/x", False)


class FakeSandbox(SandboxHandle):
    def __init__(self, number: int, spec: SandboxSpec, backend: FakeBackend | None = None) -> None:
        self.id = f"sb-{number}"
        self.keep: dict[str, object] = {}
        self.backend = backend
        self.spec = spec
        self.state = SandboxState.RUNNING
        self.created = timeutil.now()
        self._files = FakeFiles()
        self.commands_run: dict[str, FakeCommand] = {}
        self.policy_now = spec.policy or EgressPolicy()

    def info(self) -> SandboxInfo:
        profile = self.spec.profile if isinstance(self.spec.profile, str) else "custom"
        return SandboxInfo(self.id, self.state, self.spec.image, profile, self.spec.network,
                           self.created, dict(self.spec.labels), None)  # fmt: skip

    async def run(self, spec: CommandSpec) -> FakeCommand:
        self._require("run")
        command = FakeCommand(self.id, spec, len(self.commands_run) + 1)
        command.id = f"{self.id}-{command.id}"
        self.commands_run[command.id] = command
        return command

    async def command(self, command_id: str) -> FakeCommand:
        self._require("command")
        if command_id not in self.commands_run:
            raise NotFoundError(f"no command {command_id!r}")
        return self.commands_run[command_id]

    async def commands(self) -> builtins.list[CommandInfo]:
        self._require("commands")
        return [c.info() for c in self.commands_run.values()]

    @property
    def files(self) -> FakeFiles:
        self._require("files")
        return self._files

    async def policy(self) -> EgressPolicy | None:
        self._require("policy")
        return self.policy_now

    async def set_policy(self, policy: EgressPolicy) -> None:
        self._require("set_policy")
        self.policy_now = policy

    async def blocked(self) -> builtins.list[Blocked]:
        self._require("blocked")
        return [Blocked(timeutil.now(), "tcp", "198.51.100.9", 25, "port 25 not allowed")]

    async def blocked_count(self) -> int:
        self._require("blocked_count")
        return 1

    async def stats(self) -> GuestFigures:
        self._require("stats")
        return GuestFigures(1.0, len(self.commands_run), 0.5, 100_000)

    async def expose(
        self, port: int, *, token: str | None = None, host: str = "127.0.0.1"
    ) -> ExposedPort:
        self._require("expose")
        return ExposedPort(port, f"{host}:1{port}", f"http://{host}:1{port}/", token)

    async def pause(self, reason: str = "requested", to_disk: bool = True) -> None:
        self._require("pause")
        self.state = SandboxState.PAUSED

    async def resume(self) -> None:
        self._require("resume")
        self.state = SandboxState.RUNNING

    async def snapshot(self, name: str) -> SnapshotInfo:
        self._require("snapshot")
        if self.backend is None:
            raise NotFoundError("no backend")
        info = SnapshotInfo(name, timeutil.now(), self.spec.image or "base", "light", "nat",
                            self.id, 1 << 20, 2 << 20, 0.1)  # fmt: skip
        self.backend.snapshots_made[name] = (info, str(self.keep.get("owner")))
        return info

    async def fork(self, count: int = 1) -> builtins.list[SandboxHandle]:
        self._require("fork")
        assert self.backend is not None
        return [await self.backend.acquire(self.spec) for _ in range(count)]

    async def close(self) -> None:
        for command in self.commands_run.values():
            if not command.journal.done:
                await command.kill()
        self.state = SandboxState.CLOSED


class FakeBackend:
    def __init__(self) -> None:
        self.held: dict[str, FakeSandbox] = {}
        self.made = 0
        self.snapshots_made: dict[str, tuple[SnapshotInfo, str]] = {}

    def check(self, spec: SandboxSpec) -> None:
        return None

    async def acquire(self, spec: SandboxSpec, progress: Progress | None = None) -> FakeSandbox:
        self.made += 1
        handle = FakeSandbox(self.made, spec, self)
        self.held[handle.id] = handle
        return handle

    async def get(self, sandbox_id: str) -> FakeSandbox:
        if sandbox_id not in self.held:
            raise NotFoundError(f"no sandbox {sandbox_id!r}")
        return self.held[sandbox_id]

    async def list(self) -> builtins.list[SandboxHandle]:
        return list(self.held.values())

    async def release(self, handle: SandboxHandle) -> None:
        await handle.close()
        self.held.pop(handle.id, None)

    async def pools(self) -> builtins.list[PoolInfo]:
        return [PoolInfo(None, "light", "nat", 1, 2, 1, 0, 0)]

    async def snapshots(self) -> builtins.list[SnapshotInfo]:
        return [info for info, _ in self.snapshots_made.values()]

    def snapshot_owners(self) -> dict[str, str]:
        return {name: owner for name, (_, owner) in self.snapshots_made.items()}

    async def remove_snapshot(self, name: str) -> None:
        self.snapshots_made.pop(name, None)

    async def close(self) -> None:
        for handle in list(self.held.values()):
            await self.release(handle)
