"""The files API (``sandbox.files``) against a real guest agent in a booted VM."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import stat
import tarfile
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent_vm.communication.files import FileService, WatchEvent
from agent_vm.errors import (
    ExtractionError,
    SandboxFileNotFoundError,
    SandboxIsADirectoryError,
    SandboxPermissionError,
)
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.running import RunningVM
from tests.integration.hostile_guest import tar_server_code

MIB = 1 << 20


@pytest.fixture(params=["staged", "channel"])
def lane(request: pytest.FixtureRequest) -> str:
    """Bytes through the share's bulk lane (what sb.files uses) or the channel itself."""
    return str(request.param)


def files_of(vm: RunningVM, lane: str = "staged") -> FileService:
    return FileService(vm.channel, vm.staging if lane == "staged" else None)


async def sh(executor: AgentExecutor, vm: RunningVM, script: str) -> str:
    result = await executor.execute(vm, script, timeout=120)
    assert result.exit_code == 0, result.stderr
    return result.stdout


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@contextmanager
def peak_rss() -> Iterator[list[int]]:
    """Samples this process's RSS every 20 ms; yields [baseline, peak] (KiB), filled at exit."""
    figures = [rss_kib(), rss_kib()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            figures[1] = max(figures[1], rss_kib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield figures
    finally:
        stop.set()
        sampler.join()


async def test_round_trips_empty_binary_unicode_and_spaces(shared_vm: RunningVM, lane: str) -> None:
    files = files_of(shared_vm, lane)
    every_byte = bytes(range(256)) * 1000
    cases = {
        "/tmp/ft/empty": b"",
        "/tmp/ft/binary.bin": every_byte,
        "/tmp/ft/naïve café ✓.txt": "ünïcödé ✓\n".encode(),
        "/tmp/ft/with space/and\ttab": b"x",
    }
    for path, data in cases.items():
        assert await files.write(path, data) == len(data)
        assert await files.read(path, format="bytes") == data
    assert await files.read("/tmp/ft/naïve café ✓.txt") == "ünïcödé ✓\n"
    names = {entry.name for entry in await files.list("/tmp/ft")}
    assert names == {"empty", "binary.bin", "naïve café ✓.txt", "with space"}
    deep = {entry.path for entry in await files.list("/tmp/ft", depth=2)}
    assert "/tmp/ft/with space/and\ttab" in deep
    entry = await files.stat("/tmp/ft/binary.bin")
    assert (entry.type, entry.size) == ("file", len(every_byte))


async def test_small_operations(shared_vm: RunningVM) -> None:
    files = files_of(shared_vm)
    assert await files.make_dir("/tmp/ops/a/b") is True
    assert await files.make_dir("/tmp/ops/a/b") is False
    await files.write("/tmp/ops/a/b/f", "1")
    assert await files.exists("/tmp/ops/a/b/f")
    await files.rename("/tmp/ops/a/b/f", "/tmp/ops/g")
    assert not await files.exists("/tmp/ops/a/b/f")
    assert await files.read("/tmp/ops/g") == "1"
    await files.remove("/tmp/ops/a")
    assert [e.name for e in await files.list("/tmp/ops")] == ["g"]


async def test_errors_are_clear_exceptions(shared_vm: RunningVM, executor: AgentExecutor) -> None:
    files = files_of(shared_vm)
    with pytest.raises(SandboxFileNotFoundError) as missing:
        await files.read("/no/such/file")
    assert isinstance(missing.value, FileNotFoundError)
    assert missing.value.path == "/no/such/file"
    with pytest.raises(SandboxIsADirectoryError):
        await files.read("/tmp")
    await sh(executor, shared_vm, "mkdir -p /mnt/ro && mount -t tmpfs -o ro tmpfs /mnt/ro")
    with pytest.raises(SandboxPermissionError) as refused:
        await files.write("/mnt/ro/x", b"no")
    assert isinstance(refused.value, PermissionError)
    with pytest.raises(SandboxFileNotFoundError):
        await files.stat("/tmp/missing")


async def test_200_mb_streams_both_ways_with_flat_host_memory(
    shared_vm: RunningVM, lane: str
) -> None:
    files = files_of(shared_vm, lane)
    size = 200 * MIB
    block = os.urandom(MIB)
    sent = hashlib.sha256()

    async def produce() -> AsyncIterator[bytes]:
        for i in range(size // MIB):
            chunk = block[i:] + block[:i]  # every MiB different, never the whole in memory
            sent.update(chunk)
            yield chunk

    with peak_rss() as up:
        assert await files.write("/tmp/big", produce()) == size
    received = hashlib.sha256()
    total = 0
    with peak_rss() as down:
        async for chunk in files.read_stream("/tmp/big"):
            received.update(chunk)
            total += len(chunk)
    assert total == size and received.hexdigest() == sent.hexdigest()
    grew = max(up[1] - up[0], down[1] - down[0]) / 1024
    print(f"200 MB write+read ({lane}): host RSS grew at most {grew:.1f} MiB")
    assert grew < 64, f"host memory grew by {grew:.0f} MiB while streaming 200 MiB"
    await files.remove("/tmp/big")


async def test_watch_sees_create_modify_delete(
    shared_vm: RunningVM, executor: AgentExecutor
) -> None:
    files = files_of(shared_vm)
    await files.make_dir("/tmp/watched")
    seen: list[WatchEvent] = []

    async def collect() -> None:
        async for event in files.watch("/tmp/watched"):
            seen.append(event)
            if event.type == "delete":
                return

    async def act() -> None:
        await asyncio.sleep(1.0)  # the watch is in place once its request reached the guest
        await sh(executor, shared_vm, "cd /tmp/watched && echo a > f && echo b >> f && rm f")

    await asyncio.wait_for(asyncio.gather(collect(), act()), 60)
    kinds = [(event.type, event.path) for event in seen]
    assert ("create", "/tmp/watched/f") in kinds
    assert ("modify", "/tmp/watched/f") in kinds
    assert kinds[-1] == ("delete", "/tmp/watched/f")


async def test_trees_round_trip(shared_vm: RunningVM, tmp_path: Path, lane: str) -> None:
    files = files_of(shared_vm, lane)
    source = tmp_path / "src"
    (source / "sub dir").mkdir(parents=True)
    (source / "sub dir" / "ü.txt").write_text("deep")
    (source / "run.sh").write_text("#!/bin/sh\n")
    (source / "run.sh").chmod(0o755)
    (source / "link").symlink_to("run.sh")
    assert await files.upload_dir(source, "/tmp/tree") > 0
    back = tmp_path / "back"
    report = await files.download_dir("/tmp/tree", back)
    assert report.skipped == []
    assert (back / "sub dir" / "ü.txt").read_text() == "deep"
    assert stat.S_IMODE((back / "run.sh").stat().st_mode) == 0o755
    assert (back / "link").readlink() == Path("run.sh")


async def test_download_dir_with_traps_the_guest_planted(
    shared_vm: RunningVM, executor: AgentExecutor, tmp_path: Path
) -> None:
    """The real agent tars what is there: links out, hardlinks, FIFOs, devices, setuid."""
    await sh(
        executor,
        shared_vm,
        "set -e; rm -rf /tmp/traps; mkdir -p /tmp/traps/d; cd /tmp/traps; "
        "ln -s /etc/shadow abs; ln -s ../../../../etc rel; ln -s d/ok inside; "
        "echo ok > d/ok; ln d/ok hard; ln /etc/hostname hard-out || true; "
        "mkfifo fifo; mknod null c 1 3; mknod disk b 254 0; "
        "echo s > suid; chmod 6755 suid",
    )
    destination = tmp_path / "out"
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("untouched")
    report = await asyncio.wait_for(files_of(shared_vm).download_dir("/tmp/traps", destination), 60)
    skipped = {name for name, _ in report.skipped}
    assert {"abs", "rel", "fifo", "null", "disk"} <= skipped
    assert (destination / "d" / "ok").read_text() == "ok\n"
    assert (destination / "hard").read_text() == "ok\n"
    assert (destination / "inside").readlink() == Path("d/ok")
    for name in ("abs", "rel", "fifo", "null", "disk"):
        assert not (destination / name).exists() and not (destination / name).is_symlink()
    assert stat.S_IMODE((destination / "suid").stat().st_mode) == 0o755
    assert sentinel.read_text() == "untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sentinel"]


async def test_download_dir_cap_stops_with_a_clear_error(
    shared_vm: RunningVM, tmp_path: Path
) -> None:
    files = files_of(shared_vm)
    await files.write("/tmp/capped/a", os.urandom(3 * MIB))
    with pytest.raises(ExtractionError, match="bytes"):
        await files.download_dir("/tmp/capped", tmp_path / "out", max_bytes=MIB)
    assert await files.exists("/tmp/capped/a")  # the channel still works after the stop


def crafted_tar() -> bytes:
    def member(
        name: str, kind: bytes = tarfile.REGTYPE, link: str = "", data: bytes = b"x"
    ) -> tuple[tarfile.TarInfo, io.BytesIO | None]:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode = kind, link, 0o6777
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            info.devmajor, info.devminor = 1, 3
        return info, io.BytesIO(data) if kind == tarfile.REGTYPE else None

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, body in (
            member("../escaped", data=b"owned"),
            member("/tmp/agentvm-absolute", data=b"owned"),
            member("up", tarfile.SYMTYPE, "../.."),
            member("up/sentinel", data=b"owned"),
            member("hard", tarfile.LNKTYPE, "/etc/passwd"),
            member("fifo", tarfile.FIFOTYPE),
            member("null", tarfile.CHRTYPE),
            member("fine", data=b"fine"),
        ):
            tar.addfile(info, body)
    return buf.getvalue()


async def test_a_hostile_agent_sending_a_crafted_tar_cannot_reach_outside(
    fresh_vm: RunningVM, executor: AgentExecutor, tmp_path: Path
) -> None:
    """The guest's own tar server is replaced by one that sends ``../`` names, absolute
    names, a symlink out with a file through it, a hardlink to /etc/passwd, a FIFO and a
    device node, all setuid: the host writes only ``fine``, inside the destination."""
    passwd = Path("/etc/passwd").read_bytes()
    result = await executor.execute(fresh_vm, code=tar_server_code(crafted_tar()), timeout=30)
    assert result.exit_code == 0, result.stderr
    await asyncio.sleep(1.5)  # the daemon takes over the channel
    jail = tmp_path / "jail"
    destination = jail / "dest"
    jail.mkdir()
    (jail / "sentinel").write_text("untouched")
    files = files_of(fresh_vm, "channel")  # this server speaks bytes, not segments
    report = await asyncio.wait_for(files.download_dir("/anything", destination), 60)
    assert sorted(p.name for p in destination.iterdir()) == ["fine", "up"]
    assert (destination / "fine").read_text() == "fine"
    assert stat.S_IMODE((destination / "fine").stat().st_mode) == 0o755
    assert (destination / "up").is_dir() and not (destination / "up").is_symlink()
    assert {n for n, _ in report.skipped} >= {
        "../escaped", "/tmp/agentvm-absolute", "up", "hard", "fifo", "null"
    }  # fmt: skip
    assert (jail / "sentinel").read_text() == "untouched"
    assert sorted(p.name for p in jail.iterdir()) == ["dest", "sentinel"]
    assert not Path("/tmp/agentvm-absolute").exists()
    assert not (tmp_path / "escaped").exists()
    assert Path("/etc/passwd").read_bytes() == passwd
