"""What watching costs: a metrics scrape with 1, 4 and 8 sandboxes, and audit logging
per execution.

    .venv/bin/python -m bench.monitoring [--scrapes 30] [--executions 5000]

* **scrape**: ``MetricsCollector.scrape()`` (the text ``/metrics`` serves) over 1, 4 and 8
  running sandboxes (golden clones, ISOLATED), beside the raw limit in the same run: the
  one libvirt ``getAllDomainStats`` call inside it, and what one call per VM (the
  ``domainListGetStats`` of each domain alone) would cost instead.
* **audit**: the two lines an execution writes (``execution_started``,
  ``execution_finished``, with the fields the server gives them) through ``AuditLogger``
  into the state directory's file system, as shipped (fsync at most once a second), and
  with an fsync after every line for comparison. Target: < 1 ms per execution.

Prints tables and writes JSON (default bench/results/monitoring-<time>.json).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from agent_vm import timeutil
from agent_vm.config import load_settings
from agent_vm.execution.running import RunningVM
from agent_vm.execution.runtime import Runtime
from agent_vm.monitoring import audit
from agent_vm.monitoring.audit import AuditLogger
from agent_vm.monitoring.metrics import BULK_STATS, MetricsCollector, Sources, Target
from bench.stats import host_info, print_table, summary, write_json

ROOT = Path(__file__).resolve().parent.parent


def time_calls(call: Any, runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def measure_scrape(connection: Any, targets: list[Target], runs: int) -> dict[str, Any]:
    collector = MetricsCollector(Sources(connection=lambda: connection, targets=lambda: targets))
    domains = [connection.lookupByName(t.vm) for t in targets]

    def bulk() -> None:
        connection.getAllDomainStats(BULK_STATS)

    def per_vm() -> None:
        for domain in domains:
            connection.domainListGetStats([domain], BULK_STATS)

    return {
        "scrape": summary(time_calls(collector.scrape, runs)),
        "bulk_call": summary(time_calls(bulk, runs)),
        "per_vm_calls": summary(time_calls(per_vm, runs)),
        "bytes": len(collector.scrape()),
    }


async def scrapes(runtime: Runtime, runs: int) -> dict[str, Any]:
    vms: list[RunningVM] = []
    out: dict[str, Any] = {}
    try:
        spec = runtime.spec(profile="light", network="isolated")
        image = await runtime.image()
        for count in (1, 4, 8):
            while len(vms) < count:
                vms.append(await runtime.vm(image=image, spec=spec))
            await asyncio.sleep(2)
            targets = [Target(f"sb-{i}", vm.name, "bench") for i, vm in enumerate(vms)]
            out[str(count)] = measure_scrape(runtime.connection.connection, targets, runs)
    finally:
        for vm in vms:
            await vm.close()
    return out


def audit_cost(directory: Path, executions: int) -> dict[str, Any]:
    def run(path: Path) -> list[float]:
        logger = AuditLogger(path, max_bytes=64 << 20)
        samples = []
        for number in range(executions):
            started = time.perf_counter()
            logger.log("execution_started", sandbox="sb-0123456789ab",
                       execution=f"ex-{number:012x}", owner="a1b2c3d4", owner_name="ci",
                       command=["python3", "-c", "print(1)"], code_bytes=None,
                       env_keys=["HOME", "API_KEY"], cwd=None, user=None, timeout=60.0)  # fmt: skip
            logger.log("execution_finished", sandbox="sb-0123456789ab",
                       execution=f"ex-{number:012x}", owner="a1b2c3d4", outcome="ok",
                       exit_code=0, duration=0.1234, output_bytes=2, error=None)  # fmt: skip
            samples.append(time.perf_counter() - started)
        logger.close()
        if not audit.verify(path).ok:
            raise RuntimeError(f"the benchmark's own audit log does not verify: {path}")
        return samples

    shipped = run(directory / "shipped" / "audit.log")
    every_line = audit.FSYNC_INTERVAL
    try:
        audit.FSYNC_INTERVAL = 0.0  # an fsync after every line, for comparison
        synced = run(directory / "synced" / "audit.log")
    finally:
        audit.FSYNC_INTERVAL = every_line
    return {"shipped": summary(shipped), "fsync_every_line": summary(synced)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scrapes", type=int, default=30)
    parser.add_argument("--executions", type=int, default=5000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    settings = load_settings()

    async def measure() -> dict[str, Any]:
        runtime = Runtime(settings)
        await runtime.start()
        try:
            return await scrapes(runtime, args.scrapes)
        finally:
            await runtime.close()

    scraped = asyncio.run(measure())
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=settings.state_dir, prefix="bench-audit-") as tmp:
        audited = audit_cost(Path(tmp), args.executions)
    results = {"host": host_info(), "config": {k: v for k, v in vars(args).items() if k != "out"},
               "scrape": scraped, "audit": audited}  # fmt: skip
    rows = []
    for count, data in scraped.items():
        rows.append((f"scrape, {count} sandboxes ({data['bytes']} bytes)", data["scrape"], ""))
        rows.append((f"  getAllDomainStats alone, {count}", data["bulk_call"], "raw limit"))
        rows.append((f"  one call per VM instead, {count}", data["per_vm_calls"], "peer"))
    print_table("metrics: cost of one scrape", rows)
    print_table(f"audit: cost per execution (2 lines), {args.executions} executions", [
        ("as shipped (fsync at most 1/s)", audited["shipped"], "target < 1 ms"),
        ("fsync after every line", audited["fsync_every_line"], "comparison"),
    ])  # fmt: skip
    out = args.out or ROOT / "bench" / "results" / f"monitoring-{timeutil.now():%Y%m%d-%H%M%S}.json"
    write_json(out, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
