"""Pause, resume, snapshots and fork through ``agent-vm serve`` (issue 20): a paused
sandbox outlives the server, its counter and its command go on after the restart; each
token sees only its own sandboxes and snapshots; quotas hold for forks."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from agent_vm.api.tokens import TokenStore
from agent_vm.config import Settings
from agent_vm.image.store import Image
from tests.integration.servers import running_server
from tests.integration.test_server import create, output

COUNTER = (
    "nohup bash -c 'i=0; while :; do i=$((i+1)); echo $i > /root/count.new;"
    " mv /root/count.new /root/count; sleep 0.1; done'"
    " >/dev/null 2>&1 & until [ -s /root/count ]; do sleep 0.05; done"
)


def run(client: httpx.Client, sid: str, cmd: str) -> None:
    reply = client.post(f"/v1/sandboxes/{sid}/executions", params={"wait": True},
                        json={"cmd": cmd}).json()  # fmt: skip
    assert reply["exit"]["exit_code"] == 0, reply


def count(client: httpx.Client, sid: str) -> int:
    started = client.post(f"/v1/sandboxes/{sid}/executions", json={"cmd": "cat /root/count"})
    assert started.status_code == 201, started.text
    seen = events(client, started.json()["id"])
    return int(output(seen).decode())


def audited(server_audit: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in server_audit.read_text().splitlines() if line]


def events(client: httpx.Client, execution: str, after: int = -1, limit: int = 0) -> list[Any]:
    seen: list[dict[str, Any]] = []
    with connect_sse(client, "GET", f"/v1/executions/{execution}/events",
                     params={"after": after}) as source:  # fmt: skip
        for sse in source.iter_sse():
            seen.append(json.loads(sse.data))
            if limit and len(seen) >= limit:
                break
    return seen


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("pause-tokens") / "tokens.json"
    store = TokenStore(path)
    made = {name: store.create(name, max_sandboxes=q)[1] for name, q in
            (("alice", 6), ("bob", 4), ("tiny", 1))}  # fmt: skip
    return path, made


def test_a_paused_sandbox_outlives_a_server_restart(
    image: Image, settings: Settings, tokens: tuple[Path, dict[str, str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:  # fmt: skip
    path, token = tokens
    root = tmp_path_factory.mktemp("pause-server")
    with running_server(root / "one", tokens=path) as server:
        with server.client(token["alice"]) as client:
            sid = create(client)["id"]
            run(client, sid, COUNTER)
            script = "for i in $(seq 1 40); do echo $i; sleep 0.25; done"
            execution = client.post(f"/v1/sandboxes/{sid}/executions", json={"cmd": script})
            command = execution.json()["id"]
            first = events(client, command, limit=3)
            paused = client.post(f"/v1/sandboxes/{sid}/pause")
            assert paused.status_code == 200 and paused.json()["state"] == "paused", paused.text
            before = time.monotonic()
            refused = client.post(f"/v1/sandboxes/{sid}/executions", json={"cmd": "true"})
            assert refused.status_code == 409 and "paused" in refused.text
        with server.client(server.local_token()) as admin:
            scraped = admin.get("/metrics").text
            count_line = next(line for line in scraped.splitlines()
                              if line.startswith("agentvm_sandboxes_paused "))  # fmt: skip
            assert float(count_line.split()[1]) >= 1  # (other servers' paused ones count too)
            held = next(line for line in scraped.splitlines()
                        if line.startswith("agentvm_paused_disk_bytes "))  # fmt: skip
            assert float(held.split()[1]) > 50 * 2**20  # its memory, on disk
        with server.client(token["bob"]) as other:
            assert other.get(f"/v1/sandboxes/{sid}").status_code == 404
            assert other.post(f"/v1/sandboxes/{sid}/resume").status_code == 404
    assert (settings.paused_dir / sid / "memory.ram").is_file()  # on disk, no server

    with (
        running_server(root / "two", tokens=path) as server,
        server.client(token["alice"]) as client,
    ):
        assert client.get(f"/v1/sandboxes/{sid}").json()["state"] == "paused"
        resumed = client.post(f"/v1/sandboxes/{sid}/resume")
        assert resumed.status_code == 200 and resumed.json()["state"] == "running"
        assert time.monotonic() - before > 0  # (paused across the restart)
        a = count(client, sid)
        time.sleep(0.5)
        assert count(client, sid) > a  # the counter process counts on
        rest = events(client, command, after=first[-1]["seq"])
        assert rest[-1]["type"] == "exit" and rest[-1]["exit_code"] == 0, rest[-1]
        numbers = [int(n) for n in (output(first) + output(rest)).split()]
        assert numbers[-1] == 40 and numbers == sorted(numbers)  # went on to its end
        assert client.delete(f"/v1/sandboxes/{sid}").status_code == 204
    back = [e for e in audited(root / "two" / "audit.log") if e["event"] == "sandbox_resumed"]
    assert back and back[0]["sandbox"] == sid
    why = [e["reason"] for e in audited(root / "one" / "audit.log")
           if e["event"] == "sandbox_paused" and e["sandbox"] == sid]  # fmt: skip
    assert why == ["requested"]
    assert not (settings.paused_dir / sid).exists()


def test_snapshots_and_forks_through_the_server(
    image: Image, tokens: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    path, token = tokens
    with running_server(tmp_path_factory.mktemp("snap-server"), tokens=path) as server:
        with server.client(token["alice"]) as alice, server.client(token["bob"]) as bob:
            sid = create(alice)["id"]
            run(alice, sid, "echo installed > /root/marker")
            name = f"srv-{int(time.time() * 1000) % 10**8}"
            taken = alice.post(f"/v1/sandboxes/{sid}/snapshot", json={"name": name})
            assert taken.status_code == 201, taken.text
            assert taken.json()["name"] == name and taken.json()["source"] == sid
            assert [s["name"] for s in alice.get("/v1/snapshots").json()] == [name]
            assert bob.get("/v1/snapshots").json() == []
            assert bob.post("/v1/sandboxes", json={"snapshot": name}).status_code == 404
            assert bob.delete(f"/v1/snapshots/{name}").status_code == 404
            child = alice.post("/v1/sandboxes", json={"snapshot": name})
            assert child.status_code == 201, child.text
            cid = child.json()["id"]
            assert "installed" in output(
                events(alice, alice.post(f"/v1/sandboxes/{cid}/executions",
                                         json={"cmd": "cat /root/marker"}).json()["id"])
            ).decode()  # fmt: skip
            in_use = alice.delete(f"/v1/snapshots/{name}")
            assert in_use.status_code == 409 and "in use" in in_use.text
            forked = alice.post(f"/v1/sandboxes/{sid}/fork", json={"count": 2})
            assert forked.status_code == 201, forked.text
            kids = [k["id"] for k in forked.json()]
            assert len(set(kids)) == 2 and sid not in kids
            assert bob.get(f"/v1/sandboxes/{kids[0]}").status_code == 404
            for gone in (cid, *kids, sid):
                assert alice.delete(f"/v1/sandboxes/{gone}").status_code == 204
            deadline = time.monotonic() + 60
            while alice.delete(f"/v1/snapshots/{name}").status_code == 409:
                assert time.monotonic() < deadline, "the snapshot stayed in use"
                time.sleep(0.5)  # the deleted sandboxes are released in the background
            assert alice.get("/v1/snapshots").json() == []
            lines = audited(server.audit)
            snap_lines = [e for e in lines if e["event"] == "snapshot_taken"]
            assert (
                snap_lines and snap_lines[0]["sandbox"] == sid and snap_lines[0]["snapshot"] == name
            )
            made = [e for e in lines if e["event"] == "sandbox_forked"]
            assert sorted(e["sandbox"] for e in made) == sorted(kids)
            assert {e["parent"] for e in made} == {sid}
            assert any(e["event"] == "snapshot_removed" for e in lines)
        with server.client(token["tiny"]) as tiny:
            only = create(tiny)["id"]
            over = tiny.post(f"/v1/sandboxes/{only}/fork", json={"count": 1})
            assert over.status_code == 429, over.text
            bad = tiny.post(f"/v1/sandboxes/{only}/snapshot", json={"name": "../x"})
            assert bad.status_code == 422 and "name" in bad.text  # the API's validation answer
            assert tiny.delete(f"/v1/sandboxes/{only}").status_code == 204


def test_a_lifetime_that_runs_out_pauses_when_asked(
    image: Image, tokens: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    path, token = tokens
    root = tmp_path_factory.mktemp("expiry-server")
    with running_server(root, tokens=path) as server, server.client(token["alice"]) as client:
        sid = create(client, lifetime_seconds=8, on_expiry="pause")["id"]
        killed = create(client, lifetime_seconds=8)["id"]
        run(client, sid, "echo before > /root/file")
        deadline = time.monotonic() + 60
        while client.get(f"/v1/sandboxes/{sid}").json()["state"] != "paused":
            assert time.monotonic() < deadline, "it did not pause when its lifetime ran out"
            time.sleep(0.5)
        view = client.get(f"/v1/sandboxes/{sid}").json()
        assert view["paused_because"] == "expired" and view["expires_at"] is None
        while client.get(f"/v1/sandboxes/{killed}").status_code != 404:
            assert time.monotonic() < deadline, "the other one was not removed"
            time.sleep(0.5)
        assert client.post(f"/v1/sandboxes/{sid}/resume").json()["state"] == "running"
        got = client.get(f"/v1/sandboxes/{sid}/files/content", params={"path": "/root/file"})
        assert got.content == b"before\n"
        assert client.delete(f"/v1/sandboxes/{sid}").status_code == 204
