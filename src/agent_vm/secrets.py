"""Secrets for sandboxed commands: where they come from, and keeping them out of what we keep.

A secret reaches a command only through its environment (inside the EXECUTE frame, never
on a command line, in domain XML or in a golden state). Its value is registered here for
the life of this process, and everything agent-vm writes out that could carry guest
output (log events, console-log tails in error messages, kept test artefacts) passes
through :func:`redact`, which puts ``[secret NAME]`` in its place.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path

from agent_vm.errors import ConfigError

MIN_LENGTH = 4  # shorter values would redact ordinary text; refused as secrets
_lock = threading.Lock()
_values: dict[str, str] = {}  # value -> name


def register(secrets: Mapping[str, str]) -> None:
    """Remember the values of ``secrets`` (name -> value) for redaction."""
    for name, value in secrets.items():
        if len(value) < MIN_LENGTH:
            raise ConfigError(
                f"secret {name} is shorter than {MIN_LENGTH} characters",
                hint="a value that short cannot be kept out of logs; pass it with --env",
            )
        with _lock:
            _values[value] = name


def redact(text: str) -> str:
    """``text`` with every registered secret value replaced by ``[secret NAME]``."""
    if not _values:
        return text
    with _lock:
        known = sorted(_values.items(), key=lambda item: -len(item[0]))
    for value, name in known:
        if value in text:
            text = text.replace(value, f"[secret {name}]")
    return text


def redact_bytes(data: bytes) -> bytes:
    if not _values:
        return data
    with _lock:
        known = sorted(_values.items(), key=lambda item: -len(item[0]))
    for value, name in known:
        data = data.replace(value.encode(), f"[secret {name}]".encode())
    return data


def parse(items: list[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``--secret`` values: ``NAME`` (from this process's environment) or ``NAME=@FILE``
    (the file's content, without a trailing newline). A value is never taken from the
    command line itself: it would show in the host's process list."""
    source = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for item in items:
        name, sep, rest = item.partition("=")
        if not name.isidentifier():
            raise ConfigError(f"--secret {item!r}: {name!r} is not a variable name")
        if not sep:
            if name not in source:
                raise ConfigError(
                    f"--secret {name}: {name} is not set in this environment",
                    hint=f"export {name}=... first, or use --secret {name}=@FILE",
                )
            out[name] = source[name]
        elif rest.startswith("@"):
            path = rest[1:]
            try:
                out[name] = Path(path).read_text().removesuffix("\n")
            except OSError as exc:
                raise ConfigError(f"--secret {name}: cannot read {path}: {exc.strerror}") from None
        else:
            raise ConfigError(
                f"--secret {name}=...: the value would show in the host's process list",
                hint=f"use --secret {name} (from the environment) or --secret {name}=@FILE",
            )
    return out
