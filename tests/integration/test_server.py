"""The HTTP API for real: ``agent-vm serve`` as a separate process (on its Unix socket,
and on loopback TCP), a real HTTP client (httpx, httpx-sse), real VMs behind it.

Each server process owns its VMs: what it leaves must be gone after it stops, or (after a
``kill -9``) after the next server's start.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from agent_vm.api.tokens import TokenStore
from agent_vm.config import Settings
from agent_vm.image.store import Image
from tests.integration.servers import CLI, POOL, Server, domains, running_server
from tests.integration.test_pty import check_run_t_follows_the_host_terminal


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's tokens: its own file (never the host's), shared by its servers."""
    return tmp_path_factory.mktemp("tokens") / "tokens.json"


@pytest.fixture(scope="module")
def tokens(token_file: Path) -> dict[str, str]:
    store = TokenStore(token_file)
    return {
        name: store.create(name, max_sandboxes=quota)[1]
        for name, quota in (("alice", 4), ("bob", 4), ("tiny", 1))
    }


@pytest.fixture(scope="module")
def server(
    image: Image, token_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("server")
    (root / "projects" / "demo").mkdir(parents=True)
    with running_server(
        root, "--pool", POOL, "--workspace-root", str(root / "projects"), tokens=token_file
    ) as running:
        yield running


def create(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/sandboxes", json={"network": "isolated", **body})
    assert response.status_code == 201, response.text
    return dict(response.json())


def events(client: httpx.Client, execution: str, after: int = -1) -> list[dict[str, Any]]:
    with connect_sse(client, "GET", f"/v1/executions/{execution}/events",
                     params={"after": after}) as source:  # fmt: skip
        return [json.loads(sse.data) for sse in source.iter_sse()]


def output(seen: list[dict[str, Any]], stream: str = "stdout") -> bytes:
    """What the events carry for ``stream``: base64 in JSON, the bytes exactly."""
    return b"".join(base64.b64decode(e["data"]) for e in seen if e["type"] == stream)


def test_create_exec_files_delete(server: Server, tokens: dict[str, str]) -> None:
    with server.client(tokens["alice"]) as client:
        sandbox = create(client, labels={"team": "a"})
        sid = sandbox["id"]
        assert sandbox["pooled"] is True  # light + isolated: from the warm pool
        script = "for i in $(seq 1 300); do echo out$i; echo err$i >&2; done; exit 7"
        started = client.post(f"/v1/sandboxes/{sid}/executions", json={"cmd": script})
        assert started.status_code == 201, started.text
        seen = events(client, started.json()["id"])
        assert output(seen) == "".join(f"out{i}\n" for i in range(1, 301)).encode()  # in order
        assert output(seen, "stderr") == "".join(f"err{i}\n" for i in range(1, 301)).encode()
        assert seen[-1]["type"] == "exit" and seen[-1]["exit_code"] == 7
        assert [e["seq"] for e in seen] == list(range(len(seen)))
        # files: up, listed, down, removed
        payload = os.urandom(3 * 2**20)
        put = client.put(f"/v1/sandboxes/{sid}/files/content", params={"path": "/tmp/blob"},
                         content=payload)  # fmt: skip
        assert put.status_code == 200 and put.json()["bytes"] == len(payload), put.text
        listed = client.get(f"/v1/sandboxes/{sid}/files", params={"path": "/tmp"}).json()
        assert {"name": "blob", "size": len(payload)}.items() <= next(
            e for e in listed if e["name"] == "blob"
        ).items()
        got = client.get(f"/v1/sandboxes/{sid}/files/content", params={"path": "/tmp/blob"})
        assert got.status_code == 200 and got.content == payload
        waited = client.post(f"/v1/sandboxes/{sid}/executions", params={"wait": True},
                             json={"cmd": ["sha256sum", "/tmp/blob"]}).json()  # fmt: skip
        assert waited["exit"]["exit_code"] == 0
        assert client.get("/v1/sandboxes", params={"label": "team=a"}).json()[0]["id"] == sid
        assert client.delete(f"/v1/sandboxes/{sid}").status_code == 204
        assert client.get(f"/v1/sandboxes/{sid}").status_code == 404


def test_a_client_reconnects_to_a_running_execution(server: Server, tokens: dict[str, str]) -> None:
    with server.client(tokens["alice"]) as client:
        sid = create(client)["id"]
        script = "for i in 1 2 3 4 5 6; do echo line$i; sleep 0.5; done"
        execution = client.post(f"/v1/sandboxes/{sid}/executions", json={"cmd": script}).json()
        first: list[dict[str, Any]] = []
        with connect_sse(client, "GET", f"/v1/executions/{execution['id']}/events") as source:
            for sse in source.iter_sse():
                first.append(json.loads(sse.data))
                if len(first) == 2:
                    break  # the connection drops while it runs
        status = client.get(f"/v1/executions/{execution['id']}").json()
        assert status["done"] is False
        rest = events(client, execution["id"], after=first[-1]["seq"])
        seen = first + rest
        assert output(seen) == "".join(f"line{i}\n" for i in range(1, 7)).encode()  # no gap
        assert seen[-1]["type"] == "exit" and seen[-1]["exit_code"] == 0
        client.delete(f"/v1/sandboxes/{sid}")


def test_signal_and_kill_a_running_execution(server: Server, tokens: dict[str, str]) -> None:
    with server.client(tokens["alice"]) as client:
        sid = create(client)["id"]
        script = "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.1; done"
        execution = client.post(f"/v1/sandboxes/{sid}/executions", json={"cmd": script}).json()
        url = f"/v1/executions/{execution['id']}"
        with connect_sse(client, "GET", f"{url}/events") as source:
            for sse in source.iter_sse():
                if output([json.loads(sse.data)]) == b"ready\n":
                    break  # the trap is set
        bogus = client.post(f"{url}/signal", json={"signal": "BOGUS"})
        assert bogus.status_code == 422 and "signal" in bogus.text
        assert client.get(url).json()["done"] is False  # the bad request changed nothing
        assert client.post(f"{url}/signal", json={"signal": "TERM"}).status_code == 202
        seen = events(client, execution["id"])
        assert output(seen) == b"ready\ngot-term\n"  # (bash reports the killed sleep on stderr)
        assert seen[-1]["exit_code"] == 7  # its own trap's exit, so TERM reached the shell
        stubborn = client.post(f"/v1/sandboxes/{sid}/executions",
                               json={"cmd": "trap '' TERM; sleep 300"}).json()  # fmt: skip
        time.sleep(0.5)
        assert client.post(f"/v1/executions/{stubborn['id']}/kill").status_code == 202
        ended = events(client, stubborn["id"])[-1]
        assert (ended["exit_code"], ended["signal"]) == (137, 9)
        again = client.post(f"/v1/sandboxes/{sid}/executions", params={"wait": True},
                            json={"cmd": "echo still-usable"}).json()  # fmt: skip
        assert again["stdout"] == "still-usable\n"
        client.delete(f"/v1/sandboxes/{sid}")


def test_tokens_tenancy_and_quotas(server: Server, tokens: dict[str, str]) -> None:
    with server.client(None) as anonymous:
        assert anonymous.get("/v1/sandboxes").status_code == 401
        assert anonymous.post("/v1/sandboxes", json={}).status_code == 401
    with server.client("avm_0000_forged") as forged:
        assert forged.get("/v1/pools").status_code == 401
    with server.client(tokens["alice"]) as alice, server.client(tokens["bob"]) as bob:
        sid = create(alice)["id"]
        assert bob.get(f"/v1/sandboxes/{sid}").status_code == 404
        assert bob.delete(f"/v1/sandboxes/{sid}").status_code == 404
        assert bob.post(f"/v1/sandboxes/{sid}/executions", json={"cmd": "id"}).status_code == 404
        assert sid not in {s["id"] for s in bob.get("/v1/sandboxes").json()}
        assert alice.get(f"/v1/sandboxes/{sid}").status_code == 200  # untouched
        alice.delete(f"/v1/sandboxes/{sid}")
    with server.client(tokens["tiny"]) as tiny:
        sid = create(tiny)["id"]
        over = tiny.post("/v1/sandboxes", json={"network": "isolated"})
        assert over.status_code == 429 and "limit" in over.json()["detail"]
        tiny.delete(f"/v1/sandboxes/{sid}")


def test_malformed_requests_get_4xx_and_change_nothing(
    server: Server, tokens: dict[str, str]
) -> None:
    with server.client(tokens["bob"]) as client:
        before = client.get("/v1/sandboxes").json()
        for body, field in (
            ({"profile": "huge"}, "profile"),
            ({"lifetime_seconds": -1}, "lifetime_seconds"),
            ({"network": "nat; rm -rf /"}, "network"),
            ({"surprise": 1}, "surprise"),
            ({"policy": {"tcp_ports": [70000]}}, "policy"),
        ):
            response = client.post("/v1/sandboxes", json=body)
            assert response.status_code == 422, (body, response.text)
            detail = response.json()["detail"]  # one line naming the field, not pydantic's list
            assert isinstance(detail, str) and field in detail and "\n" not in detail, detail
            assert response.json()["error"] == "ConfigError"
        assert client.post("/v1/sandboxes", content=b"{not json").status_code == 422
        assert client.get("/v1/sandboxes").json() == before


def test_a_sandbox_past_its_lifetime_is_reclaimed(server: Server, tokens: dict[str, str]) -> None:
    with server.client(tokens["bob"]) as client:
        sid = create(client, profile="standard", lifetime_seconds=3)["id"]  # not pooled
        kept = create(client, profile="standard", lifetime_seconds=3)["id"]
        assert client.post(f"/v1/sandboxes/{kept}/keepalive",
                           json={"lifetime_seconds": 60}).status_code == 200  # fmt: skip
        deadline = time.monotonic() + 30
        while client.get(f"/v1/sandboxes/{sid}").status_code == 200:
            assert time.monotonic() < deadline, "not reclaimed"
            time.sleep(0.5)
        assert client.get(f"/v1/sandboxes/{kept}").status_code == 200
        client.delete(f"/v1/sandboxes/{kept}")


def network_records() -> list[str]:
    """The filtered network's per-sandbox records (address, policy, ipset, tap)."""
    return [p.read_text() for p in Path("/run/agent-vm/networks").glob("*/sandboxes/*.json")]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_loopback_tcp_and_a_killed_server_leaves_nothing_after_restart(
    settings: Settings, image: Image, tokens: dict[str, str], token_file: Path, tmp_path: Path
) -> None:
    """``--port`` alone listens on loopback TCP (not the socket)."""
    before = domains()
    port = _free_port()
    first = Server(tmp_path, "--port", str(port), tokens=token_file)
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {tokens['alice']}"}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline and first.proc.poll() is None
                time.sleep(0.2)
        with httpx.Client(base_url=base, headers=headers, timeout=120) as client:
            sid = create(client, profile="standard", network="nat")["id"]
            ran = client.post(f"/v1/sandboxes/{sid}/executions", params={"wait": True},
                              json={"cmd": "echo over tcp"}).json()  # fmt: skip
            assert ran["stdout"] == "over tcp\n"
            assert len(domains() - before) == 1
        left = domains() - before
        first.proc.kill()  # SIGKILL: no clean-up at all
        first.proc.wait()
        assert domains() - before == left and len(left) == 1  # left behind ...
        assert all((settings.vms_dir / name).exists() for name in left)
        assert any(name in text for name in left for text in network_records())
    finally:
        first.stop()
    second = Server(tmp_path / "again", tokens=token_file)
    try:
        second.wait_ready()
        assert domains() <= before  # ... and reaped by the next server's start:
        assert not any((settings.vms_dir / name).exists() for name in left)  # overlay
        assert not any(name in text for name in left for text in network_records())
    finally:
        second.stop()


def test_the_cli_runs_through_the_server(
    server: Server, tokens: dict[str, str], tmp_path: Path
) -> None:
    proc = subprocess.run(
        [*CLI, "run", "--server", str(server.socket), "--network", "isolated", "--",
         "sh", "-c", "echo out; echo err >&2; exit 4"],
        env={**os.environ, "AGENT_VM_TOKEN": tokens["alice"]}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert (proc.returncode, proc.stdout, proc.stderr) == (4, "out\n", "err\n")
    absent = subprocess.run(
        [*CLI, "run", "--server", str(tmp_path / "none.sock"), "--", "true"],
        env={**os.environ, "AGENT_VM_TOKEN": tokens["alice"]}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert absent.returncode == 125 and "cannot reach the agent-vm server" in absent.stderr
    assert len(absent.stderr.strip().splitlines()) == 2  # what happened, what to do


JOB = """import os
print(sorted(os.listdir("/root/tree/sub")), open("in.txt").read().strip())
open("out.txt", "w").write("from the guest")
os.makedirs("/root/result/deep", exist_ok=True)
open("/root/result/deep/r.txt", "w").write("r")
"""


def test_the_cli_finds_the_local_server_and_moves_files_through_it(
    server: Server, tmp_path: Path
) -> None:
    """No --server and no token: root's CLI finds the server on its socket
    ($AGENT_VM_SOCKET here) by the local token beside it; --workspace, --upload,
    --download and --code go through the server too."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "in.txt").write_text("from the host\n")
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "a.txt").write_text("a")
    (tmp_path / "job.py").write_text(JOB)
    env = {k: v for k, v in os.environ.items() if k != "AGENT_VM_TOKEN"}
    seen_before = server.log_path.read_text().count("sandbox_created")
    proc = subprocess.run(
        [*CLI, "run", "--network", "isolated", "--workspace", str(project),
         "--upload", f"{tmp_path / 'tree'}:/root/tree",
         "--download", f"/root/result:{tmp_path / 'back'}", "--code", str(tmp_path / "job.py")],
        env={**env, "AGENT_VM_SOCKET": str(server.socket)}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "['a.txt'] from the host\n"
    assert (project / "out.txt").read_text() == "from the guest"
    assert (tmp_path / "back" / "deep" / "r.txt").read_text() == "r"
    assert server.log_path.read_text().count("sandbox_created") == seen_before + 1
    alone = subprocess.run(  # nothing listens there: a local VM, as before
        [*CLI, "run", "--network", "isolated", "--", "echo", "local"],
        env={**env, "AGENT_VM_SOCKET": str(tmp_path / "none.sock")}, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert (alone.returncode, alone.stdout) == (0, "local\n"), alone.stderr
    assert server.log_path.read_text().count("sandbox_created") == seen_before + 1


def test_the_fast_path_runs_a_plain_command_without_the_full_cli(
    server: Server, tmp_path: Path
) -> None:
    """``run [plain options] -- CMD`` with a local server: the standard-library client
    (``quick.py``), never importing the full CLI; output, exit codes, timeouts and a
    refusal as the full CLI gives them."""
    env = {k: v for k, v in os.environ.items() if k != "AGENT_VM_TOKEN"}
    env |= {"AGENT_VM_SOCKET": str(server.socket), "PYTHONPROFILEIMPORTTIME": "1"}
    before = server.log_path.read_text().count("sandbox_created")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, "run", *args], env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip

    done = run("--network", "isolated", "-e", "A=1", "--timeout=30", "--",
               "sh", "-c", "echo out$A; echo err >&2; exit 5")  # fmt: skip
    assert (done.returncode, done.stdout) == (5, "out1\n"), done.stderr[-2000:]
    assert "err\n" in done.stderr  # (the import-time profile is on stderr too)
    assert "agent_vm.cli" not in done.stderr and "httpx" not in done.stderr
    late = run("--network", "isolated", "--timeout", "1", "--", "sleep", "5")
    assert late.returncode == 124 and "timed out after 1 s" in late.stderr
    refused = run("--network", "isolated", "--user", "no body", "--", "true")
    assert refused.returncode == 125 and "is not a user name" in refused.stderr
    assert server.log_path.read_text().count("sandbox_created") == before + 3
    assert server.log_path.read_text().count("sandbox_deleted") >= before + 3


def test_run_t_through_the_server_follows_the_host_terminal(
    server: Server, tokens: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_VM_TOKEN", tokens["alice"])
    check_run_t_follows_the_host_terminal(["--server", str(server.socket)])


def test_a_second_server_on_the_same_audit_log_refuses_to_start(
    server: Server, tmp_path: Path
) -> None:
    """Two servers on one state directory would interleave one hash chain: the second
    says why and stops before it touches anything."""
    second = subprocess.run(
        [*CLI, "serve", "--socket", str(tmp_path / "api.sock")],
        env={**os.environ, "AGENT_VM_AUDIT_LOG": str(server.audit)}, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert second.returncode == 125, second.stderr
    assert f"another agent-vm process (pid {server.proc.pid}) writes the audit log" in (
        second.stderr
    )
    assert not (tmp_path / "api.sock").exists()
    verified = subprocess.run([*CLI, "audit", "verify", "--path", str(server.audit)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    assert verified.returncode == 0, verified.stderr
