"""The E2B door against agent-vm's own SDK: ``create`` + ``run("echo hi")`` + ``kill``.

    .venv/bin/python -m bench.e2b_sdk [--runs 20] [--pause 4]

Starts ``agent-vm serve`` on a socket of its own with ``--e2b-port`` and one warm pool
(``light`` ISOLATED, 2..4), and a token. Then, one after the other (``--pause`` seconds
apart, so the pool has refilled), in alternation so both see the same pool:

* **agent-vm SDK**: ``Sandbox(server=socket, network="isolated")``, ``commands.run``,
  ``kill``;
* **e2b SDK** (the unmodified ``e2b`` package, over TCP to the door):
  ``Sandbox.create(allow_internet_access=False)``, ``commands.run``, ``kill``;
* **agent-vm SDK with E2B's command**: the same, running what the e2b SDK asks envd
  to run (``/bin/bash -l -c "echo hi"`` as ``user`` in its home): the difference to
  the e2b SDK is what the door itself costs, the rest is the login shell;
* **raw limit**: the same three steps as bare HTTP calls on the native API (httpx over
  the socket, ``wait=true``), which no client of this server can beat.

Each step is timed too (the e2b SDK's first command in a sandbox includes the door's
check that E2B's user ``user`` is there). Beside them in the same run, ``echo hi`` under
``bwrap`` and ``runsc do`` (peers.py). Target: e2b SDK <= 1.2 x agent-vm SDK. Prints
tables and writes JSON (default bench/results/e2b-<time>.json).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket as socket_module
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from e2b import Sandbox as E2BSandbox

from agent_vm import timeutil
from agent_vm.api.tokens import TokenStore, e2b_key
from agent_vm.sandbox import Sandbox
from bench import peers
from bench.stats import host_info, print_table, summary, write_json

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "agent_vm"]
Steps = dict[str, float]


def free_port() -> int:
    with socket_module.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def timed(steps: list[tuple[str, Callable[[], Any]]]) -> Steps:
    out: Steps = {}
    began = time.perf_counter()
    for name, step in steps:
        start = time.perf_counter()
        step()
        out[name] = time.perf_counter() - start
    out["total"] = time.perf_counter() - began
    return out


E2B_LINE = ["/bin/bash", "-l", "-c", "echo hi"]  # what the e2b SDK asks envd to run


def own_sdk(socket: Path, token: str, as_e2b: bool = False) -> Steps:
    holder: dict[str, Sandbox] = {}

    def create() -> None:
        holder["sb"] = Sandbox.create(server=str(socket), token=token, network="isolated")

    def run() -> None:
        if as_e2b:  # E2B's command line, user and directory: what the door adds is the rest
            result = holder["sb"].commands.run(E2B_LINE, user="user", cwd="/home/user")
        else:
            result = holder["sb"].commands.run("echo hi")
        assert result.stdout == "hi\n"

    return timed([("create", create), ("run", run), ("kill", lambda: holder["sb"].kill())])


def e2b_sdk(url: str, key: str) -> Steps:
    holder: dict[str, E2BSandbox] = {}
    opts: dict[str, Any] = {"api_key": key, "api_url": url, "sandbox_url": url}

    def create() -> None:
        holder["sb"] = E2BSandbox.create(allow_internet_access=False, **opts)

    def run() -> None:
        assert holder["sb"].commands.run("echo hi").stdout == "hi\n"

    return timed([("create", create), ("run", run), ("kill", lambda: holder["sb"].kill())])


def raw(client: httpx.Client) -> Steps:
    holder: dict[str, str] = {}

    def create() -> None:
        reply = client.post("/v1/sandboxes", json={"network": "isolated"})
        reply.raise_for_status()
        holder["id"] = reply.json()["id"]

    def run() -> None:
        reply = client.post(f"/v1/sandboxes/{holder['id']}/executions", params={"wait": True},
                            json={"cmd": "echo hi"})  # fmt: skip
        assert reply.json()["exit"]["exit_code"] == 0, reply.text

    def kill() -> None:
        client.delete(f"/v1/sandboxes/{holder['id']}").raise_for_status()

    return timed([("create", create), ("run", run), ("kill", kill)])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--pause", type=float, default=4.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-e2b-"))
    socket, port = workdir / "api.sock", free_port()
    _, token = TokenStore(workdir / "tokens.json").create("bench", max_sandboxes=8)
    env = {**os.environ, "AGENT_VM_AUDIT_LOG": str(workdir / "audit.log"),
           "AGENT_VM_TOKENS_FILE": str(workdir / "tokens.json")}  # fmt: skip
    log = (workdir / "server.log").open("wb")
    server = subprocess.Popen(
        [*CLI, "serve", "--socket", str(socket), "--e2b-port", str(port),
         "--pool", ":light:isolated:2:4"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT,
    )  # fmt: skip
    results: dict[str, list[Steps]] = {
        "agent-vm SDK": [], "e2b SDK": [], "agent-vm SDK, E2B's command": [], "raw HTTP": [],
    }  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        transport = httpx.HTTPTransport(uds=str(socket))
        with httpx.Client(transport=transport, base_url="http://agent-vm", timeout=120,
                          headers={"Authorization": f"Bearer {token}"}) as client:  # fmt: skip
            deadline = time.monotonic() + 600
            while True:
                try:
                    if client.get("/v1/pools").json()[0]["idle"] >= 2:
                        break
                except (httpx.TransportError, KeyError, IndexError, ValueError):
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((workdir / "server.log").read_text()[-2000:])
                time.sleep(0.5)
            e2b_sdk(url, e2b_key(token))  # warm both clients' imports and connections
            own_sdk(socket, token)
            time.sleep(args.pause)
            for n in range(args.runs):
                order: list[tuple[str, Callable[[], Steps]]] = [
                         ("e2b SDK", lambda: e2b_sdk(url, e2b_key(token))),
                         ("agent-vm SDK", lambda: own_sdk(socket, token)),
                         ("agent-vm SDK, E2B's command", lambda: own_sdk(socket, token, True)),
                         ("raw HTTP", lambda: raw(client))]  # fmt: skip
                if n % 2:
                    order = order[1:2] + order[0:1] + order[2:]
                for name, once in order:
                    results[name].append(once())
                    time.sleep(args.pause)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=300)
        log.close()
    peer_rows = peers.measure(["echo", "hi"], args.runs)
    rows: list[tuple[str, dict[str, Any] | None, str]] = []
    for name, runs in results.items():
        for step in ("total", "create", "run", "kill"):
            rows.append((f"{name}: {step}", summary([r[step] for r in runs]), ""))
    for name, data in peer_rows.items():
        measured = data if "error" not in data else None
        rows.append((f"peer {name}: echo hi", measured, str(data.get("error", "fresh sandbox"))))
    print_table("create + run('echo hi') + kill, same server, same pool", rows)

    def p50(name: str) -> float:
        value: float = summary([r["total"] for r in results[name]])["p50"]
        return value

    ratio = p50("e2b SDK") / p50("agent-vm SDK")
    same = p50("e2b SDK") / p50("agent-vm SDK, E2B's command")
    print(f"e2b SDK / agent-vm SDK (p50 of totals): {ratio:.2f}x (target <= 1.2x)")
    print(f"e2b SDK / agent-vm SDK running E2B's command line: {same:.2f}x (the door's own cost)")
    stamp = timeutil.now().strftime("%Y%m%d-%H%M%S")
    write_json(args.out or ROOT / "bench" / "results" / f"e2b-{stamp}.json", {
        "host": host_info(), "runs": args.runs, "pause": args.pause, "ratio_p50": ratio,
        "ratio_same_command_p50": same,
        "results": results, "peers": peer_rows,
    })  # fmt: skip


if __name__ == "__main__":
    main()
