"""Pause, resume, snapshot, fork and density, in one run, with peers' published figures.

    .venv/bin/python -m bench.lifecycle [--runs 3] [--density 100,300] [--ksm both]

What it measures (light profile, 512 MiB guests, NAT unless said):
* pause time against memory touched (a file of N MiB written in the guest: its page cache), as
  seconds per GiB of memory saved, and the disk a paused sandbox holds;
* resume time, as a ratio of a start from a golden state measured in the same run;
* fork of 1 and of 8 against 1 and 8 fresh starts (8 at once), and the host memory of a
  fork child (its QEMU's PSS) against a golden clone's;
* snapshot: the source's stand-still time and the disk a snapshot holds;
* density: sandboxes held from ``VMPool(min_size=N, max_size=N)`` (NAT), the fill time,
  and host memory per idle sandbox (MemAvailable's drop / N), without and with KSM. The
  fill stops early, and says so, when MemAvailable falls under 2 GiB.

Peers (their own published figures, not measured here): E2B pause ~4 s per GiB, resume
~1 s; CubeSandbox on KVM bare metal: pause 558 ms, resume 42 ms, clone 220 ms, 25.7 MB per
VM at 1,000 sandboxes. Writes JSON (default bench/results/lifecycle-<time>.json).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from agent_vm.config import load_settings
from agent_vm.execution.pool import VMPool
from agent_vm.execution.runtime import Runtime
from agent_vm.execution.suspend import disk_bytes
from agent_vm.host import ksm
from agent_vm.sandbox import AsyncSandbox
from bench.stats import host_info, print_table, summary, write_json

PEERS = {
    "E2B pause (per GiB)": "~4 s",
    "E2B resume": "~1 s",
    "CubeSandbox pause (KVM, bare metal)": "558 ms",
    "CubeSandbox resume": "42 ms",
    "CubeSandbox clone": "220 ms",
    "CubeSandbox memory per VM at 1,000": "25.7 MB",
}
FLOOR_MIB = 2048  # the density fill stops before MemAvailable falls under this


def available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


def pss_mib(pid: int | None) -> float:
    if pid is None:
        return 0.0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run_ok(sb: AsyncSandbox, cmd: str) -> str:
    result = await sb.commands.run(cmd, timeout=120)
    assert result.exit_code == 0, result.stderr
    return result.stdout


async def pause_resume(runtime: Runtime, touched: list[int], runs: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for mib in touched:
        for _ in range(runs):
            async with AsyncSandbox(runtime=runtime) as sb:
                if mib:
                    await run_ok(sb, f"head -c {mib}M /dev/urandom > /root/touched")  # page cache
                started = time.perf_counter()
                await sb.pause()
                paused = time.perf_counter() - started
                saved = runtime.settings.paused_dir / sb.sandbox_id
                held = disk_bytes(saved)
                memory = (saved / "memory.ram").stat().st_blocks * 512
                started = time.perf_counter()
                await sb.resume()
                resumed = time.perf_counter() - started
                await run_ok(sb, "true")
                rows.append({"touched_mib": mib, "pause_s": paused, "resume_s": resumed,
                             "paused_disk_bytes": held, "memory_bytes": memory})  # fmt: skip
    return {"rows": rows}


async def golden_starts(runtime: Runtime, runs: int) -> list[float]:
    spec = runtime.spec()
    await runtime.golden(await runtime.image(), spec)
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        vm = await runtime.vm(spec=spec)
        samples.append(time.perf_counter() - started)
        await vm.close()
    return samples


async def forks(runtime: Runtime, runs: int) -> dict[str, Any]:
    out: dict[str, Any] = {"fork 1": [], "fork 8": [], "fresh start 1": [], "fresh starts 8": []}
    memory: dict[str, list[float]] = {"fork child PSS MiB": [], "golden clone PSS MiB": []}
    snapshot: dict[str, list[float]] = {"snapshot stand-still": [], "snapshot disk MiB": []}
    spec = runtime.spec()
    for _ in range(runs):
        async with AsyncSandbox(runtime=runtime) as parent:
            await run_ok(parent, "head -c 64M /dev/urandom > /root/state")
            for count in (1, 8):
                started = time.perf_counter()
                children = await parent.fork(count)
                out[f"fork {count}"].append(time.perf_counter() - started)
                if count == 8:
                    await asyncio.sleep(5)
                    for child in children:
                        memory["fork child PSS MiB"].append(pss_mib(child.handle.vm.qemu_pid))  # type: ignore[attr-defined]
                for child in children:
                    await child.kill()
            name = f"bench-{time.time_ns()}"
            info = await parent.snapshot(name)
            snapshot["snapshot stand-still"].append(info.pause_seconds)
            snapshot["snapshot disk MiB"].append(info.disk_bytes / 2**20)
            await AsyncSandbox.remove_snapshot(name, runtime=runtime)
        started = time.perf_counter()
        vm = await runtime.vm(spec=spec)
        out["fresh start 1"].append(time.perf_counter() - started)
        await vm.close()
        started = time.perf_counter()
        vms = await asyncio.gather(*(runtime.vm(spec=spec) for _ in range(8)))
        out["fresh starts 8"].append(time.perf_counter() - started)
        await asyncio.sleep(5)
        memory["golden clone PSS MiB"] += [pss_mib(vm.qemu_pid) for vm in vms]
        await asyncio.gather(*(vm.close() for vm in vms))
    return {"timings": out, "memory": memory, "snapshot": snapshot}


async def density(runtime: Runtime, count: int, use_ksm: bool, per_vm_mib: float) -> dict[str, Any]:
    """``count`` held, or as many as fit above the floor at ``per_vm_mib`` each (the
    figure measured at the smaller count, plus a tenth): a pool waits for all it was
    asked for, and a host out of memory would kill what it should measure."""
    before = available_mib()
    fits = int((before - FLOOR_MIB) / (per_vm_mib * 1.1)) if per_vm_mib else count
    held = min(count, fits)
    started = time.perf_counter()
    if use_ksm:
        ksm.enable()
    try:
        async with VMPool(min_size=held, max_size=held, runtime=runtime, network="nat") as pool:
            held = pool.stats().idle
            fill = time.perf_counter() - started
            await asyncio.sleep(60 if use_ksm else 20)  # idle; KSM gets a few full scans
            after = available_mib()
    finally:
        if use_ksm:
            ksm.disable()
    return {
        "asked": count, "held": held, "ksm": use_ksm, "fill_s": round(fill, 1),
        "host_mib_per_sandbox": round((before - after) / max(held, 1), 1),
        "stopped_early": held < count,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--touched", default="0,128,256,384", help="MiB touched before pause")
    parser.add_argument("--density", default="100,300", help="sandboxes held ('' skips)")
    parser.add_argument("--ksm", choices=("off", "on", "both"), default="both")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    runtime = Runtime(load_settings())
    results: dict[str, Any] = {
        "host": {**host_info(), "accel": runtime.accel.reason},
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "peers_published": PEERS,
    }

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or Path(f"bench/results/lifecycle-{stamp}.json")

    async def measure() -> None:
        async with runtime:
            results["golden_start"] = await golden_starts(runtime, max(5, args.runs * 2))
            results["pause_resume"] = await pause_resume(
                runtime, [int(x) for x in args.touched.split(",")], args.runs
            )
            results["fork"] = await forks(runtime, args.runs)
            write_json(out, results)
            modes = {"off": [False], "on": [True], "both": [False, True]}[args.ksm]
            results["density"] = []
            measured: dict[bool, float] = {}
            for n in filter(None, args.density.split(",")):
                for k in modes:
                    row = await density(runtime, int(n), k, measured.get(k, 0.0))
                    measured.setdefault(k, row["host_mib_per_sandbox"])
                    results["density"].append(row)
                    write_json(out, results)

    asyncio.run(measure())
    report(results)
    write_json(out, results)


def report(results: dict[str, Any]) -> None:
    golden = summary(results["golden_start"])
    rows = results["pause_resume"]["rows"]
    table: list[tuple[str, dict[str, Any] | None, str]] = [
        ("start from golden state", golden, "the reference for resume"),
    ]
    for mib in sorted({r["touched_mib"] for r in rows}):
        mine = [r for r in rows if r["touched_mib"] == mib]
        pause = summary([r["pause_s"] for r in mine])
        held = sum(r["paused_disk_bytes"] for r in mine) / len(mine)
        saved = sum(r.get("memory_bytes", r["paused_disk_bytes"]) for r in mine) / len(mine)
        per_gib = pause["p50"] / max(saved / 2**30, 1e-9)
        note = (f"{saved / 2**20:.0f} MiB of memory saved, {held / 2**20:.0f} MiB on disk "
                f"with the disk; {per_gib:.1f} s per GiB saved")  # fmt: skip
        table.append((f"pause, {mib} MiB touched", pause, note))
        resume = summary([r["resume_s"] for r in mine])
        table.append((f"resume, {mib} MiB touched", resume,
                      f"{resume['p50'] / golden['p50']:.2f}x a golden start"))  # fmt: skip
    fork = results["fork"]
    one = summary(fork["timings"]["fresh start 1"])
    for name, samples in fork["timings"].items():
        data = summary(samples)
        table.append((name, data, f"{data['p50'] / one['p50']:.2f}x one fresh start"))
    for name, samples in {**fork["memory"], **fork["snapshot"]}.items():
        table.append((name, summary(samples), "MiB" if "MiB" in name else "seconds"))
    print_table("Pause, resume, fork, snapshot (light, NAT)", table,
                lambda v: f"{v:.3f}")  # fmt: skip
    for row in results.get("density", []):
        print(
            f"density: {row['held']}/{row['asked']} NAT sandboxes held, KSM "
            f"{'on' if row['ksm'] else 'off'}: {row['host_mib_per_sandbox']} MiB of host "
            f"memory each, filled in {row['fill_s']} s"
            + (
                " (fewer than asked: more would take MemAvailable under 2 GiB)"
                if row["stopped_early"]
                else ""
            )
        )
    for name, figure in PEERS.items():
        print(f"peer (published): {name}: {figure}")


if __name__ == "__main__":
    main()
