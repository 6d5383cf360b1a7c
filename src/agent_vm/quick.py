"""The ``agent-vm`` entry point, with a fast path for the commonest call: ``agent-vm run
[--network N] [--image I] [--profile P] [--timeout S] [-e K=V] [--cwd D] [--user U] --
COMMAND...`` when a local server listens and this user has a token for it.

Why: the full CLI imports typer, rich, pydantic, libvirt and httpx before it does
anything (~0.5 s), while the server needs ~5 ms to hand out a warm VM. This path uses
only the standard library (``http.client`` over the Unix socket) and the same API as
every other client. Anything else (another option, no server, a refused create) goes to
the full CLI, which does the same thing with its own checks and messages; once a
sandbox exists this path finishes the job itself.
"""

from __future__ import annotations

import base64
import contextlib
import os
import sys

from agent_vm.api.local import LocalApi, default_socket, read_local_token, refusal
from agent_vm.exitcodes import EXIT_AGENT_VM_ERROR, EXIT_INTERRUPTED, EXIT_TIMEOUT, exit_status

# option -> (request, field); a value always follows (as "--opt v" or "--opt=v")
OPTIONS = {
    "--network": ("sandbox", "network"),
    "--image": ("sandbox", "image"),
    "--profile": ("sandbox", "profile"),
    "--timeout": ("execution", "timeout"),
    "--env": ("execution", "env"),
    "-e": ("execution", "env"),
    "--cwd": ("execution", "cwd"),
    "--user": ("execution", "user"),
}


def parse(argv: list[str]) -> tuple[dict[str, object], dict[str, object]] | None:
    """The two request bodies for a plain ``run``, or None for anything else."""
    if len(argv) < 3 or argv[0] != "run" or "--" not in argv:
        return None
    split = argv.index("--")
    options, command = argv[1:split], argv[split + 1 :]
    if not command:
        return None
    sandbox: dict[str, object] = {"network": "nat", "profile": "light"}
    execution: dict[str, object] = {"cmd": command, "timeout": 600.0, "env": {}}
    bodies = {"sandbox": sandbox, "execution": execution}
    position = 0
    while position < len(options):
        name, eq, value = options[position].partition("=")
        if name not in OPTIONS or (eq and name == "-e"):
            return None
        if not eq:
            position += 1
            if position >= len(options):
                return None
            value = options[position]
        position += 1
        where, field = OPTIONS[name]
        if field == "env":
            key, sep, val = value.partition("=")
            if not sep or not key:
                return None  # the full CLI says what is wrong with it
            execution["env"][key] = val  # type: ignore[index]
        elif field == "timeout":
            try:
                seconds = float(value)
            except ValueError:
                return None
            if seconds <= 0:
                return None
            execution["timeout"] = seconds
        else:
            bodies[where][field] = value
    return sandbox, execution


def fast_run(argv: list[str]) -> int | None:
    """The command's exit code, or None when the full CLI should handle ``argv``."""
    if os.environ.get("AGENT_VM_LOCAL") == "1":
        return None
    bodies = parse(argv)
    if bodies is None:
        return None
    path = default_socket()
    token = os.environ.get("AGENT_VM_TOKEN") or read_local_token(path)
    if not token:
        return None
    api = LocalApi(path, token)
    try:
        status, created = api.call("POST", "/v1/sandboxes", bodies[0])
    except OSError:
        return None  # nothing listens: local VMs
    if status != 201 or not isinstance(created, dict):
        return None  # refused: the full CLI tries again and says why
    sandbox = f"/v1/sandboxes/{created['id']}"
    try:
        status, started = api.call("POST", f"{sandbox}/executions", bodies[1])
        if status != 201 or not isinstance(started, dict):
            print(f"agent-vm: the server refused the command: {refusal(started)}",
                  file=sys.stderr)  # fmt: skip
            return EXIT_AGENT_VM_ERROR
        result = _follow(api, str(started["events"]))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (OSError, ValueError, KeyError) as exc:
        print(f"agent-vm: lost the server: {exc}", file=sys.stderr)
        return EXIT_AGENT_VM_ERROR
    finally:
        with contextlib.suppress(OSError):  # else the server reclaims it at its lifetime's end
            api.call("DELETE", sandbox)
    if result.get("timed_out"):
        print(f"agent-vm: command timed out after {bodies[1]['timeout']:g} s", file=sys.stderr)
        return EXIT_TIMEOUT
    if result.get("failure") or not isinstance(result.get("exit_code"), int):
        print(f"agent-vm: {result.get('error') or 'the command ended without a result'}",
              file=sys.stderr)  # fmt: skip
        return EXIT_AGENT_VM_ERROR
    if result.get("error"):
        print(f"agent-vm: {result['error']}", file=sys.stderr)
    signum = result.get("signal")
    return exit_status(int(str(result["exit_code"])), signum if isinstance(signum, int) else None)


def _follow(api: LocalApi, url: str) -> dict[str, object]:
    """Write the command's output as it comes (the bytes as they are); its exit event."""
    for event in api.events(url):
        kind = event.get("type")
        if kind in ("stdout", "stderr"):
            stream = sys.stdout.buffer if kind == "stdout" else sys.stderr.buffer
            stream.write(base64.b64decode(str(event["data"])))
            stream.flush()
        elif kind == "exit":
            return event
    raise OSError("the server closed the output stream before the command's exit")


def main() -> None:
    code = fast_run(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from agent_vm.cli import main as full_cli

    full_cli()
