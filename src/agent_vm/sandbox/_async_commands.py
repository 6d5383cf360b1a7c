"""Commands and terminals of a sandbox (``sandbox.commands``, ``sandbox.pty``) and the
handle of a running command: E2B's names, over the backend's ``CommandSource``.

Part of the one implementation; ``_sync_commands.py`` is generated from it by
``scripts/generate_sync.py`` (a unit test fails when it is out of date).
"""

from __future__ import annotations

import asyncio
import codecs
import signal as signals
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, overload

from agent_vm.communication.workspace import OutputFile
from agent_vm.errors import AgentReplyTimeout, ConfigError, from_wire
from agent_vm.execution.result import ExecutionResult
from agent_vm.logs import get_logger
from agent_vm.sandbox.base import (
    CommandInfo,
    CommandSource,
    CommandSpec,
    Exit,
    Output,
    SandboxHandle,
)

log = get_logger(__name__)
CommandResult = ExecutionResult
TextCallback = Callable[[str], None]
BytesCallback = Callable[[bytes], None]
Live = Callable[[], SandboxHandle]  # the sandbox's handle (SandboxStateError if none)
MAX_OUTPUT = 64 * 2**20  # kept per command by a handle (callbacks see everything)


def _text(callback: TextCallback | None) -> BytesCallback | None:
    """A str callback as a bytes one that never splits a UTF-8 character."""
    if callback is None:
        return None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(data: bytes) -> None:
        if text := decoder.decode(data):
            callback(text)

    return feed


def _signal(sig: int | str) -> int:
    if isinstance(sig, int):
        return sig
    try:
        return int(signals.Signals[f"SIG{sig.upper().removeprefix('SIG')}"])
    except KeyError:
        raise ConfigError(f"no signal {sig!r}", hint="TERM, INT, HUP, KILL, USR1, ...") from None


class AsyncCommandHandle:
    """A running command (``commands.run(..., background=True)``, ``commands.connect``,
    ``pty.create``): its output as it comes, and the calls that drive it."""

    def __init__(
        self,
        source: CommandSource,
        *,
        on_stdout: BytesCallback | None = None,
        on_stderr: BytesCallback | None = None,
        after: int = -1,
    ) -> None:
        self._source = source
        self._out = bytearray()
        self._err = bytearray()
        self._truncated = False
        self._callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        self._exit: asyncio.Future[Exit] = asyncio.get_running_loop().create_future()
        # a handle nobody waits on (its sandbox killed under it) must not log its end
        self._exit.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._pump = asyncio.ensure_future(self._follow(after))

    async def _follow(self, after: int) -> None:
        expected = after + 1
        try:
            async for event in self._source.follow(after):
                if event.seq > expected:
                    self._truncated = True  # output the server no longer had
                expected = event.seq + 1
                if isinstance(event, Exit):
                    self._exit.set_result(event)
                    return
                self._keep(event)
            raise AgentReplyTimeout(f"command {self.id}: its events ended without its exit")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self._exit.done():
                self._exit.set_exception(exc)

    def _keep(self, event: Output) -> None:
        buffer = self._out if event.stream == "stdout" else self._err
        room = MAX_OUTPUT - len(self._out) - len(self._err)
        if len(event.data) > room:
            self._truncated = True
        buffer += event.data[: max(room, 0)]
        callback = self._callbacks.get(event.stream)
        if callback is not None:
            try:
                callback(event.data)
            except Exception as exc:  # a caller's callback must not end the follow
                log.warning("output_callback_failed", command=self.id, error=repr(exc))

    @property
    def id(self) -> str:
        """Names the command for ``commands.connect/kill/send_stdin`` (also later)."""
        return self._source.id

    @property
    def stdout(self) -> str:
        """What it wrote to stdout so far (decoded; ``wait()`` has the bytes)."""
        return self._out.decode("utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self._err.decode("utf-8", errors="replace")

    @property
    def exit_code(self) -> int | None:
        """None while it runs."""
        if not self._exit.done() or self._exit.exception() is not None:
            return None
        return self._exit.result().exit_code

    async def wait(self, timeout: float | None = None) -> CommandResult:
        """Its result once it ended (``AgentVMTimeout`` if that takes over ``timeout``;
        the command keeps running then)."""
        try:
            exit = await asyncio.wait_for(asyncio.shield(self._exit), timeout)
        except TimeoutError:
            raise AgentReplyTimeout(
                f"command {self.id} still running after {timeout} s",
                hint="wait() again, or kill() it",
            ) from None
        if exit.failure is not None:
            raise from_wire(500, dict(exit.failure))
        return ExecutionResult(
            exit_code=exit.exit_code if exit.exit_code is not None else 128 + (exit.signal or 0),
            stdout_bytes=bytes(self._out), stderr_bytes=bytes(self._err),
            duration=exit.duration, timed_out=exit.timed_out, signal=exit.signal,
            error=exit.error, truncated=self._truncated,
            output=tuple(OutputFile(path, size, is_dir) for path, size, is_dir in exit.output),
        )  # fmt: skip

    async def kill(self) -> None:
        """SIGKILL to its whole process tree."""
        await self._source.kill()

    async def send_signal(self, sig: int | str) -> None:
        """A signal (number or name: ``"TERM"``) to its process group."""
        await self._source.signal(_signal(sig))

    async def send_stdin(self, data: str | bytes) -> None:
        """Bytes for its stdin (started with ``stdin=True``), or keys for its terminal."""
        await self._source.send_stdin(data.encode() if isinstance(data, str) else data)

    async def close_stdin(self) -> None:
        """End of its input (it reads EOF)."""
        await self._source.close_stdin()

    async def resize(self, cols: int, rows: int) -> None:
        """A terminal's new size."""
        await self._source.resize(cols, rows)

    async def disconnect(self) -> None:
        """Stop following it; it keeps running (``commands.connect(id)`` comes back)."""
        self._pump.cancel()


async def start(
    handle: SandboxHandle,
    spec: CommandSpec,
    background: bool,
    on_stdout: BytesCallback | None,
    on_stderr: BytesCallback | None,
) -> CommandResult | AsyncCommandHandle:
    """Start a command: its handle, or (not ``background``) its result once it ended; a
    caller that gives up on the wait (cancelled) kills it."""
    source = await handle.run(spec)
    command = AsyncCommandHandle(source, on_stdout=on_stdout, on_stderr=on_stderr)
    if background:
        return command
    try:
        return await command.wait()
    except asyncio.CancelledError:
        await asyncio.shield(source.kill())
        raise


class AsyncCommands:
    """``sandbox.commands``: run commands in the sandbox."""

    def __init__(self, live: Live, secrets: Mapping[str, str]) -> None:
        self._live = live
        self._secrets = secrets

    @overload
    async def run(
        self, cmd: str | Sequence[str], *, background: Literal[False] = False,
        timeout: float | None = 60.0, envs: Mapping[str, str] | None = None,
        cwd: str | None = None, user: str | None = None,
        stdin: str | bytes | bool | None = None, on_stdout: TextCallback | None = None,
        on_stderr: TextCallback | None = None, on_stdout_bytes: BytesCallback | None = None,
        on_stderr_bytes: BytesCallback | None = None,
    ) -> CommandResult: ...  # fmt: skip

    @overload
    async def run(
        self, cmd: str | Sequence[str], *, background: Literal[True],
        timeout: float | None = 60.0, envs: Mapping[str, str] | None = None,
        cwd: str | None = None, user: str | None = None,
        stdin: str | bytes | bool | None = None, on_stdout: TextCallback | None = None,
        on_stderr: TextCallback | None = None, on_stdout_bytes: BytesCallback | None = None,
        on_stderr_bytes: BytesCallback | None = None,
    ) -> AsyncCommandHandle: ...  # fmt: skip

    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: bool = False,
        timeout: float | None = 60.0,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: str | bytes | bool | None = None,
        on_stdout: TextCallback | None = None,
        on_stderr: TextCallback | None = None,
        on_stdout_bytes: BytesCallback | None = None,
        on_stderr_bytes: BytesCallback | None = None,
    ) -> CommandResult | AsyncCommandHandle:
        """Run ``cmd`` (a string goes through bash, a list is exec'd). Waits for it and
        returns its result, or with ``background=True`` returns its handle at once.
        ``stdin``: text or bytes fed to it, or ``True`` to keep stdin open for
        ``send_stdin`` until ``close_stdin``. The sandbox's secrets are in its
        environment (``envs`` may override them). Callbacks get output as it comes."""
        data = stdin.encode() if isinstance(stdin, str) else stdin
        spec = CommandSpec(
            cmd if isinstance(cmd, str) else tuple(cmd),
            envs={**self._secrets, **(envs or {})}, cwd=cwd, user=user, timeout=timeout,
            stdin=data if isinstance(data, bytes) else None, stdin_open=data is True,
        )  # fmt: skip
        return await start(
            self._live(), spec, background,
            on_stdout_bytes or _text(on_stdout), on_stderr_bytes or _text(on_stderr),
        )  # fmt: skip

    async def list(self) -> list[CommandInfo]:
        """Commands running in the sandbox, and ended ones still kept."""
        return await self._live().commands()

    async def connect(
        self,
        command_id: str,
        *,
        on_stdout: TextCallback | None = None,
        on_stderr: TextCallback | None = None,
    ) -> AsyncCommandHandle:
        """A handle to a command started earlier (by this client or another), with its
        output from the start (what is still kept of it)."""
        source = await self._live().command(command_id)
        return AsyncCommandHandle(source, on_stdout=_text(on_stdout), on_stderr=_text(on_stderr))

    async def kill(self, command_id: str) -> None:
        await (await self._live().command(command_id)).kill()

    async def send_signal(self, command_id: str, sig: int | str) -> None:
        await (await self._live().command(command_id)).signal(_signal(sig))

    async def send_stdin(self, command_id: str, data: str | bytes) -> None:
        source = await self._live().command(command_id)
        await source.send_stdin(data.encode() if isinstance(data, str) else data)

    async def close_stdin(self, command_id: str) -> None:
        await (await self._live().command(command_id)).close_stdin()


class AsyncPty:
    """``sandbox.pty``: interactive commands in a terminal (raw bytes both ways; the
    guest's line discipline turns ``\\x03`` into SIGINT for the foreground group). A
    terminal is a command: ``create`` returns its handle."""

    def __init__(self, live: Live, secrets: Mapping[str, str]) -> None:
        self._live = live
        self._secrets = secrets

    async def create(
        self,
        cols: int = 80,
        rows: int = 24,
        on_data: BytesCallback | None = None,
        *,
        cmd: str | Sequence[str] | None = None,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
    ) -> AsyncCommandHandle:
        """Start ``cmd`` (default: a login shell) in a ``cols`` x ``rows`` terminal;
        ``on_data`` gets its output as it comes."""
        command = ("bash", "-l") if cmd is None else cmd if isinstance(cmd, str) else tuple(cmd)
        spec = CommandSpec(
            command, envs={**self._secrets, **(envs or {})}, cwd=cwd, user=user,
            timeout=timeout, pty=(cols, rows),
        )  # fmt: skip
        handle = await start(self._live(), spec, True, on_data, None)
        assert isinstance(handle, AsyncCommandHandle)
        return handle

    async def send_input(self, pty: AsyncCommandHandle, data: str | bytes) -> None:
        """Keystrokes for the terminal (``"\\x03"`` is Ctrl-C)."""
        await pty.send_stdin(data)

    async def resize(self, pty: AsyncCommandHandle, cols: int, rows: int) -> None:
        await pty.resize(cols, rows)

    async def kill(self, pty: AsyncCommandHandle) -> None:
        """End the terminal's whole process tree."""
        await pty.kill()

    async def wait(self, pty: AsyncCommandHandle, timeout: float | None = None) -> int:
        """The exit code once the terminal's command ended (128+N if signal N ended it)."""
        return (await pty.wait(timeout)).exit_code
