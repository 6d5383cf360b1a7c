"""One command of a local sandbox: sent to the guest agent and left running; its output
goes into a journal that any number of followers read from any sequence number, so a
foreground run, a background handle, a reattaching client and the server's audit all
see the same bytes, exactly as the guest wrote them."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal as signals
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Protocol

from agent_vm import timeutil
from agent_vm.communication.channel import RESULT_GRACE, AgentChannel
from agent_vm.errors import AgentVMError, ChannelClosedError, VMDiedError, to_wire
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.running import RunningVM
from agent_vm.protocol.messages import Result
from agent_vm.sandbox.base import CommandInfo, CommandSpec, Event, SandboxState
from agent_vm.sandbox.journal import Journal


class Owner(Protocol):
    """The sandbox a command runs in (``LocalSandbox``)."""

    id: str

    @property
    def vm(self) -> RunningVM: ...

    state: SandboxState

    def ended(self, command: LocalCommand) -> None: ...


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


class LocalCommand:
    """One command running (or ended) in a local sandbox."""

    def __init__(self, sandbox: Owner, spec: CommandSpec) -> None:
        self.id = new_id("ex")
        self.sandbox = sandbox
        self.spec = spec
        self.started_at = timeutil.now()
        self.journal = Journal()
        self._channel: AgentChannel | None = None
        self._rid: int | None = None
        self._task: asyncio.Task[None] | None = None

    def info(self) -> CommandInfo:
        cmd = self.spec.cmd if isinstance(self.spec.cmd, str | None) else list(self.spec.cmd)
        return CommandInfo(
            self.id, self.sandbox.id, cmd if self.spec.code is None else ["python3", "-c", "…"],
            self.spec.pty is not None, self.started_at, self.journal.done, self.journal.exit,
        )  # fmt: skip

    def follow(self, after: int = -1) -> AsyncIterator[Event]:
        return self.journal.follow(after)

    async def start(self) -> None:
        """Send the command; its result is awaited in the background."""
        vm = self.sandbox.vm
        spec = self.spec
        pids_max = vm.spec.profile.pids_max if vm.spec is not None else None
        cwd = spec.cwd
        if cwd is None and vm.workspace is not None:
            cwd = vm.workspace.workspace.work_dir
        wants_stdin = spec.stdin is not None or spec.stdin_open
        request = AgentExecutor().request(
            spec.cmd, spec.code, spec.timeout, dict(spec.envs), cwd, spec.user,
            wants_stdin and spec.pty is None, pids_max, spec.pty,
        )  # fmt: skip
        channel = await vm.channel()
        rid, future = await channel.start(
            request,
            on_stdout=lambda data: self.journal.output("stdout", data),
            on_stderr=lambda data: self.journal.output("stderr", data),
        )
        self._channel, self._rid = channel, rid
        began = time.monotonic()
        self._task = asyncio.create_task(self._wait(future, request.timeout, began), name=self.id)
        if spec.stdin is not None or (wants_stdin and not spec.stdin_open and spec.pty is None):
            await channel.send_input(rid, spec.stdin or b"", eof=not spec.stdin_open)

    def saved(self) -> dict[str, Any] | None:
        """What a restarted process needs to follow it on (None: nothing to follow)."""
        if self.journal.done or self._rid is None:
            return None
        cmd = self.spec.cmd if isinstance(self.spec.cmd, str | None) else list(self.spec.cmd)
        return {
            "id": self.id, "rid": self._rid, "cmd": cmd, "pty": self.spec.pty is not None,
            "started_at": self.started_at.isoformat(), "next_seq": self.journal.next_seq,
        }  # fmt: skip

    @classmethod
    def restored(cls, sandbox: Owner, data: dict[str, Any]) -> LocalCommand:
        """A command saved by ``saved``; ``follow_on`` connects it to the session."""
        cmd = data.get("cmd")
        spec = CommandSpec(
            cmd if isinstance(cmd, str) else tuple(str(c) for c in cmd or ()),
            pty=(80, 24) if data.get("pty") else None, timeout=None,
        )  # fmt: skip
        command = cls(sandbox, spec)
        command.id = str(data["id"])
        command.started_at = datetime.fromisoformat(str(data["started_at"]))
        command.journal = Journal(int(data.get("next_seq", 0)))
        command._rid = int(data["rid"])
        return command

    def follow_on(self, channel: AgentChannel) -> None:
        """Wait for its output and result on ``channel`` (the session continued)."""
        assert self._rid is not None
        future = channel.follow_request(
            self._rid,
            lambda data: self.journal.output("stdout", data),
            lambda data: self.journal.output("stderr", data),
        )
        self._channel = channel
        self._task = asyncio.create_task(self._wait(future, None, time.monotonic()), name=self.id)

    async def _wait(
        self, future: asyncio.Future[Result], timeout: float | None, began: float
    ) -> None:
        assert self._channel is not None and self._rid is not None
        channel, rid = self._channel, self._rid
        wait = timeout + RESULT_GRACE if timeout is not None else None
        try:
            raw = await channel.wait(rid, future, wait)
            result = raw.result
            workspace = self.sandbox.vm.workspace
            outputs = await asyncio.to_thread(workspace.outputs) if workspace else []
            self.journal.end(
                result.exit_code if result.exit_code is not None else 128 + (result.signal or 0),
                signal=result.signal, timed_out=result.timed_out, error=result.error,
                duration=time.monotonic() - began,
                output=tuple((o.path, o.size, o.is_dir) for o in outputs),
            )  # fmt: skip
        except asyncio.CancelledError:
            self.journal.end(
                None, error="the sandbox was closed", duration=time.monotonic() - began
            )
            raise
        except ChannelClosedError as exc:
            try:
                failure = await self.sandbox.vm.explain_failure(exc)
            except AgentVMError:  # no VM to ask (a resume of it failed)
                failure = exc
            if isinstance(failure, VMDiedError):
                self.sandbox.state = SandboxState.FAILED
            self._fail(failure, began)
        except AgentVMError as exc:
            self._fail(exc, began)
        finally:
            channel.release(rid)
            self.sandbox.ended(self)

    def _fail(self, exc: BaseException, began: float) -> None:
        error = exc if isinstance(exc, AgentVMError) else AgentVMError(str(exc))
        self.journal.end(
            None, error=error.message, duration=time.monotonic() - began, failure=to_wire(error)
        )

    def _target(self) -> tuple[AgentChannel, int] | None:
        if self.journal.done or self._channel is None or self._rid is None:
            return None
        return self._channel, self._rid

    async def send_stdin(self, data: bytes) -> None:
        if (target := self._target()) is not None:
            await target[0].send_input(target[1], data)

    async def close_stdin(self) -> None:
        if (target := self._target()) is not None and self.spec.pty is None:
            await target[0].send_input(target[1], b"", eof=True)

    async def signal(self, signum: int) -> None:
        """Delivered to the command's process group (nothing, once it ended)."""
        if (target := self._target()) is not None:
            await target[0].signal(target[1], signum)

    async def kill(self) -> None:
        """SIGKILL to its whole process tree (its cgroup in the guest)."""
        await self.signal(signals.SIGKILL)

    async def resize(self, cols: int, rows: int) -> None:
        if (target := self._target()) is not None:
            await target[0].resize(target[1], cols, rows)

    async def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
