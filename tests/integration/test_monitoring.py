"""Observability for real: a server's ``/metrics`` scraped while real guests work, its
audit log read back and verified (and caught when tampered with), and an anomaly raised
by real guest behaviour (a burst of refused connections) paused, then killed, a sandbox.
The audit test runs last and reads what the others left in the log (tests run in file
order).

Traffic goes only to the test host (198.51.100.10, a network namespace on this machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent_vm.image.store import Image
from tests.integration.conftest import TEST_HOST_IP
from tests.integration.servers import CLI, Server, domains, running_server
from tests.integration.testnet import TestHost

BURST = 5
SECRET = f"sk-test-{os.urandom(8).hex()}"
REFUSED = (  # connections to a port the default policy refuses (8080), one by one
    f"for i in $(seq 1 12); do timeout 1 bash -c 'exec 3<>/dev/tcp/{TEST_HOST_IP}/8080' "
    "2>/dev/null; done; true"
)


@pytest.fixture(scope="module")
def watched(
    image: Image, test_host: TestHost, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("watched")
    env = {
        "AGENT_VM_AUDIT_LOG": str(root / "audit" / "audit.log"),
        "AGENT_VM_AUDIT_MAX_BYTES": "4096",  # rotations happen within the test
        "AGENT_VM_AUDIT_KEEP": "50",
        "AGENT_VM_ANOMALY_BLOCKED_BURST": str(BURST),
        "AGENT_VM_ANOMALY_BLOCKED_WINDOW": "60",
        "AGENT_VM_MONITOR_INTERVAL": "0.5",
    }
    with running_server(root, env=env) as server:
        yield server


def client(server: Server) -> httpx.Client:
    return server.client(server.local_token())


def scrape(http: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = http.get("/metrics")
    assert response.status_code == 200, response.text
    values = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def of(values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
       **labels: str) -> float:  # fmt: skip
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for (n, ls), v in values.items()
               if n == name and labels.items() <= dict(ls).items())  # fmt: skip


def run(http: httpx.Client, sandbox: str, cmd: str, **extra: Any) -> dict[str, Any]:
    response = http.post(f"/v1/sandboxes/{sandbox}/executions", params={"wait": True},
                         json={"cmd": cmd, "timeout": 120, **extra})  # fmt: skip
    assert response.status_code == 201, response.text
    return dict(response.json())


def until(condition: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.5)


def test_metrics_move_with_real_work_and_go_with_the_sandbox(watched: Server) -> None:
    with client(watched) as http:
        sandbox = http.post("/v1/sandboxes", json={"network": "nat"}).json()["id"]
        before = scrape(http)
        assert of(before, "agentvm_sandbox_memory_bytes", sandbox=sandbox) > 0
        run(http, sandbox, "timeout 3 sh -c 'while :; do :; done'; true")
        busy = scrape(http)
        cpu = of(busy, "agentvm_sandbox_cpu_seconds_total", sandbox=sandbox)
        assert cpu - of(before, "agentvm_sandbox_cpu_seconds_total", sandbox=sandbox) > 1.5
        fetch = f"print(len(u.urlopen('http://{TEST_HOST_IP}/bytes/4000000').read()))"
        got = run(http, sandbox, f'python3 -c "import urllib.request as u; {fetch}"')
        assert got["stdout"] == "4000000\n", got
        moved = scrape(http)
        rx = of(moved, "agentvm_sandbox_network_bytes_total", sandbox=sandbox, direction="rx")
        assert rx - of(busy, "agentvm_sandbox_network_bytes_total", sandbox=sandbox,
                       direction="rx") > 4_000_000  # fmt: skip
        run(http, sandbox, REFUSED)
        until(lambda: of(scrape(http), "agentvm_sandbox_blocked_total", sandbox=sandbox) >= 3,
              30, "blocked attempts counted")  # fmt: skip
        after = scrape(http)
        assert of(after, "agentvm_blocked_connections_total", kind="tcp") >= 3
        assert of(after, "agentvm_executions_total", outcome="ok") >= 3
        assert of(after, "agentvm_execution_seconds_count") >= 3
        assert http.delete(f"/v1/sandboxes/{sandbox}").status_code == 204
        gone = scrape(http)
        assert not [key for key in gone if ("sandbox", sandbox) in key[1]], "series left"
        assert of(gone, "agentvm_sandbox_acquire_seconds_count", source="clone") >= 1
    with watched.client(None) as anonymous:
        assert anonymous.get("/metrics").status_code == 401


def test_a_burst_of_blocked_connections_pauses_then_kills(watched: Server) -> None:
    with client(watched) as http:
        paused = http.post("/v1/sandboxes", json={"anomaly_action": "pause"}).json()["id"]
        http.post(f"/v1/sandboxes/{paused}/executions", json={"cmd": REFUSED})  # paused in it
        until(lambda: http.get(f"/v1/sandboxes/{paused}").json()["state"] == "paused", 30,
              "the sandbox paused")  # fmt: skip
        view = http.get(f"/v1/sandboxes/{paused}").json()
        assert "blocked_burst" in view["paused_because"]
        refused = http.post(f"/v1/sandboxes/{paused}/executions", json={"cmd": "true"})
        assert refused.status_code == 409 and "paused" in refused.json()["detail"]
        vm_state = subprocess.run(["virsh", "domstate", vm_of(watched, paused)],
                                  capture_output=True, text=True).stdout.strip()  # fmt: skip
        assert vm_state == "paused"
        assert http.post(f"/v1/sandboxes/{paused}/resume").json()["state"] == "running"
        assert run(http, paused, "echo back")["stdout"] == "back\n"
        http.delete(f"/v1/sandboxes/{paused}")

        killed = http.post("/v1/sandboxes", json={"anomaly_action": "kill"}).json()["id"]
        vm = vm_of(watched, killed)
        http.post(f"/v1/sandboxes/{killed}/executions", json={"cmd": REFUSED})
        until(lambda: http.get(f"/v1/sandboxes/{killed}").status_code == 404, 30,
              "the sandbox killed")  # fmt: skip
        until(lambda: vm not in domains(), 30, "its domain gone")
        alerts = scrape(http)
        assert of(alerts, "agentvm_anomaly_alerts_total", rule="blocked_burst", action="pause") >= 1
        assert of(alerts, "agentvm_anomaly_alerts_total", rule="blocked_burst", action="kill") >= 1


def vm_of(server: Server, sandbox: str) -> str:
    for _, _, line in lines(server):
        if line.get("event") == "sandbox_created" and line.get("sandbox") == sandbox:
            return str(line["vm"])
    raise AssertionError(f"no sandbox_created for {sandbox} in the audit log")


def audit_path(server: Server) -> Path:
    return server.log_path.parent / "audit" / "audit.log"


def lines(server: Server) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    path = audit_path(server)
    files = [*sorted(path.parent.glob("audit.log.*"), key=lambda p: -int(p.suffix[1:])), path]
    for file in files:
        for number, raw in enumerate(file.read_text().splitlines(), 1):
            yield file, number, json.loads(raw)


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "audit", "verify", "--path", str(path)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_the_audit_log_has_every_event_no_secret_and_a_chain_that_holds(
    watched: Server, tmp_path: Path
) -> None:
    with client(watched) as http:
        sandbox = http.post("/v1/sandboxes", json={"network": "nat"}).json()["id"]
        assert run(http, sandbox, "echo $API_KEY | wc -c", env={"API_KEY": SECRET})[
            "stdout"] == f"{len(SECRET) + 1}\n"  # fmt: skip
        http.put(f"/v1/sandboxes/{sandbox}/files/content", params={"path": "/tmp/f"},
                 content=b"x" * 1000)  # fmt: skip
        assert http.get(f"/v1/sandboxes/{sandbox}/files/content",
                        params={"path": "/tmp/f"}).content == b"x" * 1000  # fmt: skip
        http.put(f"/v1/sandboxes/{sandbox}/policy", json={"tcp_ports": [80]})
        http.delete(f"/v1/sandboxes/{sandbox}")
    with watched.client("avm_nope_forged") as forged:
        assert forged.get("/v1/sandboxes").status_code == 401
    until(lambda: any(line.get("event") == "sandbox_deleted" and line.get("sandbox") == sandbox
                      for _, _, line in lines(watched)), 30, "the deletion audited")  # fmt: skip
    events = [line for _, _, line in lines(watched)]
    kinds = {line["event"] for line in events}
    assert {"sandbox_created", "execution_started", "execution_finished", "file_transfer",
            "policy_changed", "policy_violation", "anomaly", "sandbox_paused",
            "sandbox_resumed", "sandbox_deleted", "auth_failed"} <= kinds, kinds  # fmt: skip
    started = next(line for line in events if line["event"] == "execution_started"
                   and line["sandbox"] == sandbox)  # fmt: skip
    assert started["env_keys"] == ["API_KEY"] and started["owner_name"] == "local"
    transfers = {(line["op"], line["bytes"]) for line in events
                 if line["event"] == "file_transfer" and line["sandbox"] == sandbox}  # fmt: skip
    assert {("upload", 1000), ("download", 1000)} <= transfers
    for line in events:
        assert line["at"][-6:] in ("-05:00", "-04:00"), line["at"]  # America/New_York
    path = audit_path(watched)
    files = list(path.parent.glob("audit.log*"))
    assert len(files) > 1, "the log should have rotated (4 KiB files)"
    for file in files:
        data = file.read_bytes()
        assert SECRET.encode() not in data
        assert watched.local_token().encode() not in data
    assert SECRET.encode() not in watched.log_path.read_bytes()
    intact = verify(path)
    assert intact.returncode == 0, intact.stderr
    assert "audit log intact" in intact.stdout

    def tampered(name: str, change: Any) -> subprocess.CompletedProcess[str]:
        copy = tmp_path / name
        shutil.copytree(path.parent, copy)
        target = copy / "audit.log.1"  # a full file (rotated past 4 KiB)
        rows = target.read_text().splitlines(keepends=True)
        assert len(rows) >= 3, rows
        target.write_text("".join(change(rows)))
        return verify(copy / "audit.log")

    def edit(rows: list[str]) -> list[str]:
        line = json.loads(rows[1])
        line["exit_code"] = 0 if line.get("exit_code") else 1
        return [rows[0], json.dumps(line) + "\n", *rows[2:]]

    cases = {
        "edited": (edit, "edited"),
        "deleted": (lambda rows: [rows[0], *rows[2:]], "removed or moved"),
        "reordered": (lambda rows: [rows[1], rows[0], *rows[2:]], "removed or moved"),
    }
    for name, (change, says) in cases.items():
        found = tampered(name, change)
        assert found.returncode == 1, (name, found.stdout, found.stderr)
        assert "audit.log.1 line" in found.stderr and says in found.stderr, (name, found.stderr)
    missing = tmp_path / "missing-middle"
    shutil.copytree(path.parent, missing)
    rotated = len(list(missing.glob("audit.log.*")))
    assert rotated >= 2
    (missing / f"audit.log.{max(1, rotated // 2)}").unlink()  # out of the chain's middle
    gap = verify(missing / "audit.log")
    assert gap.returncode == 1 and "removed or moved" in gap.stderr, gap.stderr
    searched = subprocess.run([*CLI, "audit", "search", "--path", str(path), "--event",
                               "anomaly"], capture_output=True, text=True, timeout=60)  # fmt: skip
    found_lines = [json.loads(raw) for raw in searched.stdout.splitlines()]
    assert found_lines and all(line["event"] == "anomaly" for line in found_lines)
    assert {line["action"] for line in found_lines} >= {"pause", "kill"}


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_standalone_exporter_and_top_see_this_hosts_vms(image: Image) -> None:
    from agent_vm.sandbox import Sandbox

    port = _free_port()
    exporter = subprocess.Popen([*CLI, "metrics", "--host", "127.0.0.1", "--port", str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        with Sandbox(network="isolated") as sb:
            vm = sb.info().domain
            assert vm is not None
            sb.commands.run("timeout 2 sh -c 'while :; do :; done'; true")

            def cpu() -> float:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
                return sum(s.value for f in text_string_to_metric_families(text)
                           for s in f.samples if s.name == "agentvm_sandbox_cpu_seconds_total"
                           and s.labels.get("vm") == vm)  # fmt: skip

            until(lambda: _answers(port), 30, "the exporter listening")
            assert cpu() > 1.0
            top = subprocess.run([*CLI, "top", "--once", "--interval", "0.5"],
                                 capture_output=True, text=True, timeout=60,
                                 env={**os.environ, "COLUMNS": "200"})  # fmt: skip
            assert top.returncode == 0 and vm in top.stdout, top.stdout + top.stderr
        assert cpu() == 0  # gone with the VM
    finally:
        exporter.terminate()
        exporter.wait(timeout=30)


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
