"""Agent images: recipe builds, starts from golden vs the base image, a scripted task.

    .venv/bin/python -m bench.agents [--starts 5] [--tasks 3] [--no-build]

One run, on one machine, with a test host in a network namespace serving the scripted
model API (198.51.100.10 as ``api.allowed.test``; created and removed here; the
sandboxes resolve nothing else, and nothing else is contacted):

* **recipe builds** of the shipped ``claude`` and ``aider`` recipes from the base image
  (``--force``: apt, npm/PyPI, packing, the VM that writes the layer), and the same
  recipe again unchanged (the cache lookup: issue 11's target is <= 5 s);
* **start from golden** (``runtime.vm``, profile "standard", NAT_FILTERED) for the base
  image and for both agent images, interleaved round by round (target: an agent image
  within 1.2x of the base), with bubblewrap and ``runsc do`` starting ``true`` beside
  them (a fresh sandbox each, the peers' only mode) and agent-vm's cold boot (the
  no-golden limit);
* **a scripted task**: the agent edits one file of a workspace through its own tools,
  wall time from asking for a sandbox to the agent's exit, for Claude Code and Aider.

Prints tables and writes JSON (default bench/results/agents-<time>.json).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any

from tests.integration.agent_tasks import (
    AIDER_ARGS,
    AIDER_REPLY,
    CLAUDE_ARGS,
    CLAUDE_SCRIPT,
    EDITED,
    TEST_HOST_IP,
    control,
    project,
    run_agent,
)
from tests.integration.testnet import TestHost

from agent_vm import logs, timeutil
from agent_vm.config import load_settings
from agent_vm.execution.runtime import Runtime
from agent_vm.image.recipe import find_recipe
from agent_vm.image.store import Image
from bench import peers
from bench.stats import host_info, print_table, summary, write_json

ROOT = Path(__file__).resolve().parent.parent
AGENTS = ("claude", "aider")


async def builds(runtime: Runtime, force: bool, reuses: int) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {}
    for name in AGENTS:
        path = find_recipe(name).path
        samples = out.setdefault(name, {})
        if force:
            started = time.perf_counter()
            await runtime.build_recipe(path, force=True)
            samples["build"] = [time.perf_counter() - started]
        await runtime.build_recipe(path)  # built if it never was
        for _ in range(reuses):
            started = time.perf_counter()
            await runtime.build_recipe(path)
            samples.setdefault("reuse", []).append(time.perf_counter() - started)
    return out


async def starts(runtime: Runtime, images: dict[str, Image], rounds: int) -> dict[str, list[float]]:
    spec = runtime.spec(profile="standard")
    for image in images.values():
        await runtime.golden(image, spec)  # captured once, not timed
    out: dict[str, list[float]] = {}
    for _ in range(rounds):
        for label, image in images.items():
            started = time.perf_counter()
            vm = await runtime.vm(image=image, spec=spec)
            out.setdefault(label, []).append(time.perf_counter() - started)
            await vm.close()
    base = images["base"]
    for _ in range(max(1, rounds // 2)):
        started = time.perf_counter()
        vm = await runtime.vm(image=base, spec=spec, cold=True)
        out.setdefault("base, cold boot", []).append(time.perf_counter() - started)
        await vm.close()
    return out


async def tasks(runtime: Runtime, images: dict[str, Image], runs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    plans = {
        "claude": (CLAUDE_SCRIPT, CLAUDE_ARGS, "http://api.allowed.test"),
        "aider": (AIDER_REPLY, AIDER_ARGS, "http://api.allowed.test/v1"),
    }
    for _ in range(runs):
        for name, (script, args, url) in plans.items():
            with tempfile.TemporaryDirectory() as tmp:
                workspace = project(Path(tmp))
                control("/_script", script)
                started = time.perf_counter()
                code, out_text, err, _ = await run_agent(
                    runtime, images[name], name, args, workspace, "sk-bench", url
                )
                elapsed = time.perf_counter() - started
                if code != 0 or (workspace / "greet.py").read_text() != EDITED:
                    raise RuntimeError(
                        f"{name} did not do the task (exit {code}): {out_text[-300:]} {err[-500:]}"
                    )
                out.setdefault(name, []).append(elapsed)
    return out


async def measure(runtime: Runtime, args: argparse.Namespace) -> dict[str, Any]:
    async with runtime:
        built = await builds(runtime, force=args.build, reuses=3)
        images = {"base": await runtime.image()}
        for name in AGENTS:
            images[name] = await runtime.build_recipe(find_recipe(name).path)
        started = await starts(runtime, images, args.starts)
        done = await tasks(runtime, images, args.tasks)
    return {"builds": built, "starts": started, "tasks": done, "images": {
        label: {"key": image.key, "disk_bytes": image.manifest.sizes.get("rootfs.qcow2", 0)}
        for label, image in images.items()
    }}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--starts", type=int, default=5, help="starts per image")
    parser.add_argument("--tasks", type=int, default=3, help="scripted tasks per agent")
    parser.add_argument("--peer-runs", type=int, default=5)
    parser.add_argument(
        "--no-build", dest="build", action="store_false", help="skip the forced rebuilds"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logs.configure("warning")
    settings = load_settings().model_copy(
        update={
            "dns_upstream": [f"{TEST_HOST_IP}:53"],
            "network_public_subnets": ["198.51.100.0/24"],
        }
    )
    runtime = Runtime(settings)
    test_host = TestHost(
        name="agvbench2",
        host_side=IPv4Interface("198.51.100.1/24"),
        addresses=(IPv4Interface(f"{TEST_HOST_IP}/24"),),
        zone={"api.allowed.test": TEST_HOST_IP},
    )
    test_host.start()
    try:
        data = asyncio.run(measure(runtime, args))
    finally:
        test_host.stop()
    peer_rows = peers.measure(["true"], args.peer_runs)
    results: dict[str, Any] = {
        "host": {**host_info(), "accel": runtime.accel.reason},
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "images": data["images"],
        "builds": {
            name: {metric: summary(values) for metric, values in metrics.items()}
            for name, metrics in data["builds"].items()
        },
        "starts": {label: summary(values) for label, values in data["starts"].items()},
        "tasks": {name: summary(values) for name, values in data["tasks"].items()},
        "peers": peer_rows,
    }
    builds_rows = []
    for name, metrics in results["builds"].items():
        size = results["images"][name]["disk_bytes"] / 2**20
        if "build" in metrics:
            builds_rows.append(
                (f"{name}: build from the base", metrics["build"], f"layer {size:.0f} MiB")
            )
        builds_rows.append((f"{name}: unchanged recipe again", metrics["reuse"], "target <= 5 s"))
    print_table("recipe images", builds_rows)
    base = results["starts"]["base"]["p50"]
    start_rows = [
        (
            f"start from golden: {label}" if label in ("base", *AGENTS) else label,
            values,
            f"{values['p50'] / base:.2f}x base" + (" (target <= 1.2x)" if label in AGENTS else ""),
        )
        for label, values in results["starts"].items()
    ]
    for tool, data_or_error in peer_rows.items():
        if "error" in data_or_error:
            start_rows.append((f"{tool}: fresh sandbox, true", None, data_or_error["error"]))
        else:
            start_rows.append((f"{tool}: fresh sandbox, true", data_or_error, "peer"))
    print_table(f"sandbox starts ({runtime.accel.accel.value}, profile standard)", start_rows)
    print_table(
        "scripted task: the agent edits one file (sandbox start to agent exit)",
        [(name, values, "") for name, values in results["tasks"].items()],
    )
    out = args.out or ROOT / "bench" / "results" / f"agents-{timeutil.now():%Y%m%d-%H%M%S}.json"
    write_json(out, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
