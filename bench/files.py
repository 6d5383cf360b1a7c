"""Getting a project in and results out: live share, files API, stdin, raw channel, cp.

    .venv/bin/python -m bench.files [--runs 3] [--acquires 10] [--mib 200]

One run, on one machine, measures side by side (the VM: profile "light", ISOLATED):

* **host ``cp``** of 1 x 200 MB and of 100 x 1 MB (page cache warm): the ceiling;
* **the live share**: the guest reading the workspace (``cat``), copying it onto its own
  disk, and writing into it (``cp`` from its disk), timed in the guest;
* **the files API** (``sb.files``): upload/download of the same files through the bulk
  lane (segments in the share's tmpfs, what ``sb.files`` uses) and through the control
  channel alone;
* **stdin** (what ``agent-vm run -i`` does): 200 MB into ``cat > file``;
* **the raw channel**: bytes through the virtio-serial port with no protocol, each
  direction on a VM of its own (``bench/rawchannel.py``);
* **acquire** from a warm pool with and without a workspace (``AsyncSandbox(pool=,
  workspace=)``: the idmapped mount, the guest's 9p mount, the quota's first walk).

Targets (issue 10): files API >= 50 % of the raw channel; the 200 MB upload >= 4x the
stdin path. Prints tables and writes JSON (default bench/results/files-<time>.json).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from agent_vm import logs, timeutil
from agent_vm.communication.files import FileService
from agent_vm.communication.workspace import Workspace
from agent_vm.config import load_settings
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.pool import VMPool
from agent_vm.execution.running import RunningVM
from agent_vm.execution.runtime import Runtime
from agent_vm.image.store import Image
from agent_vm.sandbox import AsyncSandbox
from agent_vm.sandbox.local import LocalSandbox
from bench import rawchannel
from bench.pool import until
from bench.stats import host_info, print_table, summary, write_json

ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000
SMALL = 100


def make_files(root: Path, mib: int) -> None:
    (root / "small").mkdir(parents=True)
    with (root / "big").open("wb") as out:
        for _ in range(mib):
            out.write(os.urandom(1 << 20))
    for i in range(SMALL):
        (root / "small" / str(i)).write_bytes(os.urandom(1 << 20))


def host_cp(source: Path, runs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"host cp 200 MB": [], "host cp 100 x 1 MB": []}
    with tempfile.TemporaryDirectory(dir=source.parent) as scratch:
        for _ in range(runs):
            for label, argv in (
                ("host cp 200 MB", ["cp", str(source / "big"), f"{scratch}/big"]),
                ("host cp 100 x 1 MB", ["cp", "-r", str(source / "small"), f"{scratch}/s"]),
            ):
                started = time.perf_counter()
                subprocess.run(argv, check=True)
                out[label].append(time.perf_counter() - started)
            shutil.rmtree(f"{scratch}/s")
    return out


GUEST_TIMER = """
t() { s=$(date +%s%N); "$@" || exit 1; e=$(date +%s%N); echo "$1 $(( (e - s) / 1000 ))"; }
rm -rf /root/in /workspace/out; mkdir -p /root/in /workspace/out
t sh -c 'cat /workspace/big > /dev/null'
t sh -c 'cat /workspace/small/* > /dev/null'
t sh -c 'cp /workspace/big /root/in/big'
t sh -c 'cp -r /workspace/small /root/in/small'
t sh -c 'cp /root/in/big /workspace/out/big'
t sh -c 'cp -r /root/in/small /workspace/out/small'
rm -rf /workspace/out /root/in
"""
SHARE_LABELS = [
    "share: guest reads 200 MB (cat)",
    "share: guest reads 100 x 1 MB (cat)",
    "share -> guest disk 200 MB (cp)",
    "share -> guest disk 100 x 1 MB (cp -r)",
    "guest disk -> share 200 MB (cp)",
    "guest disk -> share 100 x 1 MB (cp -r)",
]


async def live_share(vm: RunningVM, runs: int) -> dict[str, list[float]]:
    executor = AgentExecutor()
    out: dict[str, list[float]] = {label: [] for label in SHARE_LABELS}
    for _ in range(runs):
        result = await executor.execute(vm, GUEST_TIMER, timeout=600)
        if result.exit_code != 0:
            raise RuntimeError(f"live share run failed: {result.stderr[-300:]}")
        figures = [int(line.split()[-1]) / 1e6 for line in result.stdout.splitlines()]
        for label, seconds in zip(SHARE_LABELS, figures, strict=True):
            out[label].append(seconds)
    return out


async def files_api(vm: RunningVM, source: Path, runs: int, lane: str) -> dict[str, list[float]]:
    files = FileService(vm.channel, vm.staging if lane == "bulk lane" else None)
    out: dict[str, list[float]] = {}

    def note(label: str, started: float) -> None:
        out.setdefault(f"files API ({lane}): {label}", []).append(time.perf_counter() - started)

    with tempfile.TemporaryDirectory(dir=source.parent) as scratch:
        for _ in range(runs):
            started = time.perf_counter()
            await files.upload(source / "big", "/root/big")
            note("upload 200 MB", started)
            started = time.perf_counter()
            await files.download("/root/big", f"{scratch}/big")
            note("download 200 MB", started)
            started = time.perf_counter()
            for i in range(SMALL):
                await files.upload(source / "small" / str(i), f"/root/small/{i}")
            note("upload 100 x 1 MB", started)
            started = time.perf_counter()
            for i in range(SMALL):
                await files.download(f"/root/small/{i}", f"{scratch}/{i}")
            note("download 100 x 1 MB", started)
            if (Path(scratch) / "big").stat().st_size != (source / "big").stat().st_size:
                raise RuntimeError("the download is not the file uploaded")
            await files.remove("/root/small")
            await files.remove("/root/big")
    return out


async def stdin_path(vm: RunningVM, source: Path, runs: int) -> dict[str, list[float]]:
    """What ``agent-vm run -i -- sh -c 'cat > file'`` does, minus the VM's start."""
    data = (source / "big").read_bytes()
    executor = AgentExecutor()
    out: dict[str, list[float]] = {"stdin 200 MB (run -i)": []}
    for _ in range(runs):
        started = time.perf_counter()
        result = await executor.execute(vm, "cat > /root/stdin.bin", stdin=data, timeout=600)
        out["stdin 200 MB (run -i)"].append(time.perf_counter() - started)
        if result.exit_code != 0:
            raise RuntimeError(f"stdin run failed: {result.stderr[-300:]}")
        await executor.execute(vm, "rm -f /root/stdin.bin")
    return out


async def raw_ceiling(runtime: Runtime, image: Image, mib: int) -> dict[str, float]:
    """MB/s of the bare port, each direction on a fresh VM (the helper leaves its port
    half-used)."""
    out = {}
    logs.configure("ERROR")  # the host's reader reports the raw bytes as bad frames
    try:
        for direction, label in (("in", "host -> guest"), ("out", "guest -> host")):
            vm = await runtime.vm(image=image, spec=runtime.spec(network="isolated"))
            try:
                out[label] = await rawchannel.measure(vm, direction, mib * MB)
            finally:
                await vm.close()
    finally:
        logs.configure("WARNING")
    return out


async def acquires(runtime: Runtime, source: Path, runs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"acquire": [], "acquire + workspace": [], "detach": []}
    async with VMPool(min_size=2, max_size=3, runtime=runtime, network="isolated") as pool:
        for _ in range(runs):
            for label, workspace in (("acquire", None), ("acquire + workspace", source)):
                await until(lambda: pool.stats().idle >= 2 and pool.stats().starting == 0)
                sandbox = AsyncSandbox(pool=pool, workspace=workspace)
                started = time.perf_counter()
                await sandbox.start()
                out[label].append(time.perf_counter() - started)
                if workspace is not None:
                    started = time.perf_counter()
                    assert isinstance(sandbox.handle, LocalSandbox)
                    await sandbox.handle.vm.detach_workspace()
                    out["detach"].append(time.perf_counter() - started)
                await sandbox.kill()
    return out


async def measure(runtime: Runtime, image: Image, source: Path, args: argparse.Namespace) -> Any:
    results: dict[str, dict[str, list[float]]] = {}
    async with runtime:
        vm = await runtime.vm(image=image, spec=runtime.spec(network="isolated"))
        try:
            await vm.attach_workspace(Workspace(path=source))
            results["share"] = await live_share(vm, args.runs)
            await vm.detach_workspace()
            results["api"] = await files_api(vm, source, args.runs, "bulk lane")
            results["api"] |= await files_api(vm, source, args.runs, "channel")
            results["stdin"] = await stdin_path(vm, source, args.runs)
        finally:
            await vm.close()
        raw = await raw_ceiling(runtime, image, args.mib)
        results["acquire"] = await acquires(runtime, source, args.acquires)
    return results, raw


def rate(seconds: float, mb: float) -> str:
    return f"{mb / seconds:.1f} MB/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--acquires", type=int, default=10)
    parser.add_argument("--mib", type=int, default=200, help="size of the big file")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    settings = load_settings()
    runtime = Runtime(settings)
    image = runtime.find_image()
    scratch = Path(tempfile.mkdtemp(prefix="agentvm-bench-files-", dir="/var/tmp"))
    try:
        source = scratch / "project"
        make_files(source, args.mib)
        for path in (source, *source.rglob("*")):  # a project of a user of this host
            os.chown(path, 4242, 4242)
        cp = host_cp(source, args.runs)
        measured, raw = asyncio.run(measure(runtime, image, source, args))
    finally:
        shutil.rmtree(scratch)
    big = args.mib * (1 << 20) / MB
    small = SMALL * (1 << 20) / MB
    groups = {"cp": cp, **measured}
    results: dict[str, Any] = {
        "host": {**host_info(), "accel": runtime.accel.reason},
        "image": image.key,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "raw_channel_mb_s": raw,
        **{
            name: {label: summary(values) for label, values in group.items()}
            for name, group in groups.items()
        },
    }
    rows = []
    for name in ("cp", "share", "api", "stdin"):
        for label, data in results[name].items():
            size = big if "200 MB" in label else small
            rows.append((label, data, rate(data["p50"], size)))
    print_table(
        f"1 x {args.mib} MiB and 100 x 1 MiB in and out (p50 throughput, MB = 10^6 bytes)", rows
    )
    api = results["api"]
    stdin = results["stdin"]["stdin 200 MB (run -i)"]["p50"]
    upload = api["files API (bulk lane): upload 200 MB"]["p50"]
    download = api["files API (bulk lane): download 200 MB"]["p50"]
    up_rate, down_rate = big / upload, big / download
    print(
        f"raw channel: host -> guest {raw['host -> guest']:.1f} MB/s, "
        f"guest -> host {raw['guest -> host']:.1f} MB/s\n"
        f"files API upload {up_rate:.1f} MB/s = {up_rate / raw['host -> guest']:.0%} of raw "
        f"(target >= 50 %); download {down_rate:.1f} MB/s = "
        f"{down_rate / raw['guest -> host']:.0%} of raw\n"
        f"200 MB upload {stdin / upload:.1f}x faster than stdin (target >= 4x)"
    )
    acq = results["acquire"]
    print_table(
        "acquire from a warm pool, with and without a workspace",
        [(label, data, "") for label, data in acq.items()],
    )
    out = args.out or ROOT / "bench" / "results" / f"files-{timeutil.now():%Y%m%d-%H%M%S}.json"
    write_json(out, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
