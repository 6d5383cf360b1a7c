"""What a pool needs from the VMs it hands out, the shells it keeps, and their factory.

``pooling.py`` is written against these protocols only: the real factory (``pool.py``,
clones of a golden state) and the unit tests' fake one both satisfy them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar


class PooledVM(Protocol):
    """What the pool needs of the VMs it hands out (RunningVM has all of it)."""

    @property
    def name(self) -> str: ...

    def alive(self) -> bool: ...

    async def healthy(self, timeout: float = 5.0) -> bool: ...

    async def close(self) -> None: ...


class Shell(Protocol):
    """A VM made ahead, not yet handed out (for clones: QEMU waiting for its state)."""

    @property
    def name(self) -> str: ...

    def alive(self) -> bool: ...

    async def discard(self) -> None: ...


S = TypeVar("S", bound=Shell)
V = TypeVar("V", bound=PooledVM)
V_co = TypeVar("V_co", bound=PooledVM, covariant=True)


class ShellFactory(Protocol[S, V_co]):
    async def prepare(self) -> S:
        """Start a shell (the slow part: ~0.4 s of libvirt for a clone)."""
        ...

    async def activate(self, shell: S) -> V_co:
        """Turn a shell into a running VM; on failure the shell is gone."""
        ...

    def subscribe(self, on_stopped: Callable[[str], None]) -> Callable[[], None]:
        """Report by name VMs that stopped on their own; returns an unsubscribe."""
        ...

    async def maintain(self) -> None:
        """Periodic housekeeping (reconnect, retry deferred clean-ups)."""
        ...


@dataclass
class PoolStats:
    idle: int
    in_use: int
    starting: int
    standby: int
    started: int
    replaced_dead: int
    start_seconds: list[float] = field(default_factory=list)
