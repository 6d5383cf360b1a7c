"""Pool, reset and golden-state start, with the reset mechanisms and peers in one run.

    .venv/bin/python -m bench.pool [--runs 10] [--cycles 30] [--throughput-seconds 30]

Prints tables and writes JSON (default bench/results/pool-<time>.json).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent_vm.config import load_settings
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.pool import VMPool
from agent_vm.execution.runtime import Runtime
from agent_vm.execution.spec import MachineSpec
from agent_vm.image.store import Image
from agent_vm.sandbox import AsyncSandbox
from bench import mechanisms, peers
from bench.stats import host_info, print_table, summary, write_json

ONE_LINER = ["python3", "-c", "print(sum(range(1000)))"]


async def until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            raise TimeoutError("benchmark condition not reached")
        await asyncio.sleep(0.002)


async def pool_cycles(
    runtime: Runtime, image: Image, spec: MachineSpec, cycles: int, network: str = "isolated"
) -> dict[str, list[float]]:
    """acquire from a warm pool; the release call; and reset, timed on a pool of exactly one
    VM (release it, then wait until its clean replacement is idle: nothing is reused).
    ``network`` is the pools' network choice ("isolated", "nat")."""
    out: dict[str, list[float]] = {"acquire": [], "release call": [], "reset": []}
    executor = AgentExecutor()
    async with VMPool(min_size=2, max_size=3, runtime=runtime, network=network) as pool:
        for _ in range(cycles):
            await until(lambda: pool.stats().idle >= 2 and pool.stats().starting == 0)
            started = time.perf_counter()
            vm = await pool.acquire(timeout=60)
            out["acquire"].append(time.perf_counter() - started)
            await executor.execute(vm, "echo used > /root/mark")
            released = time.perf_counter()
            await pool.release(vm)
            out["release call"].append(time.perf_counter() - released)
    async with VMPool(min_size=1, max_size=1, runtime=runtime, network=network) as one:
        for _ in range(max(5, cycles // 3)):
            await until(
                lambda: (
                    one.stats().idle == 1
                    and one.stats().starting == 0
                    and one.stats().standby == one.standby
                )
            )
            vm = await one.acquire(timeout=60)
            await executor.execute(vm, "echo used > /root/mark")
            released = time.perf_counter()
            await one.release(vm)
            await until(lambda: one.stats().idle == 1)
            out["reset"].append(time.perf_counter() - released)
    return out


async def starts(
    runtime: Runtime, image: Image, spec: MachineSpec, runs: int, cold_runs: int
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"start from golden": [], "cold boot": []}
    await runtime.golden(image, spec)
    for _ in range(runs):
        started = time.perf_counter()
        vm = await runtime.vm(image=image, spec=spec)
        out["start from golden"].append(time.perf_counter() - started)
        await vm.close()
    for _ in range(cold_runs):
        started = time.perf_counter()
        vm = await runtime.vm(image=image, spec=spec, cold=True)
        out["cold boot"].append(time.perf_counter() - started)
        await vm.close()
    mech = await mechanisms.snapshot_mechanisms(runtime, image, spec, max(3, cold_runs))
    out.update(mech)
    out.update(await mechanisms.raw_clones(image, runs))
    return out


async def one_liners(
    runtime: Runtime, image: Image, spec: MachineSpec, runs: int
) -> dict[str, list[float]]:
    """Fresh sandbox + Python one-liner + gone: agent-vm (fresh and pooled) vs peers."""
    out: dict[str, list[float]] = {"agent-vm fresh sandbox": [], "agent-vm pooled sandbox": []}
    for _ in range(runs):
        started = time.perf_counter()
        sandbox = await AsyncSandbox.create(settings=runtime.settings)
        result = await sandbox.commands.run(ONE_LINER)
        assert result.stdout == "499500\n", result
        await sandbox.kill()
        out["agent-vm fresh sandbox"].append(time.perf_counter() - started)
    async with VMPool(min_size=2, max_size=3, runtime=runtime, network="isolated") as pool:
        for _ in range(runs):
            await until(lambda: pool.stats().idle >= 2 and pool.stats().starting == 0)
            started = time.perf_counter()
            async with AsyncSandbox(pool=pool) as sandbox:
                await sandbox.commands.run(ONE_LINER)
            out["agent-vm pooled sandbox"].append(time.perf_counter() - started)
    for tool, prefix in (("bwrap", peers.BWRAP), ("runsc do", peers.RUNSC)):
        if peers.available(tool.split()[0]) is None:
            out[tool] = peers.time_command(prefix, ONE_LINER, runs)
    return out


async def throughput(
    runtime: Runtime, image: Image, spec: MachineSpec, sizes: list[int], seconds: float
) -> dict[str, float]:
    """Executions per minute: N workers, pool of N, acquire -> one-liner -> release."""
    out: dict[str, float] = {}
    executor = AgentExecutor()
    for size in sizes:
        async with VMPool(
            min_size=size, max_size=size, runtime=runtime, network="isolated"
        ) as pool:
            done = 0
            deadline = time.perf_counter() + seconds

            async def worker(pool: VMPool = pool, deadline: float = deadline) -> None:
                nonlocal done
                while time.perf_counter() < deadline:
                    vm = await pool.acquire(timeout=120)
                    result = await executor.execute(vm, ONE_LINER)
                    await pool.release(vm)
                    done += result.success

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(size)))
            out[f"pool of {size}"] = done / (time.perf_counter() - started) * 60
    return out


async def memory(runtime: Runtime, image: Image, spec: MachineSpec) -> dict[str, Any]:
    """QEMU memory of idle pooled VMs (the RAM file is shared copy-on-write)."""
    async with VMPool(min_size=3, max_size=3, runtime=runtime, network="isolated") as pool:
        await asyncio.sleep(3)  # let the clones go idle
        rows = []
        for entry in list(pool._idle):
            assert entry.vm.qemu_pid is not None
            rollup = _kib(_read(Path(f"/proc/{entry.vm.qemu_pid}/smaps_rollup")))
            rows.append(
                {
                    "rss_mib": rollup["Rss"] / 1024,
                    "pss_mib": rollup["Pss"] / 1024,
                    "private_mib": (rollup["Private_Clean"] + rollup["Private_Dirty"]) / 1024,
                }
            )
    return {"guest_ram_mib": spec.profile.memory_mib, "idle_vms": rows}


def _read(path: Path) -> str:
    return path.read_text()


def _kib(text: str) -> dict[str, int]:
    values = {}
    for line in text.splitlines()[1:]:
        key, _, rest = line.partition(":")
        values[key.strip()] = int(rest.split()[0])
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=30)
    parser.add_argument("--throughput-seconds", type=float, default=30.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    runtime = Runtime(load_settings())
    image = runtime.find_image()
    spec = runtime.spec(network="isolated")
    results: dict[str, Any] = {
        "host": {**host_info(), "accel": runtime.accel.reason},
        "image": image.key,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
    }

    async def measure() -> tuple[Any, ...]:
        async with runtime:
            return (
                await pool_cycles(runtime, image, spec, args.cycles),
                await starts(runtime, image, spec, args.runs, args.cold_runs),
                await one_liners(runtime, image, spec, args.runs),
                await throughput(runtime, image, spec, [1, 2, 4], args.throughput_seconds),
                await memory(runtime, image, spec),
            )

    pool, start, liners, per_minute, mem = asyncio.run(measure())
    raw = summary(start["raw QEMU clone: spawn -> READY"])["p50"]
    summaries = {k: summary(v) for k, v in {**pool, **start, **liners}.items() if v}
    results.update(
        {
            "timings": summaries,
            "ratio_to_raw_clone_p50": {k: v["p50"] / raw for k, v in summaries.items()},
            "executions_per_minute": per_minute,
            "memory": mem,
        }
    )
    order = [
        ("acquire", "pool of 2-3, warm"),
        ("release call", "what the caller waits for"),
        ("reset", "release -> clean replacement idle (background)"),
        ("start from golden", "clone via libvirt + CONFIGURE"),
        ("raw QEMU clone: spawn -> running", "the primitive, no libvirt"),
        ("raw QEMU clone: spawn -> READY", "raw primitive limit"),
        ("QMP loadvm (in-process)", "internal snapshot, same QEMU"),
        ("libvirt restore (save file on tmpfs)", "new QEMU loads all RAM"),
        ("libvirt snapshot-revert", "libvirt restarts QEMU"),
        ("cold boot", "kernel boot to READY"),
        ("agent-vm fresh sandbox", "create + one-liner + kill"),
        ("agent-vm pooled sandbox", "acquire + one-liner + release"),
        ("bwrap", "fresh sandbox + one-liner"),
        ("runsc do", "fresh sandbox + one-liner"),
    ]
    rows = [
        (name, summaries.get(name), f"{note} ({summaries[name]['p50'] / raw:.2f}x raw)")
        if name in summaries
        else (name, None, "not measured")
        for name, note in order
    ]
    print_table(f"pool, reset and start ({results['host']['accel']})", rows)
    for name, value in per_minute.items():
        print(f"executions per minute, {name}: {value:.0f}")
    for i, row in enumerate(mem["idle_vms"]):
        print(
            f"idle pooled VM {i}: RSS {row['rss_mib']:.0f} MiB, PSS {row['pss_mib']:.0f} MiB, "
            f"private {row['private_mib']:.0f} MiB (guest RAM {mem['guest_ram_mib']} MiB)"
        )
    out = args.out or Path("bench/results") / f"pool-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(out, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
