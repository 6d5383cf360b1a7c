"""Host names and the patterns allowlists and secrets are bound to (pure logic)."""

from __future__ import annotations

import re

DOMAIN_PATTERN = re.compile(
    r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
)


def clean_pattern(pattern: str) -> str:
    """``pattern`` in the form it is compared in; ValueError when it cannot match a name."""
    name = pattern.strip().lower().rstrip(".")
    if not DOMAIN_PATTERN.match(name):
        raise ValueError(f"not a domain name or *.domain pattern: {pattern!r}")
    return name


def matches(patterns: tuple[str, ...], name: str) -> bool:
    """``pypi.org`` matches that name only; ``*.github.com`` its subdomains."""
    name = name.lower().rstrip(".")
    return any(name.endswith(p[1:]) if p.startswith("*.") else name == p for p in patterns)
