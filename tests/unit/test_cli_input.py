"""Bad command lines are refused with one clear line, before any daemon or VM starts.

``Runtime.start`` (daemons, libvirt) and image builds are replaced by tripwires: a
refusal that got as far as either would fail these tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent_vm import cli
from agent_vm.errors import AgentVMError
from agent_vm.execution.runtime import Runtime
from agent_vm.image.builder import ImageBuilder


@pytest.fixture
def tripwires(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_VM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("AGENT_VM_CONFIG", str(tmp_path / "none.toml"))

    async def no_start(self: Runtime) -> None:
        raise AssertionError("the runtime was started for a command line that is invalid")

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("an image build was started for a command line that is invalid")

    monkeypatch.setattr(Runtime, "start", no_start)
    monkeypatch.setattr(ImageBuilder, "build", no_build)


@pytest.mark.parametrize(
    ("args", "message", "hint"),
    [
        (["--image", "nope"], "no image named 'nope' has been built", "--name nope"),
        (["--cpus", "0"], "--cpus must be at least 1, not 0", None),
        (["--cpus", "-2"], "--cpus must be at least 1", None),
        (["--cpus", "100000"], "vCPUs asked for, but this host has", "--cpus"),
        (["--memory", "100000000"], "MiB of guest memory asked for, but this host has", "--memory"),
        (["--memory", "16"], "--memory must be at least 128 MiB", None),
        (["--disk", "1"], "--disk must be at least 2 GiB, not 1", None),
        (["--profile", "huge"], "unknown profile 'huge'", None),
        (["--timeout", "-1"], "--timeout must be positive", None),
        (["--port", "70000"], "port 70000 out of range", None),
        (["--allow-domain", "not a name"], "not a domain name", None),
        (["--allow-domain", "a.test", "--ipv6"], "IPv4 only", None),
        (["--network", "wifi"], "network must be nat, isolated or bridge:NAME", None),
        (["--allow-cidr", "fe80::/10"], "allow_cidrs is IPv4 only", None),
        (["--env", "NOEQUALS"], "--env expects KEY=VALUE", None),
        (["--ro"], "--ro needs --workspace DIR", None),
        (["--secret", "AGENTVM_UNSET_VAR"], "AGENTVM_UNSET_VAR is not set", "export"),
        (["--secret", "TOKEN=abcdef"], "would show in the host's process list", "@FILE"),
        (
            ["--workspace", "/nonexistent/dir"],
            "--workspace /nonexistent/dir: not a directory",
            "create",
        ),
        (["--upload", "nocolon"], "--upload 'nocolon': give SOURCE:DESTINATION", None),
        (["--upload", "/nonexistent:/x"], "/nonexistent does not exist", None),
        (["--upload", "/etc/hostname:relative"], "the VM path 'relative' must be absolute", None),
        (["--download", "/x:/nonexistent/dir/f"], "/nonexistent/dir is not a directory", None),
    ],
)
def test_refused_before_anything_starts(
    tripwires: None, args: list[str], message: str, hint: str | None
) -> None:
    result = CliRunner().invoke(cli.app, ["run", *args, "--", "true"])
    assert result.exit_code == cli.EXIT_AGENT_VM_ERROR, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("agent-vm: ") and message in lines[0], result.output
    assert "Traceback" not in result.output and "pydantic" not in result.output
    assert "errors.pydantic.dev" not in result.output
    if hint is not None:
        assert len(lines) == 2 and lines[1].startswith("hint: ") and hint in lines[1]
    else:
        assert len(lines) <= 2


def test_a_bad_setting_names_the_variable(tripwires: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_VM_BOOT_TIMEOUT", "soon")
    result = CliRunner().invoke(cli.app, ["run", "--", "true"])
    assert result.exit_code == cli.EXIT_AGENT_VM_ERROR
    assert "AGENT_VM_BOOT_TIMEOUT" in result.output.splitlines()[0]


def test_fail_prints_markup_free_text() -> None:
    """A message with brackets (a list, a path) is printed as it is, not as rich markup."""
    error = AgentVMError("unknown fields ['x', 'y'] in [bold]", hint="see [docs]")
    runner_output = CliRunner().invoke(_AppRaising(error).app, []).output
    assert "agent-vm: unknown fields ['x', 'y'] in [bold]" in runner_output
    assert "hint: see [docs]" in runner_output


class _AppRaising:
    def __init__(self, error: AgentVMError) -> None:
        import typer

        self.app = typer.Typer()

        @self.app.command()
        def fail() -> None:
            raise cli.fail(error)


def test_progress_is_one_line_per_step_off_a_terminal() -> None:
    import io

    from agent_vm.cli.common import Progress

    out = io.StringIO()  # not a terminal (a pipe, a CI log)
    shown = Progress(out)
    for message in ("installing packages", "installing packages", "building the image"):
        shown(message)
    shown.stop()
    assert out.getvalue() == "agent-vm: installing packages\nagent-vm: building the image\n"
