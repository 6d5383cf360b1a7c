"""Tiny file helpers for guest code (pathlib costs boot time under TCG)."""

from __future__ import annotations


def read_file(path: str) -> str:
    """The file's text, or "" when it cannot be read."""
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return ""


def write_file(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
