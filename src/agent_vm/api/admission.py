"""What a server admits: the warm pools it is started with (``--pool``) and the host
directories a token may share (below ``--workspace-root``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent_vm.errors import ConfigError


@dataclass(frozen=True)
class PoolSpec:
    """A warm pool the server holds: ``image:profile:network:min:max`` on the command line."""

    image: str | None = None
    profile: str = "light"
    network: str = "nat"
    min_size: int = 2
    max_size: int = 4

    @classmethod
    def parse(cls, text: str) -> PoolSpec:
        parts = text.split(":")
        if len(parts) != 5:
            raise ConfigError(f"--pool {text!r}: give IMAGE:PROFILE:NETWORK:MIN:MAX")
        image, profile, network, low, high = parts
        try:
            min_size, max_size = int(low), int(high)
        except ValueError:
            raise ConfigError(f"--pool {text!r}: MIN and MAX must be numbers") from None
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ConfigError(f"--pool {text!r}: need 0 <= MIN <= MAX and MAX >= 1")
        return cls(image or None, profile, network, min_size, max_size)


def resolve_workspace(root: Path | None, relative: str, *, anywhere: bool = False) -> Path:
    """A directory below the server's ``--workspace-root``: the only host directories a
    token holder may share (a path that leaves the root, also through a symlink, is
    refused). ``anywhere`` (the local token, root on this host): any absolute directory."""
    if anywhere:
        target = Path(relative)
        if not target.is_absolute() or not target.is_dir():
            raise ConfigError(f"workspace {relative!r} is not an absolute directory on this host")
        return target.resolve()
    if root is None:
        raise ConfigError(
            "this server shares no host directories",
            hint="start it with --workspace-root DIR to allow directories below DIR",
        )
    base = root.resolve()
    given = Path(relative)
    inside = given.is_absolute() and given.resolve().is_relative_to(base)
    target = given.resolve() if inside else (base / relative.lstrip("/")).resolve()
    if target != base and base not in target.parents:
        raise ConfigError(f"workspace {relative!r} is outside the server's workspace root")
    if not target.is_dir():
        raise ConfigError(f"workspace {relative!r} is not a directory on the server")
    return target
