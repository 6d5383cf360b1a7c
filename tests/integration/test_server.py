"""The HTTP API for real: ``agent-vm serve`` as a separate process (on its Unix socket,
and on loopback TCP), a real HTTP client (httpx, httpx-sse), real VMs behind it.

Each server process owns its VMs: what it leaves must be gone after it stops, or (after a
``kill -9``) after the next server's start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
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
from agent_vm.sandbox import AsyncSandbox, Sandbox
from tests.integration.test_pty import check_run_t_follows_the_host_terminal, terminal_scenario

CLI = [sys.executable, "-m", "agent_vm"]
POOL = ":light:isolated:1:2"


class Server:
    def __init__(self, settings: Settings, root: Path, *args: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.socket = root / "api.sock"
        self.log = (root / "server.log").open("wb")
        self.proc = subprocess.Popen(
            [*CLI, "serve", "--socket", str(self.socket), *args],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.log_path = root / "server.log"

    def client(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://agent-vm",
            headers=headers, timeout=120,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited: {self.log_path.read_text()[-2000:]}")
            try:
                with self.client(None) as client:
                    if client.get("/healthz").status_code == 200:
                        return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"the server did not answer within {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def domains() -> set[str]:
    out = subprocess.run(["virsh", "list", "--all", "--name"], capture_output=True, text=True)
    return {line for line in out.stdout.split() if line.startswith("agentvm-")}


@pytest.fixture(scope="module")
def tokens(settings: Settings) -> Iterator[dict[str, str]]:
    store = TokenStore(settings.state_dir / "tokens.json")
    suffix = os.urandom(3).hex()
    made = {}
    for name, quota in (("alice", 4), ("bob", 4), ("tiny", 1)):
        _, made[name] = store.create(f"test-{name}-{suffix}", max_sandboxes=quota)
    yield made
    for name in made:
        store.revoke(f"test-{name}-{suffix}")


@pytest.fixture(scope="module")
def server(
    settings: Settings, image: Image, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    before = domains()
    root = tmp_path_factory.mktemp("server")
    (root / "projects" / "demo").mkdir(parents=True)
    running = Server(settings, root, "--pool", POOL, "--workspace-root", str(root / "projects"))
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()
    # uvicorn re-raises the SIGTERM it handled once it has shut down (so -15, not 0)
    assert running.proc.returncode in (0, -signal.SIGTERM), running.log_path.read_text()[-2000:]
    assert "Traceback" not in running.log_path.read_text()
    assert domains() <= before, "the server left domains behind"


def create(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/sandboxes", json={"network": "isolated", **body})
    assert response.status_code == 201, response.text
    return dict(response.json())


def events(client: httpx.Client, execution: str, after: int = -1) -> list[dict[str, Any]]:
    with connect_sse(client, "GET", f"/v1/executions/{execution}/events",
                     params={"after": after}) as source:  # fmt: skip
        return [json.loads(sse.data) for sse in source.iter_sse()]


def test_create_exec_files_delete(server: Server, tokens: dict[str, str]) -> None:
    with server.client(tokens["alice"]) as client:
        sandbox = create(client, labels={"team": "a"})
        sid = sandbox["id"]
        assert sandbox["pooled"] is True  # light + isolated: from the warm pool
        script = "for i in $(seq 1 300); do echo out$i; echo err$i >&2; done; exit 7"
        started = client.post(f"/v1/sandboxes/{sid}/executions", json={"cmd": script})
        assert started.status_code == 201, started.text
        seen = events(client, started.json()["id"])
        out = "".join(e["text"] for e in seen if e["type"] == "stdout")
        err = "".join(e["text"] for e in seen if e["type"] == "stderr")
        assert out == "".join(f"out{i}\n" for i in range(1, 301))  # order preserved
        assert err == "".join(f"err{i}\n" for i in range(1, 301))
        assert seen[-1]["type"] == "result" and seen[-1]["exit_code"] == 7
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
        assert waited["result"]["exit_code"] == 0
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
        text = "".join(e.get("text", "") for e in seen)
        assert text == "".join(f"line{i}\n" for i in range(1, 7))  # nothing lost or twice
        assert seen[-1]["type"] == "result" and seen[-1]["exit_code"] == 0
        client.delete(f"/v1/sandboxes/{sid}")


def test_signal_and_kill_a_running_execution(server: Server, tokens: dict[str, str]) -> None:
    with server.client(tokens["alice"]) as client:
        sid = create(client)["id"]
        script = "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.1; done"
        execution = client.post(f"/v1/sandboxes/{sid}/executions", json={"cmd": script}).json()
        url = f"/v1/executions/{execution['id']}"
        with connect_sse(client, "GET", f"{url}/events") as source:
            for sse in source.iter_sse():
                if json.loads(sse.data).get("text") == "ready\n":
                    break  # the trap is set
        bogus = client.post(f"{url}/signal", json={"signal": "BOGUS"})
        assert bogus.status_code == 422 and "signal" in bogus.text
        assert client.get(url).json()["done"] is False  # the bad request changed nothing
        assert client.post(f"{url}/signal", json={"signal": "TERM"}).status_code == 202
        seen = events(client, execution["id"])
        stdout = "".join(e["text"] for e in seen if e["type"] == "stdout")
        assert stdout == "ready\ngot-term\n"  # (bash reports the killed sleep on stderr)
        assert seen[-1]["exit_code"] == 7  # its own trap's exit, so TERM reached the shell
        stubborn = client.post(f"/v1/sandboxes/{sid}/executions",
                               json={"cmd": "trap '' TERM; sleep 300"}).json()  # fmt: skip
        time.sleep(0.5)
        assert client.post(f"/v1/executions/{stubborn['id']}/kill").status_code == 202
        assert events(client, stubborn["id"])[-1]["killed"] is True
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
            assert field in json.dumps(response.json()["detail"])
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
    settings: Settings, image: Image, tokens: dict[str, str], tmp_path: Path
) -> None:
    before = domains()
    port = _free_port()
    first = Server(settings, tmp_path, "--host", "127.0.0.1", "--port", str(port))
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
    second = Server(settings, tmp_path / "again")
    try:
        second.wait_ready()
        assert domains() <= before  # ... and reaped by the next server's start:
        assert not any((settings.vms_dir / name).exists() for name in left)  # overlay
        assert not any(name in text for name in left for text in network_records())
    finally:
        second.stop()


def sandbox_scenario(sb: Sandbox, tmp_path: Path) -> None:
    """What a user of the SDK does; the same for a local sandbox and one on a server."""
    streamed: list[str] = []
    result = sb.commands.run(
        "printf 'héllo wörld\\n'; echo oops >&2; exit 3", timeout=30, envs={"X": "1"},
        on_stdout=streamed.append,
    )  # fmt: skip
    assert (result.stdout, result.stderr, result.exit_code) == ("héllo wörld\n", "oops\n", 3)
    assert "".join(streamed) == "héllo wörld\n"
    assert sb.commands.run(["sh", "-c", "echo $X"], envs={"X": "42"}).stdout == "42\n"
    assert sb.commands.run("cat", stdin="fed in").stdout == "fed in"
    assert sb.commands.run("sleep 5", timeout=1).timed_out
    assert sb.files.write("/tmp/d/a.txt", "alpha") == 5
    assert sb.files.read("/tmp/d/a.txt") == "alpha"
    assert sb.files.exists("/tmp/d/a.txt") and not sb.files.exists("/tmp/d/nope")
    assert [e.name for e in sb.files.list("/tmp/d")] == ["a.txt"]
    assert sb.files.stat("/tmp/d/a.txt").size == 5
    assert sb.files.make_dir("/tmp/d/sub") is True
    sb.files.rename("/tmp/d/a.txt", "/tmp/d/sub/b.txt")
    local = tmp_path / "blob"
    local.write_bytes(os.urandom(2 * 2**20 + 7))
    assert sb.files.upload(local, "/tmp/d/blob") == local.stat().st_size
    assert sb.files.download("/tmp/d/blob", tmp_path / "back") == local.stat().st_size
    assert (tmp_path / "back").read_bytes() == local.read_bytes()
    sb.files.remove("/tmp/d")
    with pytest.raises(FileNotFoundError):
        sb.files.read("/tmp/d/sub/b.txt")


@pytest.mark.parametrize("where", ["local", "server"])
def test_the_client_sdk_does_what_the_local_sandbox_does(
    where: str, server: Server, tokens: dict[str, str], settings: Settings, tmp_path: Path
) -> None:
    if where == "local":
        with Sandbox(settings=settings, network="isolated") as sb:
            sandbox_scenario(sb, tmp_path)
        return
    with Sandbox(server=str(server.socket), token=tokens["alice"], network="isolated") as sb:
        sandbox_scenario(sb, tmp_path)
        sid = sb.sandbox_id
    with server.client(tokens["alice"]) as client:
        assert client.get(f"/v1/sandboxes/{sid}").status_code == 404  # deleted on exit


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
    refused = subprocess.run(
        [*CLI, "run", "--server", str(server.socket), "--workspace", "/tmp", "--", "true"],
        env={**os.environ, "AGENT_VM_TOKEN": tokens["alice"]}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert refused.returncode == 125
    assert "--workspace cannot be used with --server" in refused.stderr


async def test_a_terminal_through_the_server(server: Server, tokens: dict[str, str]) -> None:
    async with AsyncSandbox(
        server=str(server.socket), token=tokens["alice"], network="isolated"
    ) as sb:
        await terminal_scenario(sb)


def test_run_t_through_the_server_follows_the_host_terminal(
    server: Server, tokens: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_VM_TOKEN", tokens["alice"])
    check_run_t_follows_the_host_terminal(["--server", str(server.socket)])
