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

import contextlib
import http.client
import json
import os
import socket
import sys

from agent_vm.api.local import default_socket, read_local_token

EXIT_TIMEOUT = 124
EXIT_AGENT_VM_ERROR = 125
EXIT_INTERRUPTED = 130
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


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("agent-vm", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


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


class _Api:
    def __init__(self, path: str, token: str) -> None:
        self.path = path
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def call(self, method: str, url: str, body: object = None) -> tuple[int, object]:
        connection = _UnixConnection(self.path, timeout=60)
        try:
            data = json.dumps(body).encode() if body is not None else None
            connection.request(method, url, body=data, headers=self.headers)
            response = connection.getresponse()
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
        finally:
            connection.close()

    def follow(self, url: str) -> dict[str, object]:
        """Write the execution's output as it comes; its result event."""
        connection = _UnixConnection(self.path, timeout=None)
        try:
            connection.request("GET", url, headers=self.headers)
            response = connection.getresponse()
            if response.status != 200:
                raise OSError(f"the server answered {response.status} to {url}")
            while line := response.readline():
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                if event["type"] == "stdout":
                    sys.stdout.write(event["text"])
                    sys.stdout.flush()
                elif event["type"] == "stderr":
                    sys.stderr.write(event["text"])
                    sys.stderr.flush()
                elif event["type"] == "result":
                    return dict(event)
            raise OSError("the server closed the output stream before the result")
        finally:
            connection.close()


def _detail(body: object) -> str:
    """A refusal in one line: pydantic's field errors as ``field: message``."""
    detail = body.get("detail") if isinstance(body, dict) else body
    if isinstance(detail, list):
        return "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', [])[1:])}: {item.get('msg')}"
            for item in detail
            if isinstance(item, dict)
        )
    return str(detail)


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
    api = _Api(path, token)
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
            print(f"agent-vm: the server refused the command: {_detail(started)}",
                  file=sys.stderr)  # fmt: skip
            return EXIT_AGENT_VM_ERROR
        result = api.follow(str(started["events"]))
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
    exit_code = result.get("exit_code")
    if not isinstance(exit_code, int):
        print(f"agent-vm: {result.get('error') or 'the command ended without a result'}",
              file=sys.stderr)  # fmt: skip
        return EXIT_AGENT_VM_ERROR
    return exit_code


def main() -> None:
    code = fast_run(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from agent_vm.cli import main as full_cli

    full_cli()
