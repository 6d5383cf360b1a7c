"""Secrets for sandboxed commands: where they come from, and keeping them out of what we keep.

A secret reaches a command only through its environment (inside the EXECUTE frame, never
on a command line, in domain XML or in a golden state). Its value is registered here for
the life of this process, and everything agent-vm writes out that could carry guest
output (log events, console-log tails in error messages, kept test artefacts) passes
through :func:`redact`, which puts ``[secret NAME]`` in its place.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from secrets import token_hex

from agent_vm.errors import ConfigError
from agent_vm.names import clean_pattern

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


# ---------------------------------------------------------------- secrets the proxy injects

HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")  # an RFC 9110 field name
# headers HTTP itself or the proxy controls: a secret there would be lost or break framing
RESERVED_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade",
    "te", "trailer", "proxy-connection", "proxy-authorization", "expect",
})  # fmt: skip
PLACEHOLDER_PREFIX = "agentvm-secret-"


@dataclass(frozen=True)
class Secret:
    """A secret that never enters the VM: the guest gets ``placeholder`` in its
    environment, and the host's egress proxy puts ``value`` in its place in the headers
    of HTTPS requests to ``hosts`` (names or ``*.domain`` patterns; only ``header`` when
    given). To any other host the placeholder goes out as it is."""

    value: str = field(repr=False)
    hosts: Sequence[str]  # kept as a tuple of cleaned patterns
    header: str | None = None
    placeholder: str = field(default_factory=lambda: PLACEHOLDER_PREFIX + token_hex(16))

    def __post_init__(self) -> None:
        hosts = (self.hosts,) if isinstance(self.hosts, str) else tuple(self.hosts)
        if not hosts:
            raise ConfigError("a proxied secret needs the hosts it is for", hint=HOSTS_HINT)
        try:
            cleaned = tuple(clean_pattern(host) for host in hosts)
        except ValueError as exc:
            raise ConfigError(f"proxied secret: {exc}", hint=HOSTS_HINT) from None
        object.__setattr__(self, "hosts", cleaned)
        if self.header is not None and (
            not HEADER_NAME.match(self.header) or self.header.lower() in RESERVED_HEADERS
        ):
            raise ConfigError(
                f"proxied secret: {self.header!r} is not a header a secret can go in",
                hint="a request header name such as x-api-key or authorization",
            )
        if len(self.value) < MIN_LENGTH or any(c in self.value for c in "\r\n\0"):
            raise ConfigError(
                f"proxied secret: a value shorter than {MIN_LENGTH} characters or with a "
                "line break cannot go in a header"
            )
        if not self.placeholder.startswith(PLACEHOLDER_PREFIX) or not self.placeholder.isascii():
            raise ConfigError(f"proxied secret: a placeholder starts with {PLACEHOLDER_PREFIX}")


HOSTS_HINT = "e.g. Secret(value, hosts=['api.anthropic.com'], header='x-api-key')"


def parse_any(
    items: list[str], environ: Mapping[str, str] | None = None
) -> dict[str, str | Secret]:
    """``--secret`` values of both kinds: ``NAME``/``NAME=@FILE`` (in the VM's
    environment) and ``NAME:HOST[,HOST][:HEADER]`` (injected by the host's proxy)."""
    out: dict[str, str | Secret] = {}
    for item in items:
        if ":" in item.partition("=")[0]:
            name, secret = parse_proxied(item, environ)
            out[name] = secret
        else:
            out.update(parse([item], environ))
    return out


def parse_proxied(item: str, environ: Mapping[str, str] | None = None) -> tuple[str, Secret]:
    """``--secret NAME:HOST[,HOST...][:HEADER]``: the value from this process's
    environment, injected by the proxy for HOST."""
    name, _, rest = item.partition(":")
    hosts, _, header = rest.partition(":")
    value = parse([name], environ)[name]
    return name, Secret(value, tuple(h for h in hosts.split(",") if h), header or None)
