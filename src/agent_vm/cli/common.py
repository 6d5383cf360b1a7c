"""What every command of the CLI shares: one line for an error and one for its hint
(never a traceback), progress that shows where the user looks, the runtime."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

import typer
from rich.console import Console
from rich.markup import escape
from rich.status import Status

from agent_vm.errors import AgentVMError, ConfigError
from agent_vm.exitcodes import EXIT_AGENT_VM_ERROR

err = Console(stderr=True, soft_wrap=True)  # an error is one line, however long


def fail(exc: AgentVMError) -> typer.Exit:
    """One line for what happened, one for what to do; never a traceback."""
    first, *rest = exc.message.splitlines() or [""]
    err.print(f"[bold red]agent-vm:[/] {escape(first)}", highlight=False)
    for line in rest:  # e.g. a console log tail: context, printed as it is
        err.print(line, markup=False, highlight=False)
    if exc.hint:
        err.print(f"[yellow]hint:[/] {escape(exc.hint)}", highlight=False)
    return typer.Exit(EXIT_AGENT_VM_ERROR)


class Progress:
    """Long steps (packages, an image build, a golden state) said where the user looks:
    a status line on a terminal, else one line per step on stderr (a CI log, a pipe),
    so a first run is never silent for minutes. Fast paths say nothing."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self._status: Status | None = None
        self._last = ""

    def __call__(self, message: str) -> None:
        if message == self._last:
            return
        self._last = message
        if not self._stream.isatty():
            print(f"agent-vm: {message}", file=self._stream, flush=True)
        elif self._status is None:
            self._status = err.status(message)
            self._status.start()
        else:
            self._status.update(message)

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


@contextmanager
def progress() -> Iterator[Progress]:
    shown = Progress()
    try:
        yield shown
    finally:
        shown.stop()


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env expects KEY=VALUE, got {pair!r}")
        env[key] = value
    return env
