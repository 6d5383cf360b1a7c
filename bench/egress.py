"""What the egress proxy costs: HTTPS through it, spliced and intercepted, against the
same sandbox before this change (no proxy) and the host itself, in one run.

    .venv/bin/python -m bench.egress [--requests 100] [--downloads 3] [--mib 32] [--rounds 4]

One test host in a network namespace (203.0.113.10, name ``dl.allowed.test``, HTTPS with
the test CA's certificate; created and removed here, no other address is contacted) and
one NAT sandbox whose allowlist is that name. The same stdlib client
(``bench/tls_client.py``: every request a new connection and TLS handshake) runs:

* **host, direct**: the host itself, no VM (the raw limit of this machine);
* **VM, before this change**: the sandbox with its proxy redirection removed: the kernel
  filters only, as before the proxy existed;
* **VM, proxy, spliced**: through the proxy, which checks the SNI and splices (the
  guest's TLS end to end, checked against the test CA);
* **VM, proxy, intercepted**: a secret bound to the name, so the proxy terminates TLS
  (its CA, which the guest's system store trusts), injects, and connects upstream.

The clients take turns, round after round. Also: the proxy process's memory, alone and
per sandbox it is told of. Prints tables and writes JSON (bench/results/egress-*.json).
Targets (issue 22): spliced within 10 % of before; interception at most 2 ms a request.
gVisor (runsc) and bwrap are not peers here: neither has an egress proxy, and their
networking is the host's own (the "host, direct" row).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import time
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

from tests.integration.testnet import TEST_CA, TestHost

from agent_vm.config import load_settings
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.running import RunningVM
from agent_vm.execution.runtime import Runtime
from agent_vm.image.store import Image
from agent_vm.network import redirect
from agent_vm.network.policy import EgressPolicy
from agent_vm.secrets import Secret
from bench.network import in_vm, merge, on_host
from bench.stats import host_info, print_table, summary, write_json

TEST_HOST = "203.0.113.10"  # TEST-NET-3, only ever routed to the namespace below
NAME = "dl.allowed.test"  # in the test certificate's names
CLIENT = Path(__file__).with_name("tls_client.py")
VAR = "TLSBENCH"  # where the client finds its job
MODES = ("host, direct", "VM, before this change", "VM, proxy, spliced", "VM, proxy, intercepted")
FAKE_SANDBOXES = 50


def job(args: argparse.Namespace, cafile: str | None) -> str:
    return json.dumps({
        "host": NAME, "address": TEST_HOST, "port": 443, "cafile": cafile,
        "downloads": max(1, args.downloads // args.rounds), "download_bytes": args.mib << 20,
        "requests": max(1, args.requests // args.rounds),
    })  # fmt: skip


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


async def proxy_memory(vm: RunningVM) -> dict[str, float]:
    """The proxy's RSS with one sandbox, then with FAKE_SANDBOXES more it is told of
    (each with a secret), by the same calls a real sandbox's start makes."""
    guard = vm.guard
    assert guard is not None and guard.proxy is not None and vm.nic and vm.nic.vm_network
    proxy, real = guard.proxy, vm.nic.vm_network
    pid = proxy.pid
    one = rss_kib(pid)
    fakes = []
    for n in range(FAKE_SANDBOXES):
        address = IPv4Address("10.213.7.0") + n
        fake = dataclasses.replace(
            real, vm_name=f"bench-fake-{n}", tap=f"agvm-bfake{n:04d}",
            addressing=real.addressing.model_copy(update={"address": address}),
        )  # fmt: skip
        await proxy.configure(fake, {"KEY": Secret(f"bench-key-{n:04d}", (NAME,))})
        fakes.append(fake)
    await asyncio.sleep(1)
    many = rss_kib(pid)
    for fake in fakes:
        await proxy.forget(fake)
    return {
        "rss_mib_one_sandbox": one / 1024,
        "rss_mib_per_more_sandbox": (many - one) / 1024 / FAKE_SANDBOXES,
    }


async def measure(
    runtime: Runtime, image: Image, args: argparse.Namespace
) -> tuple[dict[str, dict[str, list[float]]], dict[str, float]]:
    out: dict[str, dict[str, list[float]]] = {mode: {} for mode in MODES}
    secret = Secret("bench-key-" + os.urandom(8).hex(), (NAME,))
    async with runtime:
        vm = await runtime.vm(image=image, policy=EgressPolicy(allow_domains=(NAME,)))
        try:
            assert vm.guard is not None and vm.nic and vm.nic.vm_network
            network, proxy = vm.nic.vm_network, vm.guard.proxy
            assert proxy is not None, "the egress proxy is off (AGENT_VM_EGRESS_PROXY)"
            ca = "/tmp/test-ca.pem"
            put = f"import pathlib; pathlib.Path({ca!r}).write_text({TEST_CA.read_text()!r})"
            await AgentExecutor().execute(vm, code=put)
            resolved = await AgentExecutor().execute(vm, f"getent hosts {NAME}")
            assert resolved.stdout.startswith(TEST_HOST), resolved.stdout  # the address set
            for _ in range(args.rounds):
                merge(out[MODES[0]], on_host(job(args, str(TEST_CA)), CLIENT, VAR))
                await asyncio.to_thread(redirect.remove_vm, network.tap)
                merge(out[MODES[1]], await in_vm(vm, job(args, ca), CLIENT, VAR))
                await vm.set_secrets({})  # redirected again, nothing to inject: spliced
                merge(out[MODES[2]], await in_vm(vm, job(args, ca), CLIENT, VAR))
                await vm.set_secrets({"KEY": secret})  # intercepted: the guest's own store
                merge(out[MODES[3]], await in_vm(vm, job(args, None), CLIENT, VAR))
            memory = await proxy_memory(vm)
        finally:
            await vm.close()
    return out, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--downloads", type=int, default=4)
    parser.add_argument("--mib", type=int, default=32, help="size of each download")
    parser.add_argument("--rounds", type=int, default=4, help="turns the clients take")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    test_host = TestHost(
        name="agvbenche", host_side=IPv4Interface("203.0.113.1/24"),
        addresses=(IPv4Interface(f"{TEST_HOST}/24"),), zone={NAME: TEST_HOST},
    )  # fmt: skip
    test_host.start()  # makes the test CA too
    settings = load_settings().model_copy(update={
        "dns_upstream": [f"{TEST_HOST}:53"], "network_public_subnets": ["203.0.113.0/24"],
        "egress_upstream_ca": TEST_CA, "egress_proxy": True,
    })  # fmt: skip
    runtime = Runtime(settings)
    image = runtime.find_image()
    try:
        samples, memory = asyncio.run(measure(runtime, image, args))
    finally:
        test_host.stop()
    res = {mode: {m: summary(v) for m, v in data.items()} for mode, data in samples.items()}
    speed = {mode: res[mode]["download_mib_s"]["p50"] for mode in MODES}
    notes = ["the raw limit", "kernel filters only", *(
        f"{speed[m] / speed[MODES[1]]:.2f}x before (p50)" for m in MODES[2:]
    )]  # fmt: skip
    print_table(
        f"download {args.mib} MiB over HTTPS (MiB/s, higher is better)",
        [(m, res[m]["download_mib_s"], n) for m, n in zip(MODES, notes, strict=True)],
        fmt_value=lambda v: f"{v:.1f}",
    )
    p50 = {mode: res[mode]["request_s"]["p50"] for mode in MODES}
    extra = (p50[MODES[3]] - p50[MODES[2]]) * 1000
    notes = ["the raw limit", "kernel filters only",
             f"{(p50[MODES[2]] - p50[MODES[1]]) * 1000:+.1f} ms vs before (p50)",
             f"{extra:+.1f} ms vs spliced (p50)"]  # fmt: skip
    print_table(
        "small HTTPS request, new connection and handshake",
        [(m, res[m]["request_s"], n) for m, n in zip(MODES, notes, strict=True)],
    )
    print(f"proxy memory: {memory['rss_mib_one_sandbox']:.1f} MiB with one sandbox, "
          f"+{memory['rss_mib_per_more_sandbox'] * 1024:.0f} KiB per further sandbox")  # fmt: skip
    results: dict[str, Any] = {
        "host": host_info(), "image": image.key, "at": time.time(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "results": res, "proxy_memory": memory,
        "interception_ms_per_request_p50": extra,
    }  # fmt: skip
    out = args.out or Path(__file__).with_name("results") / f"egress-{int(time.time())}.json"
    write_json(out, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
