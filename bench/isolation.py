"""What isolation costs: the filtered network at start, the CLI against gVisor, the limits.

    .venv/bin/python -m bench.isolation [--runs 10] [--soak 150] [--mib 32]

One run, on one machine, measures side by side:

* **start from golden**, ISOLATED vs NAT_FILTERED (address, per-VM filter chains, ipsets,
  interface set-up in the guest): what the network adds to a start;
* **`agent-vm run -- python3 -c 'print(1)'`**, the whole CLI process (nat and isolated),
  against ``runsc do`` and ``bwrap`` running the same line, interleaved run by run;
* **the limits** (CPU quota, memory cap, disk throttle and size cap): ``true`` round trip
  and a 32 MiB HTTP download from a test host in a network namespace (203.0.113.10,
  created and removed here; nothing else is contacted), each in a VM with the default
  profile and in one with ``ResourceProfile.unlimited()``, both running at once;
* **a pool soak** of NAT_FILTERED acquire/release cycles, counting the guard's
  ``egress_rules_vanished`` warnings (there must be none: a live VM's rules do not go away).

Prints tables and writes JSON (default bench/results/isolation-<time>.json).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import time
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs
from tests.integration.testnet import TestHost

from agent_vm.config import load_settings
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.runtime import Runtime
from agent_vm.image.store import Image
from bench import network, peers
from bench.pool import pool_cycles
from bench.stats import host_info, print_table, summary, write_json

ROOT = Path(__file__).resolve().parent.parent
ONE_LINER = ["python3", "-c", "print(1)"]


def cli_runs(runs: int) -> dict[str, list[float]]:
    """The CLI as a user types it, and the peers' one-shot sandboxes, turn by turn."""
    cli = str(ROOT / "agent-vm")
    commands: dict[str, list[str]] = {
        "agent-vm run (nat)": [cli, "run", "--", *ONE_LINER],
        "agent-vm run --network isolated": [cli, "run", "--network", "isolated", "--", *ONE_LINER],
    }
    for tool, prefix in (("runsc do", peers.RUNSC), ("bwrap", peers.BWRAP)):
        if peers.available(tool.split()[0]) is None:
            commands[tool] = prefix + ONE_LINER
    for argv in commands.values():  # first use creates golden states: not measured
        subprocess.run(argv, capture_output=True, timeout=300, check=True, env=peers.ENV)
    out: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(runs):
        for label, argv in commands.items():
            started = time.perf_counter()
            proc = subprocess.run(argv, capture_output=True, timeout=120, env=peers.ENV)
            out[label].append(time.perf_counter() - started)
            if proc.returncode != 0 or proc.stdout != b"1\n":
                raise RuntimeError(f"{label} failed: {proc.stderr.decode()[-300:]}")
    return out


async def limit_costs(
    runtime: Runtime, image: Image, runs: int, mib: int
) -> dict[str, list[float]]:
    """Two VMs, same hardware, one with the host's limits and one without, running at once;
    they take turns so background noise falls on both."""
    limited = runtime.spec()
    unlimited = limited.model_copy(update={"profile": limited.profile.unlimited()})
    vms = {}
    out: dict[str, list[float]] = {}
    netbench = network.job(argparse.Namespace(mib=mib, downloads=runs, requests=1, rounds=runs))
    try:
        for label, spec in (("limits on", limited), ("unlimited", unlimited)):
            vms[label] = await runtime.vm(image=image, spec=spec)
        executor = AgentExecutor()
        for _ in range(runs):
            for label, vm in vms.items():
                for _ in range(10):
                    started = time.perf_counter()
                    await executor.execute(vm, ["true"])
                    out.setdefault(f"true round trip, {label}", []).append(
                        time.perf_counter() - started
                    )
                samples = await network.in_vm(vm, netbench)
                out.setdefault(f"download {mib} MiB (MB/s), {label}", []).extend(
                    samples["throughput_mb_s"]
                )
    finally:
        for vm in vms.values():
            await vm.close()
    return out


async def soak(runtime: Runtime, image: Image, cycles: int) -> tuple[dict[str, list[float]], int]:
    with capture_logs() as events:
        cycles_out = await pool_cycles(runtime, image, runtime.spec(), cycles, "nat")
    vanished = sum(1 for event in events if event.get("event") == "egress_rules_vanished")
    return cycles_out, vanished


async def measure(
    runtime: Runtime, image: Image, args: argparse.Namespace
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]], int]:
    async with runtime:
        starts = await network.starts(runtime, image, args.runs)
        limits = await limit_costs(runtime, image, args.runs, args.mib)
        cycles, vanished = await soak(runtime, image, args.soak)
    return starts, limits, cycles, vanished


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--soak", type=int, default=150, help="pool acquire/release cycles")
    parser.add_argument("--mib", type=int, default=32, help="size of each download")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    settings = load_settings().model_copy(
        update={
            "dns_upstream": [f"{network.TEST_HOST}:53"],
            "network_public_subnets": ["203.0.113.0/24"],
        }
    )
    runtime = Runtime(settings)
    image = runtime.find_image()
    test_host = TestHost(
        name="agvbench",
        host_side=IPv4Interface("203.0.113.1/24"),
        addresses=(IPv4Interface(f"{network.TEST_HOST}/24"),),
    )
    test_host.start()
    try:
        starts, limits, cycles, vanished = asyncio.run(measure(runtime, image, args))
    finally:
        test_host.stop()
    cli = cli_runs(args.runs)
    results: dict[str, Any] = {
        "host": {**host_info(), "accel": runtime.accel.reason},
        "image": image.key,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "starts": {label: summary(values) for label, values in starts.items()},
        "cli": {label: summary(values) for label, values in cli.items()},
        "limits": {label: summary(values) for label, values in limits.items()},
        "soak": {
            "cycles": args.soak,
            "egress_rules_vanished": vanished,
            **{label: summary(values) for label, values in cycles.items()},
        },
    }
    s = results["starts"]
    iso, nat = s["start from golden, isolated"], s["start from golden, nat_filtered"]
    delta = nat["p50"] - iso["p50"]
    print_table(
        "start from golden: what the filtered network adds (target <= +0.25 s)",
        [
            ("isolated", iso, ""),
            ("nat_filtered", nat, f"+{delta * 1000:.0f} ms p50"),
        ],
    )
    c = results["cli"]
    runsc = c.get("runsc do")
    print_table(
        "agent-vm run -- python3 -c 'print(1)' vs peers (whole process; target <= runsc do)",
        [
            (
                label,
                data,
                f"{data['p50'] / runsc['p50']:.2f}x runsc do (p50)" if runsc else "",
            )
            for label, data in c.items()
        ],
    )
    lim = results["limits"]
    rows = []
    for label in lim:
        note = ""
        if label.endswith("limits on"):
            other = lim[label.replace("limits on", "unlimited")]
            note = f"{lim[label]['p50'] / other['p50']:.2f}x unlimited (p50)"
        rows.append((label, lim[label], note))
    print_table(
        "cost of the limits (download rows are MB/s)",
        rows,
        fmt_value=lambda v: f"{v * 1000:.1f} ms" if v < 1 else f"{v:.1f}",
    )
    print_table(
        f"NAT_FILTERED pool soak, {args.soak} cycles: egress_rules_vanished = {vanished}",
        [(label, data, "") for label, data in results["soak"].items() if isinstance(data, dict)],
    )
    out = args.out or Path("bench/results") / f"isolation-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(out, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
