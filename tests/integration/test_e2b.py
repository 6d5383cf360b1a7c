"""The unmodified ``e2b`` SDK (pinned, from PyPI) against ``agent-vm serve --e2b-port``
and real VMs (issue 21): commands in both modes with stdin and reattach, terminals,
every files call with binary content and watching, pause and resume, list by
metadata, two tokens that cannot see each other's sandboxes, E2B-style errors for
bodies that do not parse and for what agent-vm does not offer, and the audit lines.

One server for the module; the commands, files and terminal tests share one sandbox
(each works in its own directory), the lifecycle tests make their own."""

from __future__ import annotations

import io
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import (
    AuthenticationException,
    CommandExitException,
    FilesystemEventType,
    FileType,
    NotFoundException,
    PtySize,
    Sandbox,
    SandboxException,
    SandboxQuery,
    TimeoutException,
)
from e2b.sandbox.filesystem.filesystem import WriteEntry

from agent_vm.api.tokens import TokenStore, e2b_key
from agent_vm.image.store import Image
from tests.integration.servers import Server, running_server

ALL_BYTES = bytes(range(256)) * 64


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Door:
    """The server and what a client of its E2B door needs."""

    def __init__(self, server: Server, port: int, keys: dict[str, str]) -> None:
        self.server = server
        self.url = f"http://127.0.0.1:{port}"
        self.keys = keys

    def opts(self, who: str = "alice") -> dict[str, Any]:
        return {"api_key": self.keys[who], "api_url": self.url, "sandbox_url": self.url}

    def create(self, who: str = "alice", **kwargs: Any) -> Sandbox:
        kwargs.setdefault("allow_internet_access", False)  # the module's isolated pool
        return Sandbox.create(**kwargs, **self.opts(who))


@pytest.fixture(scope="module")
def door(image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Door]:
    root = tmp_path_factory.mktemp("e2b-server")
    store = TokenStore(root / "tokens.json")
    keys = {name: e2b_key(store.create(name, max_sandboxes=6)[1]) for name in ("alice", "bob")}
    port = _free_port()
    args = ("--e2b-port", str(port), "--e2b-network", "isolated", "--pool", ":light:isolated:1:3")
    with running_server(root, *args, tokens=root / "tokens.json") as server:
        yield Door(server, port, keys)


@pytest.fixture(scope="module")
def shared(door: Door) -> Iterator[Sandbox]:
    sandbox = door.create(timeout=1800, envs={"FROM_CREATE": "yes"})
    yield sandbox
    sandbox.kill()


def test_the_sdk_needs_only_its_environment_variables(
    door: Door, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("E2B_API_URL", door.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", door.url)
    monkeypatch.setenv("E2B_API_KEY", door.keys["alice"])
    sandbox = Sandbox.create()  # wants the internet: this server's --e2b-network gives none
    try:
        result = sandbox.commands.run("echo hi; whoami; pwd")
        assert result.stdout == "hi\nuser\n/home/user\n"
        assert sandbox.commands.run("ls /sys/class/net").stdout.split() == ["lo"]
        assert sandbox.is_running()
    finally:
        sandbox.kill()
    assert not sandbox.is_running()


def test_foreground_commands(shared: Sandbox) -> None:
    seen: list[str] = []
    result = shared.commands.run(
        "echo out; echo err >&2; echo $FROM_CREATE $MINE", envs={"MINE": "here"},
        on_stdout=seen.append,
    )  # fmt: skip
    assert (result.stdout, result.stderr, result.exit_code) == ("out\nyes here\n", "err\n", 0)
    assert "".join(seen) == "out\nyes here\n"
    assert shared.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert shared.commands.run("whoami", user="root").stdout == "root\n"
    with pytest.raises(CommandExitException) as failed:
        shared.commands.run("echo gone >&2; exit 3")
    assert failed.value.exit_code == 3 and failed.value.stderr == "gone\n"
    with pytest.raises(TimeoutException):
        shared.commands.run("sleep 30", timeout=2)


def test_background_commands_with_stdin_and_reattach(shared: Sandbox) -> None:
    handle = shared.commands.run("cat; echo done", background=True, stdin=True)
    shared.commands.send_stdin(handle.pid, "first\n")
    listed = {p.pid: p for p in shared.commands.list()}
    assert handle.pid in listed and listed[handle.pid].args == ["-l", "-c", "cat; echo done"]
    again = shared.commands.connect(handle.pid)  # a second client: everything so far
    shared.commands.send_stdin(handle.pid, "second\n")
    shared.commands.close_stdin(handle.pid)
    assert handle.wait().stdout == "first\nsecond\ndone\n"
    assert again.wait().stdout == "first\nsecond\ndone\n"

    sleeper = shared.commands.run("sleep 600", background=True)
    assert shared.commands.kill(sleeper.pid)
    with pytest.raises(CommandExitException):
        sleeper.wait()
    assert sleeper.pid not in {p.pid for p in shared.commands.list()}
    with pytest.raises(NotFoundException):
        shared.commands.connect(99999)


def test_a_terminal(shared: Sandbox) -> None:
    terminal = shared.pty.create(PtySize(rows=24, cols=80))
    shared.pty.resize(terminal.pid, PtySize(rows=30, cols=100))
    shared.pty.send_stdin(terminal.pid, b"stty size; tty; exit 7\n")
    chunks: list[bytes] = []
    with pytest.raises(CommandExitException) as ended:
        terminal.wait(on_pty=chunks.append)
    assert ended.value.exit_code == 7
    text = b"".join(chunks).decode(errors="replace")
    assert "30 100" in text and "/dev/pts/" in text
    sleeper = shared.pty.create(PtySize(rows=24, cols=80))
    assert shared.pty.kill(sleeper.pid)


def test_every_files_call(shared: Sandbox) -> None:
    files = shared.files
    info = files.write("e2b-files/text.txt", "héllo")
    assert (info.name, info.path) == ("text.txt", "/home/user/e2b-files/text.txt")
    assert files.read("e2b-files/text.txt") == "héllo"
    files.write("e2b-files/all.bin", ALL_BYTES)
    assert bytes(files.read("e2b-files/all.bin", format="bytes")) == ALL_BYTES
    files.write("e2b-files/stream.bin", io.BytesIO(ALL_BYTES))  # streamed (octet-stream)
    assert b"".join(files.read("e2b-files/stream.bin", format="stream")) == ALL_BYTES
    several = files.write_files(
        [WriteEntry(path=f"e2b-files/many/{i}.txt", data=f"n{i}") for i in range(3)]
    )
    assert [w.name for w in several] == ["0.txt", "1.txt", "2.txt"]
    assert shared.commands.run("stat -c %U e2b-files/many/2.txt").stdout == "user\n"

    entries = files.list("e2b-files")
    assert [(e.name, e.type) for e in entries] == [
        ("all.bin", FileType.FILE), ("many", FileType.DIR), ("stream.bin", FileType.FILE),
        ("text.txt", FileType.FILE),
    ]  # fmt: skip
    assert len(files.list("e2b-files", depth=2)) == 7
    stat = files.get_info("e2b-files/all.bin")
    assert (stat.size, stat.owner, stat.permissions) == (len(ALL_BYTES), "user", "-rw-r--r--")
    assert files.exists("e2b-files/text.txt") and not files.exists("e2b-files/nope")
    assert files.make_dir("e2b-files/dir") and not files.make_dir("e2b-files/dir")
    moved = files.rename("e2b-files/text.txt", "e2b-files/dir/moved.txt")
    assert moved.path == "/home/user/e2b-files/dir/moved.txt"
    files.remove("e2b-files/dir")
    assert not files.exists("e2b-files/dir/moved.txt")
    signed = httpx.get(shared.download_url("e2b-files/all.bin", use_signature_expiration=60))
    assert signed.status_code == 200 and signed.content == ALL_BYTES  # no headers: signed
    upload = shared.upload_url("e2b-files/up.txt")
    assert httpx.post(upload, files={"file": ("up.txt", b"up")}).status_code == 200
    assert files.read("e2b-files/up.txt") == "up"
    forged = httpx.get(shared.download_url("e2b-files/all.bin") + "x")
    assert forged.status_code == 401
    with pytest.raises(NotFoundException):
        files.read("e2b-files/dir/moved.txt")


def test_watching_a_directory(shared: Sandbox) -> None:
    shared.files.make_dir("e2b-watch")
    handle = shared.files.watch_dir("e2b-watch", recursive=True)
    shared.files.write("e2b-watch/a.txt", "a")
    shared.commands.run("mkdir e2b-watch/sub && echo b > e2b-watch/sub/b.txt && rm e2b-watch/a.txt")
    deadline = time.monotonic() + 10
    events: list[Any] = []
    while time.monotonic() < deadline and not any(
        e.type == FilesystemEventType.REMOVE for e in events
    ):
        events += handle.get_new_events()
        time.sleep(0.2)
    handle.stop()
    seen = {(e.name, e.type) for e in events}
    assert ("a.txt", FilesystemEventType.WRITE) in seen
    assert ("sub", FilesystemEventType.CREATE) in seen
    assert ("sub/b.txt", FilesystemEventType.CREATE) in seen
    assert ("a.txt", FilesystemEventType.REMOVE) in seen
    assert not any(".agentvm-" in name for name, _ in seen)  # the file server's temporaries


def test_lifecycle_list_pause_resume(door: Door) -> None:
    sandbox = door.create(timeout=600, metadata={"suite": "e2b", "n": "1"})
    other = door.create(timeout=600, metadata={"suite": "e2b", "n": "2"})
    try:
        found = Sandbox.list(query=SandboxQuery(metadata={"n": "1"}), **door.opts()).next_items()
        assert [s.sandbox_id for s in found] == [sandbox.sandbox_id]
        assert found[0].metadata == {"suite": "e2b", "n": "1"}
        sandbox.set_timeout(900)
        info = sandbox.get_info()
        assert 800 < (info.end_at - info.started_at).total_seconds() < 1000

        sandbox.files.write("kept.txt", "still here")
        sandbox.commands.run("echo 41 > /tmp/n")
        sandbox.pause()
        assert Sandbox.get_info(sandbox.sandbox_id, **door.opts()).state.value == "paused"
        assert not sandbox.is_running()
        resumed = Sandbox.connect(sandbox.sandbox_id, **door.opts())
        assert resumed.files.read("kept.txt") == "still here"
        assert resumed.commands.run("echo $(( $(cat /tmp/n) + 1 ))").stdout == "42\n"
    finally:
        other.kill()
        sandbox.kill()
    left = {s.sandbox_id for s in Sandbox.list(**door.opts()).next_items()}
    assert not left & {sandbox.sandbox_id, other.sandbox_id}


def test_tokens_see_only_their_own(door: Door, shared: Sandbox) -> None:
    sid = shared.sandbox_id
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sid, **door.opts("bob"))
    with pytest.raises(NotFoundException):
        Sandbox.connect(sid, **door.opts("bob"))
    assert not Sandbox.kill(sid, **door.opts("bob"))
    assert sid not in {s.sandbox_id for s in Sandbox.list(**door.opts("bob")).next_items()}
    headers = {"E2b-Sandbox-Id": sid, "X-Access-Token": "0" * 64}
    wrong = httpx.get(f"{door.url}/files", params={"path": "/etc/hostname"}, headers=headers)
    assert wrong.status_code == 401 and wrong.json()["code"] == 401
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key="e2b_00ff", api_url=door.url, sandbox_url=door.url)
    assert shared.is_running()


def test_bad_bodies_and_what_agent_vm_does_not_offer(door: Door) -> None:
    headers = {"X-API-KEY": door.keys["alice"]}
    before = Sandbox.list(**door.opts()).next_items()
    for junk in (b"{", b'{"templateID": 5}', b'{"templateID": "base", "timeout": -1}'):
        reply = httpx.post(f"{door.url}/sandboxes", content=junk, headers=headers)
        assert reply.status_code == 400, reply.text
        assert reply.json()["code"] == 400 and reply.json()["message"]
    assert Sandbox.list(**door.opts()).next_items() == before
    reply = httpx.get(f"{door.url}/sandboxes/x/logs", headers=headers)
    assert reply.status_code == 501 and "does not offer" in reply.json()["message"]
    with pytest.raises(SandboxException, match="does not offer"):
        door.create(volume_mounts={"/data": "vol"})


def test_the_audit_log_has_the_door_s_work(door: Door, shared: Sandbox) -> None:
    lines = [json.loads(line) for line in Path(door.server.audit).read_text().splitlines()]
    created = [e for e in lines if e.get("event") == "sandbox_created"]
    assert any(e.get("sandbox") == shared.sandbox_id and e.get("owner_name") == "alice"
               for e in created)  # fmt: skip
    assert any(e.get("event") == "auth_failed" for e in lines)
