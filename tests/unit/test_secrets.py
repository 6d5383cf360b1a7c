"""Secrets: where a value may come from, and that what agent-vm logs never shows it."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent_vm import logs, secrets
from agent_vm.errors import ConfigError
from agent_vm.execution.running import console_tail

VALUE = "sk-test-5ecret-value-0123"


def test_a_value_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("from-a-file-value\n")
    got = secrets.parse(["API_KEY", f"OTHER=@{key}"], environ={"API_KEY": VALUE})
    assert got == {"API_KEY": VALUE, "OTHER": "from-a-file-value"}


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("MISSING", "MISSING is not set in this environment"),
        ("API_KEY=literal", "would show in the host's process list"),
        ("API_KEY=@/nonexistent/key", "cannot read /nonexistent/key"),
        ("not-a-name", "is not a variable name"),
    ],
)
def test_bad_secrets_are_refused(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        secrets.parse([item], environ={"API_KEY": VALUE})


def test_short_values_are_refused() -> None:
    with pytest.raises(ConfigError, match="shorter than"):
        secrets.register({"PIN": "123"})


def test_log_lines_and_console_tails_never_show_a_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secrets.register({"API_KEY": VALUE})
    logs.configure("INFO")
    logs.get_logger("test").warning("guest_said", output=f"key={VALUE}", lines=[VALUE, 3])
    err = capsys.readouterr().err
    assert VALUE not in err and "[secret API_KEY]" in err
    console = tmp_path / "console.log"
    console.write_text(f"boot\nleaked {VALUE}\n")
    assert console_tail(console, 5) == "boot\nleaked [secret API_KEY]"
    assert secrets.redact_bytes(VALUE.encode() * 2) == b"[secret API_KEY]" * 2
    logs.configure("WARNING")
