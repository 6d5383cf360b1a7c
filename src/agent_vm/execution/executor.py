"""Run a command, or a piece of Python, in a running VM."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence

from agent_vm.communication.channel import RESULT_GRACE, AgentChannel
from agent_vm.communication.waiters import OutputCallback
from agent_vm.communication.workspace import Workspace, workspace_for
from agent_vm.errors import ChannelClosedError, ConfigError, ProtocolError
from agent_vm.execution.result import ExecutionResult
from agent_vm.execution.running import RunningVM
from agent_vm.protocol.messages import Execute

DEFAULT_TIMEOUT = 600.0


class AgentExecutor:
    """Executes commands through a VM's agent channel.

    >>> result = await AgentExecutor().execute(vm, "echo hi", timeout=10)
    >>> result.stdout
    'hi\\n'
    """

    def __init__(self, *, default_timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.default_timeout = default_timeout

    async def execute(
        self,
        vm: RunningVM,
        command: str | Sequence[str] | None = None,
        *,
        code: str | None = None,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        user: str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        workspace: Workspace | str | os.PathLike[str] | None = None,
        on_started: Callable[[AgentChannel, int], None] | None = None,
    ) -> ExecutionResult:
        """Run ``command`` (a string goes through bash, a sequence is exec'd as argv) or
        ``code`` (Python source, run with the guest's python3).

        The guest enforces ``timeout`` and kills the whole process tree; the result then
        has ``timed_out=True``. A VM that dies meanwhile raises ``VMDiedError``.
        ``workspace`` shares a host directory for this run only (attached before it,
        detached after; a directory with ``input/``, ``output/`` and ``work/`` gets the
        layout, and ``result.output``), unless the VM has it attached already.
        ``on_started(channel, request_id)`` is called once the command is on its way, for
        callers that signal it while it runs (``channel.signal(request_id, SIGTERM)``).
        """
        if workspace is None:
            return await self._execute(
                vm, command, code, timeout, env, cwd, stdin, user, on_stdout, on_stderr, on_started
            )
        share = workspace if isinstance(workspace, Workspace) else workspace_for(workspace)
        if vm.workspace is not None:
            if vm.workspace.workspace != share:
                raise ConfigError(
                    f"{vm.name} already has {vm.workspace.source} attached",
                    hint="detach_workspace() first, or run without workspace=",
                )
            return await self._execute(
                vm, command, code, timeout, env, cwd, stdin, user, on_stdout, on_stderr, on_started
            )
        await vm.attach_workspace(share)
        try:
            return await self._execute(
                vm, command, code, timeout, env, cwd, stdin, user, on_stdout, on_stderr, on_started
            )
        finally:
            await vm.detach_workspace()

    async def _execute(
        self,
        vm: RunningVM,
        command: str | Sequence[str] | None,
        code: str | None,
        timeout: float | None,
        env: dict[str, str] | None,
        cwd: str | None,
        stdin: bytes | str | None,
        user: str | None,
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
        on_started: Callable[[AgentChannel, int], None] | None = None,
    ) -> ExecutionResult:
        pids_max = vm.spec.profile.pids_max if vm.spec is not None else None
        workspace = vm.workspace
        if cwd is None and workspace is not None:
            cwd = workspace.workspace.work_dir
        request = self.request(command, code, timeout, env, cwd, user, stdin is not None, pids_max)
        data = stdin.encode() if isinstance(stdin, str) else stdin
        effective = request.timeout
        wait = effective + RESULT_GRACE if effective is not None else None
        channel = await vm.channel()
        started = time.monotonic()
        try:
            raw = await channel.execute(
                request, stdin=data, on_stdout=on_stdout, on_stderr=on_stderr, wait_timeout=wait,
                on_started=(lambda rid: on_started(channel, rid)) if on_started else None,
            )  # fmt: skip
        except ChannelClosedError as exc:
            raise await vm.explain_failure(exc) from exc
        result = raw.result
        exit_code = result.exit_code
        if exit_code is None:
            exit_code = 128 + (result.signal or 0)
        return ExecutionResult(
            exit_code=exit_code,
            stdout_bytes=raw.stdout,
            stderr_bytes=raw.stderr,
            duration=time.monotonic() - started,
            timed_out=result.timed_out,
            signal=result.signal,
            error=result.error,
            truncated=raw.truncated,
            output=tuple(await asyncio.to_thread(workspace.outputs)) if workspace else (),
        )

    def request(
        self,
        command: str | Sequence[str] | None,
        code: str | None,
        timeout: float | None,
        env: dict[str, str] | None,
        cwd: str | None,
        user: str | None,
        stdin: bool,
        pids_max: int | None = None,
        pty: tuple[int, int] | None = None,
    ) -> Execute:
        """The EXECUTE request for ``command`` or ``code``, checked as the guest will
        check it (``ConfigError`` naming what is wrong)."""
        if (command is None) == (code is None):
            raise ConfigError("give either a command or code, not both or neither")
        effective = timeout if timeout is not None else self.default_timeout
        try:
            if code is not None:
                argv: list[str] | None = ["python3", "-c", code]
                shell = None
            elif isinstance(command, str):
                argv, shell = None, command
            else:
                argv, shell = list(command or []), None
            return Execute(
                argv=argv,
                shell=shell,
                env=dict(env or {}),
                cwd=cwd,
                user=user,
                timeout=effective,
                stdin=stdin,
                pids_max=pids_max,
                pty=list(pty) if pty is not None else None,
            )
        except ProtocolError as exc:
            raise ConfigError(f"invalid execution request: {exc.message}") from exc
