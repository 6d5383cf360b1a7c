"""Throughput and latency through the egress filter, with its limits in the same run.

    .venv/bin/python -m bench.network [--requests 50] [--downloads 5] [--mib 32]

Three clients talk to one test host in a network namespace (203.0.113.10, created and
removed here; no other address is ever contacted) and run the same stdlib client
(``bench/net_client.py``), timing on their own clock:

* **host, direct**: the host itself, no VM (the ceiling for this machine);
* **VM, raw libvirt NAT**: a VM on agent-vm's libvirt NAT network with a plain
  ``<interface type='bridge'>``, no nwfilter, address from libvirt's dnsmasq: what
  libvirt and QEMU give without our filter (the raw-libvirt limit);
* **VM, agent-vm filter**: a NAT_FILTERED sandbox with the default EgressPolicy.

Same image, same machine size, both VMs booted cold in this run and running together
while the three clients take turns (``--rounds``), so background noise hits all alike.
Prints tables and writes JSON (default bench/results/network-<time>.json).

gVisor is not a peer here: ``runsc do`` in the packaged version refuses networking
("cannot run with network enabled in root network namespace").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any

from tests.integration.testnet import TestHost

from agent_vm.config import load_settings
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.running import RunningVM
from agent_vm.execution.runtime import Runtime
from agent_vm.image.store import Image
from bench.pool import pool_cycles
from bench.stats import host_info, print_table, summary, write_json

TEST_HOST = "203.0.113.10"  # TEST-NET-3, only ever routed to the namespace below
CLIENT = Path(__file__).with_name("net_client.py")
CLIENTS = ("host, direct", "VM, raw libvirt NAT", "VM, agent-vm filter")


def job(args: argparse.Namespace) -> str:
    """One round's work; the clients take turns for ``args.rounds`` rounds."""
    return json.dumps(
        {
            "host": TEST_HOST,
            "http_port": 80,
            "tcp_port": 22,
            "download_bytes": args.mib << 20,
            "downloads": max(1, args.downloads // args.rounds),
            "requests": max(1, args.requests // args.rounds),
        }
    )


def merge(into: dict[str, list[float]], samples: dict[str, list[float]]) -> None:
    for metric, values in samples.items():
        into.setdefault(metric, []).extend(values)


def on_host(
    netbench: str, client: Path = CLIENT, var: str = "NETBENCH"
) -> dict[str, list[float]]:
    """Samples of ``client`` (a stdlib script reading its job from ``var``) on the host."""
    proc = subprocess.run(
        [sys.executable, str(client)],
        env={**os.environ, var: netbench},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"host client failed: {proc.stderr.strip()[-500:]}")
    samples: dict[str, list[float]] = json.loads(proc.stdout)
    return samples


async def in_vm(
    vm: RunningVM, netbench: str, client: Path = CLIENT, var: str = "NETBENCH"
) -> dict[str, list[float]]:
    """The same client's samples inside ``vm``."""
    result = await AgentExecutor().execute(
        vm, code=await asyncio.to_thread(client.read_text), env={var: netbench}, timeout=900
    )
    if result.exit_code != 0:
        failed = (result.stderr + result.stdout).strip()[-500:]
        raise RuntimeError(f"guest client in {vm.name} failed: {failed}")
    samples: dict[str, list[float]] = json.loads(result.stdout)
    return samples


async def starts(runtime: Runtime, image: Image, runs: int) -> dict[str, list[float]]:
    """What the network costs a sandbox start: clone from a golden state, ISOLATED vs
    NAT_FILTERED (address, ipset, nwfilter binding, interface set-up in the guest)."""
    out: dict[str, list[float]] = {}
    for mode in ("isolated", "nat"):
        mode_spec = runtime.spec(network=mode)
        await runtime.golden(image, mode_spec)
        samples = out.setdefault(f"start from golden, {mode_spec.network_mode.value}", [])
        for _ in range(runs):
            started = time.perf_counter()
            vm = await runtime.vm(image=image, spec=mode_spec)
            samples.append(time.perf_counter() - started)
            await vm.close()
    return out


async def measure(
    runtime: Runtime, image: Image, netbench: str, rounds: int, start_runs: int
) -> tuple[dict[str, dict[str, list[float]]], dict[str, list[float]]]:
    """Both VMs run at once and the three clients take turns, round after round, so that
    the machine's background noise falls on all of them alike."""
    out: dict[str, dict[str, list[float]]] = {client: {} for client in CLIENTS}
    async with runtime:
        guard = await runtime.guard()
        vms: list[RunningVM] = []
        try:
            # the baseline: a plain port on the same libvirt bridge, no filter at all
            raw_spec = runtime.spec(network=f"bridge:{guard.definition.bridge}")
            for vm_spec in (raw_spec, runtime.spec()):
                vms.append(await runtime.vm(image=image, spec=vm_spec, cold=True))
            for _ in range(rounds):
                merge(out[CLIENTS[0]], on_host(netbench))
                merge(out[CLIENTS[1]], await in_vm(vms[0], netbench))
                merge(out[CLIENTS[2]], await in_vm(vms[1], netbench))
        finally:
            for vm in vms:
                await vm.close()
        start = await starts(runtime, image, start_runs)
        # acquire/reset of NAT_FILTERED VMs (standby shells)
        nat = runtime.spec()
        cycles = await pool_cycles(runtime, image, nat, 3 * start_runs, "nat")
        for label, values in cycles.items():
            start[f"pool {label}, nat_filtered"] = values
    return out, start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--downloads", type=int, default=5)
    parser.add_argument("--mib", type=int, default=32, help="size of each download")
    parser.add_argument("--rounds", type=int, default=5, help="turns the clients take")
    parser.add_argument("--starts", type=int, default=5, help="sandbox starts per mode")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    # the sandbox resolver forwards to the test host, never to the host's resolvers
    settings = load_settings().model_copy(
        update={"dns_upstream": [f"{TEST_HOST}:53"], "network_public_subnets": ["203.0.113.0/24"]}
    )
    runtime = Runtime(settings)
    image = runtime.find_image()
    accel = runtime.accel
    test_host = TestHost(
        name="agvbench",
        host_side=IPv4Interface("203.0.113.1/24"),
        addresses=(IPv4Interface(f"{TEST_HOST}/24"),),
    )
    test_host.start()
    try:
        samples, start = asyncio.run(measure(runtime, image, job(args), args.rounds, args.starts))
    finally:
        test_host.stop()
    results: dict[str, Any] = {
        "host": {**host_info(), "accel": accel.reason},
        "image": image.key,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "results": {
            client: {metric: summary(values) for metric, values in data.items()}
            for client, data in samples.items()
        },
        "starts": {label: summary(values) for label, values in start.items()},
    }
    res = results["results"]
    raw, ours = res[CLIENTS[1]], res[CLIENTS[2]]
    for metric, title in (
        ("connect", "TCP connect (port 22)"),
        ("request", "HTTP GET /, new conn"),
    ):
        rows = [
            (client, res[client][metric], note)
            for client, note in zip(
                CLIENTS,
                (
                    "no VM: the ceiling",
                    "no nwfilter: the raw-libvirt limit",
                    f"{ours[metric]['p50'] / raw[metric]['p50']:.2f}x raw libvirt (p50)",
                ),
                strict=True,
            )
        ]
        print_table(f"{title} to the test host ({accel.accel.value})", rows)
    rows = [(client, res[client]["throughput_mb_s"], "") for client in CLIENTS]
    ratio = ours["throughput_mb_s"]["p50"] / raw["throughput_mb_s"]["p50"]
    rows[2] = (rows[2][0], rows[2][1], f"{ratio:.2f}x raw libvirt (p50)")
    print_table(
        f"download {args.mib} MiB over HTTP (MB/s, higher is better)",
        rows,
        fmt_value=lambda v: f"{v:.1f}",
    )
    print_table(
        "sandbox start and pool reset: what the network adds",
        [(label, data, "") for label, data in results["starts"].items()],
    )
    out = args.out or Path("bench/results") / f"network-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(out, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
