"""The CLI's fast path takes only a plain ``run``; anything else is the full CLI's."""

from __future__ import annotations

import pytest

from agent_vm.quick import parse


def test_a_plain_run_becomes_two_request_bodies() -> None:
    bodies = parse(["run", "--network=isolated", "--image", "tools", "-e", "A=1", "--env",
                    "B=x=y", "--timeout", "5", "--cwd", "/tmp", "--user", "agent", "--",
                    "python3", "-c", "print(1)"])  # fmt: skip
    assert bodies == (
        {"network": "isolated", "profile": "light", "image": "tools"},
        {"cmd": ["python3", "-c", "print(1)"], "timeout": 5.0, "env": {"A": "1", "B": "x=y"},
         "cwd": "/tmp", "user": "agent"},
    )  # fmt: skip
    assert parse(["run", "--", "true"]) == (
        {"network": "nat", "profile": "light"},
        {"cmd": ["true"], "timeout": 600.0, "env": {}},
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "true"],  # no --
        ["run", "--"],  # no command
        ["shell"],
        ["run", "--workspace", "/tmp", "--", "true"],  # not plain
        ["run", "-t", "--", "true"],
        ["run", "--secret", "K", "--", "true"],
        ["run", "--timeout", "soon", "--", "true"],  # the full CLI says what is wrong
        ["run", "--timeout", "-1", "--", "true"],
        ["run", "-e", "NOEQUALS", "--", "true"],
        ["run", "--network", "--", "true"],  # a value missing
        ["image", "list"],
    ],
)
def test_anything_else_is_left_to_the_full_cli(argv: list[str]) -> None:
    assert parse(argv) is None
