"""The server under load, and ``agent-vm run`` through it next to its peers.

    .venv/bin/python -m bench.server [--seconds 300] [--clients 8] [--runs 5]

Starts ``agent-vm serve`` on a socket of its own with two warm pools (``light``
ISOLATED for the load, ``light`` NAT for the CLI, as ``run`` defaults to), and a token:

* **load**: ``--clients`` concurrent clients (httpx over the socket), each holding a
  sandbox and running ``echo <client>-<n>`` with ``wait=true`` for ``--seconds``; every
  20 executions a client deletes its sandbox and takes another from the pool. Every
  result is checked (its exit code and its exact output: a result given to the wrong
  request would show); leaked domains are counted after the server stops.
* **the CLI**: ``agent-vm run -- python3 -c 'print(1)'`` wall time: found the local
  server by itself (``$AGENT_VM_SOCKET``, its local token: the standard-library fast
  path of ``quick.py``), through ``--server`` (the full CLI), and without a server (a
  fresh clone from the golden state); one command at a time, 3 s apart so that the pool
  has refilled. Beside them in the same run: ``runsc do`` and ``bwrap`` running the same
  one-liner, and the raw limit: the same ``python3`` (and ``true``) executed through the
  API in a warm sandbox that stays, which no client can beat.

Prints tables and writes JSON (default bench/results/server-<time>.json).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from agent_vm import timeutil
from agent_vm.api.tokens import TokenStore
from agent_vm.config import load_settings
from bench import peers
from bench.stats import host_info, print_table, summary, write_json

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "agent_vm"]
ONE_LINER = ["python3", "-c", "print(1)"]
RECYCLE_EVERY = 20


def domains() -> set[str]:
    out = subprocess.run(["virsh", "list", "--all", "--name"], capture_output=True, text=True)
    return {name for name in out.stdout.split() if name.startswith("agentvm-")}


async def client_loop(
    number: int, socket: Path, token: str, until: float, out: dict[str, Any]
) -> None:
    transport = httpx.AsyncHTTPTransport(uds=str(socket))
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(
        transport=transport, base_url="http://agent-vm", headers=headers, timeout=300
    ) as http:
        sandbox: str | None = None
        done = 0
        try:
            while time.monotonic() < until:
                if sandbox is None:
                    started = time.perf_counter()
                    response = await http.post("/v1/sandboxes", json={"network": "isolated"})
                    if response.status_code != 201:
                        out["errors"].append(f"create: {response.status_code} {response.text}")
                        await asyncio.sleep(1)
                        continue
                    out["create"].append(time.perf_counter() - started)
                    sandbox = response.json()["id"]
                marker = f"{number}-{done}"
                started = time.perf_counter()
                response = await http.post(
                    f"/v1/sandboxes/{sandbox}/executions", params={"wait": True},
                    json={"cmd": ["echo", marker]},
                )  # fmt: skip
                elapsed = time.perf_counter() - started
                if response.status_code != 201:
                    out["errors"].append(f"exec: {response.status_code} {response.text}")
                    continue
                body = response.json()
                if body["stdout"] != f"{marker}\n" or body["exit"].get("exit_code") != 0:
                    out["mixed"].append({"wanted": marker, "got": body})
                out["exec"].append(elapsed)
                done += 1
                if done % RECYCLE_EVERY == 0:
                    await http.delete(f"/v1/sandboxes/{sandbox}")
                    sandbox = None
        finally:
            if sandbox is not None:
                await http.delete(f"/v1/sandboxes/{sandbox}")
    out["per_client"].append(done)


async def load(socket: Path, token: str, clients: int, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"exec": [], "create": [], "errors": [], "mixed": [], "per_client": []}
    until = time.monotonic() + seconds
    started = time.monotonic()
    await asyncio.gather(*(client_loop(n, socket, token, until, out) for n in range(clients)))
    out["wall"] = time.monotonic() - started
    return out


def time_cli(args: list[str], env: dict[str, str], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        time.sleep(3)  # the pool refills (on 2 cores a refill slows the command beside it)
        started = time.perf_counter()
        proc = subprocess.run([*CLI, "run", *args, "--", *ONE_LINER], env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        samples.append(time.perf_counter() - started)
        if proc.returncode != 0 or proc.stdout != "1\n":
            raise RuntimeError(f"agent-vm run {args} failed: {proc.stderr[-500:]}")
    return samples


def raw_limit(socket: Path, token: str, runs: int) -> dict[str, list[float]]:
    """Executions through the API in one warm sandbox: the floor under any client."""
    samples: dict[str, list[float]] = {"python3": [], "true": []}
    with httpx.Client(
        transport=httpx.HTTPTransport(uds=str(socket)), base_url="http://agent-vm",
        headers={"Authorization": f"Bearer {token}"}, timeout=120,
    ) as http:  # fmt: skip
        sandbox = http.post("/v1/sandboxes", json={}).json()["id"]
        try:
            time.sleep(5)
            for _ in range(runs):
                for label, argv in (("python3", ONE_LINER), ("true", ["true"])):
                    started = time.perf_counter()
                    done = http.post(f"/v1/sandboxes/{sandbox}/executions",
                                     params={"wait": True}, json={"cmd": argv}).json()  # fmt: skip
                    samples[label].append(time.perf_counter() - started)
                    if done["exit"].get("exit_code") != 0:
                        raise RuntimeError(f"{argv} failed in the warm sandbox: {done}")
        finally:
            http.delete(f"/v1/sandboxes/{sandbox}")
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5, help="CLI runs per way")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--skip-load", action="store_true", help="only the CLI comparison")
    args = parser.parse_args()
    settings = load_settings()
    store = TokenStore(settings.state_dir / "tokens.json")
    name = f"bench-{os.urandom(3).hex()}"
    _, token = store.create(name, max_sandboxes=args.clients + 4, max_executions=64)
    before = domains()
    workdir = Path(tempfile.mkdtemp(prefix="agent-vm-bench-"))
    socket = workdir / "api.sock"
    log = (workdir / "server.log").open("wb")
    server = subprocess.Popen(
        [*CLI, "serve", "--socket", str(socket), "--pool", f":light:isolated:{args.clients}:"
         f"{args.clients + 2}", "--pool", ":light:nat:2:3"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    env = {**os.environ, "AGENT_VM_TOKEN": token}
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket))) as probe:
                    if probe.get("http://agent-vm/healthz").status_code == 200:
                        break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((workdir / "server.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        time.sleep(10)  # let the pools fill before the clock starts
        loaded: dict[str, Any] = {"exec": [], "create": [], "errors": [], "mixed": [],
                                  "per_client": [], "wall": 1.0}  # fmt: skip
        if not args.skip_load:
            loaded = asyncio.run(load(socket, token, args.clients, args.seconds))
        no_token = {k: v for k, v in env.items() if k != "AGENT_VM_TOKEN"}
        found = time_cli([], {**no_token, "AGENT_VM_SOCKET": str(socket)}, args.runs)
        via_server = time_cli(["--server", str(socket)], env, args.runs)
        floor = raw_limit(socket, token, args.runs)
        local = time_cli([], {**no_token, "AGENT_VM_SOCKET": str(workdir / "none.sock")},
                         args.runs)  # fmt: skip
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=300)
        log.close()
        store.revoke(name)
    leaked = sorted(domains() - before)
    peer_rows = peers.measure(ONE_LINER, args.runs)
    executions = len(loaded["exec"])
    results: dict[str, Any] = {
        "host": host_info(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "load": {
            "executions": executions,
            "throughput_per_s": executions / loaded["wall"],
            "exec": summary(loaded["exec"]) if loaded["exec"] else None,
            "create": summary(loaded["create"]) if loaded["create"] else None,
            "errors": loaded["errors"][:20],
            "error_count": len(loaded["errors"]),
            "mixed_up": len(loaded["mixed"]),
            "per_client": loaded["per_client"],
            "leaked_domains": leaked,
            "server_exit_code": server.returncode,
        },
        "cli": {
            "local server found (fast path)": summary(found),
            "--server (full CLI)": summary(via_server),
            "no server (golden clone)": summary(local),
        },
        "raw_limit": {f"{k} in a warm sandbox (API)": summary(v) for k, v in floor.items()},
        "peers": peer_rows,
    }
    lr = results["load"]
    print_table(
        f"load: {args.clients} clients for {args.seconds:.0f} s ({executions} executions, "
        f"{lr['throughput_per_s']:.1f}/s; errors {lr['error_count']}, mixed up "
        f"{lr['mixed_up']}, leaked VMs {len(leaked)})",
        [("execute (wait=true)", lr["exec"], ""), ("create from the pool", lr["create"], "")],
    )
    rows = [(f"agent-vm run, {label}", data, "") for label, data in results["cli"].items()]
    rows += [(label, data, "raw limit") for label, data in results["raw_limit"].items()]
    for tool, data in peer_rows.items():
        rows.append((f"{tool} (same one-liner)", None if "error" in data else data,
                     data.get("error", "peer")))  # fmt: skip
    print_table("python3 -c 'print(1)', wall time per command", rows)
    out = args.out or ROOT / "bench" / "results" / f"server-{timeutil.now():%Y%m%d-%H%M%S}.json"
    write_json(out, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
