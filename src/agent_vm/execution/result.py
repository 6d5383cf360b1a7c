"""What one command run in a VM produced."""

from __future__ import annotations

from dataclasses import dataclass

from agent_vm.communication.workspace import OutputFile


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one execution.

    ``exit_code`` follows the shell convention: the process's exit status, or 128+N when
    signal N killed it (``signal`` then says N); 127/126 when it could not be started
    (``error`` says why). Output is kept as bytes; ``stdout``/``stderr`` decode it.
    ``output`` lists what is in the workspace's ``output/`` after the run (workspaces
    with ``layout=True`` only; read on the host, never following the guest's links).
    """

    exit_code: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    duration: float
    timed_out: bool = False
    signal: int | None = None
    error: str | None = None
    truncated: bool = False
    output: tuple[OutputFile, ...] = ()

    @property
    def success(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.error is None

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", errors="replace")
