"""Cold boot and exec round trips, with the raw-QEMU floor and peers in the same run.

    .venv/bin/python -m bench.boot_exec [--boots 5] [--execs 50] [--scratch-build]

Prints a table and writes JSON (default bench/results/boot_exec-<time>.json).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from agent_vm.config import Settings, load_settings
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.runtime import Runtime
from agent_vm.image.store import Image
from bench import peers, rawqemu
from bench.stats import host_info, print_table, summary, write_json

COMMANDS = {"true": ["true"], "python3 -c pass": ["python3", "-c", "pass"]}


async def measure_agent_vm(
    settings: Settings, image: Image, boots: int, execs: int
) -> dict[str, Any]:
    executor = AgentExecutor()
    out: dict[str, list[float]] = {"boot": [], "boot_plus_true": []}
    async with Runtime(settings) as runtime:
        spec = runtime.spec(network="isolated")
        for i in range(boots):
            started = time.perf_counter()
            vm = await runtime.vm(image=image, spec=spec, cold=True)
            out["boot"].append(time.perf_counter() - started)
            try:
                await executor.execute(vm, ["true"])
                out["boot_plus_true"].append(time.perf_counter() - started)
                if i == 0:  # exec round trips on the first VM, after warm-up
                    for label, argv in COMMANDS.items():
                        for _ in range(3):
                            await executor.execute(vm, argv)
                        samples = []
                        runs = execs if label == "true" else max(10, execs // 3)
                        for _ in range(runs):
                            t = time.perf_counter()
                            result = await executor.execute(vm, argv)
                            samples.append(time.perf_counter() - t)
                            assert result.success, result
                        out[f"exec {label}"] = samples
            finally:
                closing = time.perf_counter()
                await vm.close()
                out.setdefault("destroy", []).append(time.perf_counter() - closing)
    return {k: summary(v) for k, v in out.items()}


async def measure_raw_qemu(image: Image, boots: int, cache_dir: Path) -> dict[str, Any]:
    marks: dict[str, list[float]] = {"init": [], "root": [], "ready": [], "bzimage_init": []}
    bzimage = rawqemu.packaged_bzimage(image, cache_dir)
    for _ in range(boots):
        for key, value in (await rawqemu.boot_once(image)).items():
            marks[key].append(value)
        if bzimage is not None:
            packaged = await rawqemu.boot_once(image, kernel=bzimage, until="init")
            marks["bzimage_init"].append(packaged["init"])
    return {k: summary(v) for k, v in marks.items() if v}


def measure_peers(runs: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tool, prefix in (("bwrap", peers.BWRAP), ("runsc", peers.RUNSC)):
        problem = peers.available(tool)
        for label, argv in COMMANDS.items():
            key = f"{tool} {label}"
            out[key] = (
                {"unavailable": problem}
                if problem
                else summary(peers.time_command(prefix, argv, runs))
            )
    return out


def measure_image_build(settings: Settings, scratch: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    started = time.perf_counter()
    Runtime(settings).build_image()
    out["cached"] = summary([time.perf_counter() - started])
    if scratch:
        with tempfile.TemporaryDirectory(prefix="agent-vm-scratch-", dir="/var/tmp") as tmp:
            fresh = settings.model_copy(update={"state_dir": Path(tmp)})
            started = time.perf_counter()
            Runtime(fresh).build_image()
            out["from_nothing"] = summary([time.perf_counter() - started])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--boots", type=int, default=5)
    parser.add_argument("--execs", type=int, default=50)
    parser.add_argument("--peer-runs", type=int, default=10)
    parser.add_argument("--scratch-build", action="store_true", help="also build from nothing")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    settings = load_settings()
    runtime = Runtime(settings)
    image = runtime.find_image()
    results: dict[str, Any] = {
        "host": {**host_info(), "accel": runtime.accel.reason},
        "image": {"key": image.key, "kernel": image.manifest.kernel_release},
        "config": vars(args) | {"out": str(args.out) if args.out else None},
    }
    results["image_build"] = measure_image_build(settings, args.scratch_build)
    results["raw_qemu"] = asyncio.run(measure_raw_qemu(image, args.boots, settings.build_cache_dir))
    results["agent_vm"] = asyncio.run(measure_agent_vm(settings, image, args.boots, args.execs))
    results["peers"] = measure_peers(args.peer_runs)

    ours, raw = results["agent_vm"], results["raw_qemu"]
    results["ratios"] = {
        "boot_p50 / raw_init_p50": ours["boot"]["p50"] / raw["init"]["p50"],
        "boot_p50 / raw_ready_p50": ours["boot"]["p50"] / raw["ready"]["p50"],
    }
    if "bzimage_init" in raw:
        results["ratios"]["boot_p50 / raw_bzimage_init_p50"] = (
            ours["boot"]["p50"] / raw["bzimage_init"]["p50"]
        )
    rows: list[tuple[str, dict[str, Any] | None, str]] = [
        ("raw QEMU: spawn -> initramfs /init", raw["init"], "floor for this kernel+initramfs"),
        ("raw QEMU: spawn -> root mounted", raw["root"], "before Python starts"),
        ("raw QEMU: spawn -> agent READY", raw["ready"], "same guest, no libvirt"),
        (
            "raw QEMU: packaged bzImage -> /init",
            raw.get("bzimage_init"),
            "same kernel as shipped (decompresses itself)",
        ),
        ("agent-vm: cold boot -> READY", ours["boot"], "overlay+define+start+handshake"),
        ("agent-vm: cold boot -> first `true`", ours["boot_plus_true"], ""),
        ("agent-vm: exec `true` (warm)", ours["exec true"], "round trip over virtio-serial"),
        ("agent-vm: exec `python3 -c pass`", ours["exec python3 -c pass"], ""),
        ("agent-vm: destroy + undefine + rm", ours["destroy"], ""),
    ]
    for key, data in results["peers"].items():
        note = data.get("unavailable", "fresh sandbox per command")
        rows.append((key, None if "unavailable" in data else data, note))
    for key, data in results["image_build"].items():
        rows.append((f"image build ({key.replace('_', ' ')})", data, ""))
    print_table(f"boot and exec ({results['host']['accel']})", rows)
    for name, value in results["ratios"].items():
        print(f"{name}: {value:.2f}x")
    out = args.out or Path("bench/results") / f"boot_exec-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(out, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
