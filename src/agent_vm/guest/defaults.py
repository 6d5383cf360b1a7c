"""An image's run-time defaults, as its recipe build left them in the image.

A recipe says which user its agent runs as, where it starts and what is in its
environment; the image carries that, so every way of running a command (CLI, SDK, pool,
server) gets the same defaults without each host-side caller knowing the recipe.
Standard library only (runs in the guest). A missing or unreadable file means the
base image's defaults: root, its home, no extra environment.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from agent_vm.protocol.ports import IMAGE_DEFAULTS

USERS = ("root", "agent")


@dataclass(frozen=True)
class ImageDefaults:
    user: str = "root"
    workdir: str | None = None
    env: dict[str, str] = field(default_factory=dict)


_cached: ImageDefaults | None = None


def parse(text: str) -> ImageDefaults:
    """The defaults in ``text``; ValueError naming what is wrong."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    user = data.get("user") or "root"
    if user not in USERS:
        raise ValueError(f"user must be one of {USERS}")
    workdir = data.get("workdir")
    if workdir is not None and (not isinstance(workdir, str) or not workdir.startswith("/")):
        raise ValueError("workdir must be an absolute path")
    env = data.get("env") or {}
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\0" not in k + v
        for k, v in env.items()
    ):
        raise ValueError("env must map names to strings")
    return ImageDefaults(user=user, workdir=workdir, env=dict(env))


def image_defaults(path: str = IMAGE_DEFAULTS) -> ImageDefaults:
    """Read once per agent process: an image's defaults do not change while it runs."""
    global _cached
    if _cached is None:
        try:
            with open(path, encoding="utf-8") as handle:
                _cached = parse(handle.read())
        except FileNotFoundError:
            _cached = ImageDefaults()
        except (OSError, ValueError) as exc:
            print(f"agent-vm: ignoring {path}: {exc}", file=sys.stderr, flush=True)
            _cached = ImageDefaults()
    return _cached
