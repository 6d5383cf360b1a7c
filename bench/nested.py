"""agent-vm's KVM path, proven on a host without hardware virtualization: nested under TCG.

    .venv/bin/python -m bench.nested [--suite bookworm|trixie] [--no-tcg] [--json FILE]

This host (L0) runs L1, a VM from a *nested host* image: a recipe (written here from the
host package list and pyproject.toml) with QEMU, libvirt, agent-vm's dependencies and the
guest kernel's whole module tree, ``kvm_amd``/``kvm_intel`` loaded at boot. TCG's
``-cpu max`` exposes AMD SVM with nested paging, so L1 gets a real ``/dev/kvm``. L1
installs agent-vm from this checkout (a wheel), takes this host's base image, and runs
``bench/nested_probe.py``: agent-vm's own accelerator probe must pick KVM, and L2 VMs run
under it (golden capture and clones, ``agent-vm run``, a pool cycle, the egress policy
against a test host in one of L1's namespaces, resource limits). The same golden capture
and clones forced to TCG inside L1 are measured beside it (TCG inside TCG: for
information, not a speed claim). ``--suite trixie`` makes L1 a Debian 13 host (QEMU 10,
libvirt 11) on this host's kernel.

Prints a table and writes JSON (default bench/results/nested-<suite>-<time>.json). L1
has no network: nothing leaves this machine after the image builds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from agent_vm.communication.workspace import Workspace
from agent_vm.config import Settings, load_settings
from agent_vm.core.template import ResourceProfile
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.running import RunningVM
from agent_vm.execution.runtime import Runtime
from agent_vm.host.packages import required_packages
from agent_vm.image.store import Image
from bench.stats import host_info, write_json

REPO = Path(__file__).resolve().parents[1]
VENV = "/opt/agent-vm-host/venv"
AGENT_VM = f"{VENV}/bin/agent-vm"
# what L1 needs of the checkout besides the wheel: the probe and the test host helpers
REPO_FILES = [
    "bench/__init__.py",
    "bench/nested_probe.py",
    "tests/__init__.py",
    "tests/integration/__init__.py",
    "tests/integration/testnet.py",
    "tests/integration/testhost_server.py",
]
L1_PROFILE = ResourceProfile(vcpu=2, memory_mib=6144, disk_gib=12)
PROBE_TIMEOUT = 1200.0  # the KVM probe takes ~3.5 min; L1 can lock up (see the test)
# TCG inside TCG: the L2 kernel reaches init after ~3 min of guest time
TCG_ENV = "AGENT_VM_BOOT_TIMEOUT=1200"

Progress = Callable[[str], None]


def _say(message: str) -> None:
    print(f"nested: {message}", file=sys.stderr, flush=True)


def host_dependencies() -> list[str]:
    """agent-vm's Python dependencies for a host that serves (pyproject.toml's)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = [*project["dependencies"], *extras["host"], *extras["server"]]
    return sorted({spec for spec in wanted if not spec.startswith("agent-vm")})


def recipe_text(suite: str) -> str:
    """The nested host's recipe: this host's package list, agent-vm's dependencies in a
    venv, and the guest kernel's modules (KVM at boot, the rest on demand)."""
    apt = [p.name for p in required_packages("core")]
    return "\n".join(
        [
            f'name = "nested-host-{suite}"',
            f'description = "an agent-vm host inside agent-vm ({suite}), for the KVM path"',
            f'run = ["{VENV}/bin/python -c \\"import libvirt, pydantic, fastapi\\""]',
            "[apt]",
            f"packages = {json.dumps(apt)}",
            "[pip]",
            f'venv = "{VENV}"',
            f"packages = {json.dumps(host_dependencies())}",
            "[kernel]",
            'modules = ["kvm_amd", "kvm_intel"]',
            "all_modules = true",
            "",
        ]
    )


def settings_for(suite: str, base: Settings) -> Settings:
    """This host's settings, with a base image of ``suite`` when it is not the host's."""
    from agent_vm.image.mirror import detect_distro

    if suite == detect_distro().codename:
        return base
    return base.model_copy(update={"image": f"base-{suite}", "suite": suite})


async def nested_image(suite: str, settings: Settings, progress: Progress) -> str:
    work = settings.build_cache_dir / "nested"
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / f"nested-host-{suite}.toml"
    recipe.write_text(recipe_text(suite))
    async with Runtime(settings_for(suite, settings)) as runtime:
        image = await runtime.build_recipe(recipe, progress=progress)
    return image.name


def stage(settings: Settings, l2_image: Image, progress: Progress) -> Path:
    """What L1 gets through its read-only workspace: the wheel, the L2 image, the probe."""
    root = settings.build_cache_dir / "nested" / "stage"
    shutil.rmtree(root, ignore_errors=True)
    (root / "wheel").mkdir(parents=True)
    progress("building the agent-vm wheel from this checkout")
    house = REPO / ".venv" / "wheelhouse"  # setuptools and wheel, offline (run-tests makes it)
    offline = ["--no-index", "--find-links", str(house)] if house.is_dir() else []
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *offline,
         "-w", str(root / "wheel"), str(REPO)],
        check=False, capture_output=True, text=True,
    )  # fmt: skip
    if built.returncode != 0:
        raise RuntimeError(f"pip wheel of the checkout failed: {built.stderr.strip()[-2000:]}")
    image_dir = root / "image" / l2_image.key
    image_dir.mkdir(parents=True)
    for item in l2_image.path.iterdir():
        shutil.copyfile(item, image_dir / item.name)
    for rel in REPO_FILES:
        (root / "repo" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / rel, root / "repo" / rel)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    root.chmod(0o755)
    return root


async def sh(vm: RunningVM, script: str, timeout: float = 900) -> tuple[int, str, str]:
    result = await AgentExecutor().execute(vm, script, timeout=timeout, user="root")
    return result.exit_code, result.stdout, result.stderr


async def inside(vm: RunningVM, l2_image: Image, tcg: bool, progress: Progress) -> dict[str, Any]:
    out: dict[str, Any] = {}

    async def step(label: str, script: str, timeout: float = 900, must: bool = False) -> str:
        """``script``'s output; a failure is recorded (and ends the run when ``must``)."""
        progress(label)
        started = time.perf_counter()
        code, stdout, stderr = await sh(vm, script, timeout)
        out.setdefault("l1_step_s", {})[label] = round(time.perf_counter() - started, 1)
        if code != 0:
            failure = f"exit {code}: {(stdout + stderr)[-3000:]}"
            out.setdefault("failures", {})[label] = failure
            if must:
                raise RuntimeError(f"L1: {label} failed ({failure})")
        return stdout

    images = "/var/lib/agent-vm/images/default"
    wheel = "/workspace/wheel/*.whl"
    await step(
        "install agent-vm from the wheel", f"{VENV}/bin/pip install -q --no-deps {wheel}", must=True
    )
    await step("copy this host's image in",
               f"mkdir -p {images} && cp -r /workspace/image/{l2_image.key} {images}/ && "
               f"ln -sfn {l2_image.key} {images}/current", must=True)  # fmt: skip
    out["l1_kernel"] = (await step("uname", "uname -r; grep -c -w svm /proc/cpuinfo")).split()
    out["l1_kvm_messages"] = await step("kvm messages", "dmesg | grep -i -E 'kvm|svm' || true")
    out["doctor"] = await step("agent-vm doctor", f"COLUMNS=150 {AGENT_VM} doctor 2>&1")
    probe = f"{VENV}/bin/python /workspace/repo/bench/nested_probe.py --repo /workspace/repo"
    raw = await step("probe under KVM (agent-vm's own choice)", probe + " --full", PROBE_TIMEOUT,
                     must=True)  # fmt: skip
    out["kvm"] = json.loads(raw.strip().splitlines()[-1])
    out["run"] = await step("agent-vm run", f"{AGENT_VM} run -- python3 -c 'print(1)' 2>&1")
    out["l1_dmesg_tail"] = await step("L1's kernel log", "dmesg | tail -n 80")
    if tcg:
        raw = await step("probe under TCG inside L1", f"AGENT_VM_ACCEL=tcg {TCG_ENV} {probe}",
                         PROBE_TIMEOUT, must=True)  # fmt: skip
        out["tcg"] = json.loads(raw.strip().splitlines()[-1])
    return out


async def measure(suite: str, tcg: bool, progress: Progress = _say) -> dict[str, Any]:
    settings = load_settings()
    started = time.perf_counter()
    name = await nested_image(suite, settings, progress)
    result: dict[str, Any] = {"suite": suite, "l1_image": name}
    result["image_build_s"] = round(time.perf_counter() - started, 1)
    async with Runtime(settings) as runtime:
        l2_image = await runtime.image()
        staged = await asyncio.to_thread(stage, settings, l2_image, progress)
        progress(f"booting L1 ({name}, {L1_PROFILE.memory_mib} MiB, TCG with SVM)")
        started = time.perf_counter()
        spec = runtime.spec(profile=L1_PROFILE, network="isolated")
        vm = await runtime.vm(image=name, spec=spec, cold=True)
        result["l1_boot_s"] = round(time.perf_counter() - started, 1)
        console = settings.build_cache_dir / "nested" / f"l1-console-{suite}.log"
        try:
            await vm.attach_workspace(Workspace(path=staged, readonly=True))
            result |= await inside(vm, l2_image, tcg, progress)
        finally:  # L1's kernel log, for when it is L1 that failed
            with contextlib.suppress(OSError):
                shutil.copyfile(vm.workdir / "console.log", console)
                progress(f"L1's console log: {console}")
            await vm.close()
    return result


def summary_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for label in ("kvm", "tcg"):
        probe = result.get(label)
        if not probe:
            continue
        clones = probe.get("clone_s") or []
        rows.append([
            f"L2 under {probe.get('accel', '?')} in L1 ({result['suite']})",
            str(probe.get("golden_capture_s", "-")),
            f"{min(clones):.2f}" if clones else "-",
            probe.get("domain_type", "-"),
            probe.get("golden_ram_mode", "-"),
            str(probe.get("clone_opens_golden_ram", "-")),
        ])  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="bookworm")
    parser.add_argument("--no-tcg", action="store_true", help="skip the TCG comparison in L1")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = asyncio.run(measure(args.suite, not args.no_tcg))
    table = Table(title=f"agent-vm nested: L1 {args.suite} under TCG, L2 inside it")
    for column in ("", "golden capture s", "clone s (best of 3)", "domain", "golden RAM",
                   "clone opens it"):  # fmt: skip
        table.add_column(column)
    for row in summary_rows(result):
        table.add_row(*row)
    Console().print(table)
    print(result.get("doctor", ""))
    result["host"] = host_info()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.json or REPO / "bench" / "results" / f"nested-{args.suite}-{stamp}.json"
    write_json(path, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
