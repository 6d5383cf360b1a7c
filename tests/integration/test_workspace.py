"""The live workspace (virtio-9p + an idmapped host mount) on fresh, golden-cloned and
pooled VMs: what the guest sees, what lands on the host, and what stays out of reach."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent_vm.communication.workspace import Workspace
from agent_vm.config import Settings
from agent_vm.errors import WorkspaceError
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.pool import VMPool
from agent_vm.execution.running import RunningVM
from agent_vm.execution.runtime import Runtime
from agent_vm.execution.teardown import destroy_and_remove
from agent_vm.host.mounts import mounts_under
from agent_vm.image.store import Image
from agent_vm.sandbox import AsyncSandbox
from agent_vm.sandbox.local import LocalSandbox

OWNER = (4242, 4343)  # a user of the host who owns the project (no passwd entry needed)


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "project"
    (root / "src").mkdir(parents=True)
    (root / "src" / "main.py").write_text("print('from the host')\n")
    for path in (root, root / "src", root / "src" / "main.py"):
        os.chown(path, *OWNER)
    yield root


async def run(executor: AgentExecutor, vm: RunningVM, script: str, ok: bool = True) -> str:
    result = await executor.execute(vm, script, timeout=120)
    if ok:
        assert result.exit_code == 0, f"{script}: {result.stderr}"
    return result.stdout + result.stderr


async def wait_for(condition: Callable[[], bool], what: str, seconds: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await asyncio.to_thread(condition):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"waited {seconds} s for {what}")
        await asyncio.sleep(0.2)


def owned(path: Path) -> tuple[int, int, int]:
    info = path.lstat()
    return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)


async def check_share(executor: AgentExecutor, vm: RunningVM, project: Path) -> None:
    """Host file visible, guest edits land on the host as the owner, with sane modes."""
    out = await run(executor, vm, "pwd; python3 src/main.py; cat src/main.py")
    assert out.startswith("/workspace\nfrom the host\n")
    await run(
        executor, vm,
        "echo edited >> src/main.py && mkdir -p new/dir && echo hi > new/dir/f && "
        "chmod 600 new/dir/f && chown 123:456 new/dir/f",
    )  # fmt: skip
    assert (project / "src" / "main.py").read_text().endswith("edited\n")
    assert owned(project / "src" / "main.py")[:2] == OWNER
    assert owned(project / "new") == (*OWNER, 0o755)
    assert owned(project / "new" / "dir" / "f") == (*OWNER, 0o644)
    # what the guest asked for is what it sees (kept in xattrs, not applied on the host)
    assert (await run(executor, vm, "stat -c '%u:%g %a' new/dir/f")).strip() == "123:456 600"


async def test_a_fresh_vm_works_on_the_project_in_place(
    fresh_vm: RunningVM, executor: AgentExecutor, project: Path
) -> None:
    await fresh_vm.attach_workspace(Workspace(path=project))
    await check_share(executor, fresh_vm, project)


async def test_setuid_bits_and_device_nodes_never_reach_the_host(
    fresh_vm: RunningVM, executor: AgentExecutor, project: Path
) -> None:
    await fresh_vm.attach_workspace(Workspace(path=project))
    await run(
        executor, fresh_vm,
        "cp /bin/true suid && chmod 6755 suid && mknod null c 1 3 && mknod disk b 254 0 && "
        "mkfifo fifo && ln -s /etc/shadow link && ls -l /workspace",
    )  # fmt: skip
    assert owned(project / "suid") == (*OWNER, 0o644)  # no setuid, no exec: 0644 as created
    for name in ("null", "disk", "fifo", "link"):
        info = (project / name).lstat()
        assert stat.S_ISREG(info.st_mode), f"{name} is not a plain file on the host"
        assert (info.st_uid, info.st_gid) == OWNER
    # even a symlink is a plain file holding its target: nothing on the host can follow it
    assert (project / "link").read_text() == "/etc/shadow"
    # in the guest they are what it made
    listing = await run(executor, fresh_vm, "stat -c '%n %F %a' suid null fifo link")
    assert "suid regular file 6755" in listing and "link symbolic link" in listing
    assert "null character special file" in listing and "fifo fifo" in listing


async def test_a_golden_clone_and_a_pooled_vm_get_the_share_too(
    runtime: Runtime, image: Image, executor: AgentExecutor, project: Path
) -> None:
    vm = await runtime.vm(image=image, spec=runtime.spec(network="isolated"))
    try:
        await vm.attach_workspace(Workspace(path=project))
        await check_share(executor, vm, project)
    finally:
        await vm.close()
    assert not mounts_under(vm.workdir)
    assert (project / "src" / "main.py").exists()  # the teardown left the project alone

    (project / "pooled.txt").write_text("pool")
    async with (
        VMPool(min_size=1, max_size=1, runtime=runtime, network="isolated") as pool,
        AsyncSandbox(pool=pool, workspace=project) as sb,
    ):
        assert (await sb.commands.run("cat pooled.txt")).stdout == "pool"
        await sb.commands.run("echo back > from-pool.txt")
    assert (project / "from-pool.txt").read_text() == "back\n"
    assert owned(project / "from-pool.txt")[:2] == OWNER


async def test_read_only_refuses_writes_even_after_the_guest_remounts(
    fresh_vm: RunningVM, executor: AgentExecutor, project: Path
) -> None:
    await fresh_vm.attach_workspace(Workspace(path=project, readonly=True))
    assert "from the host" in await run(executor, fresh_vm, "python3 src/main.py")
    out = await run(executor, fresh_vm, "touch x", ok=False)
    assert "Read-only file system" in out
    # root in the guest lifts its own read-only flag: the host's mount still refuses
    await run(executor, fresh_vm, "mount -o remount,rw /workspace")
    out = await run(executor, fresh_vm, "echo x > y; echo z >> src/main.py", ok=False)
    assert "Read-only file system" in out or "Permission denied" in out
    assert sorted(p.name for p in project.iterdir()) == ["src"]
    assert (project / "src" / "main.py").read_text() == "print('from the host')\n"


async def test_layout_lists_output_without_following_what_the_guest_made(
    fresh_vm: RunningVM, executor: AgentExecutor, project: Path
) -> None:
    (project / "input").mkdir()
    (project / "input" / "data.csv").write_text("a,b\n")
    for path in (project / "input", project / "input" / "data.csv"):
        os.chown(path, *OWNER)
    await fresh_vm.attach_workspace(Workspace(path=project, layout=True))
    assert "Read-only" in await run(executor, fresh_vm, "echo x > input/new", ok=False)
    await run(executor, fresh_vm, "mount -o remount,rw /workspace/input")  # host still refuses
    assert await run(executor, fresh_vm, "echo x > input/new", ok=False)
    assert not (project / "input" / "new").exists()
    result = await executor.execute(
        fresh_vm,
        "cp input/data.csv output/result.csv && mkdir output/sub && echo 12345 > output/sub/n "
        "&& ln -s /etc/shadow output/shadow && mkfifo output/pipe && ln output/sub/n output/hl",
        timeout=60,
    )
    assert result.exit_code == 0, result.stderr
    listed = {(item.path, item.size, item.is_dir) for item in result.output}
    assert listed == {
        ("result.csv", 4, False),
        ("sub", 0, True),
        ("sub/n", 6, False),
        ("shadow", len("/etc/shadow"), False),  # the link itself, not its target
        ("pipe", 0, False),
        ("hl", 6, False),
    }
    for name in ("input", "output", "work"):
        assert owned(project / name)[:2] == OWNER


async def test_quota_stops_a_guest_filling_the_share(
    fresh_vm: RunningVM, executor: AgentExecutor, project: Path
) -> None:
    cap = 16 << 20
    attached = await fresh_vm.attach_workspace(Workspace(path=project, quota_bytes=cap))
    out = await run(
        executor, fresh_vm,
        "for i in $(seq 1 40); do dd if=/dev/zero of=fill$i bs=1M count=8 status=none "
        "|| { echo STOPPED at $i; break; }; done",
        ok=False,
    )  # fmt: skip
    # a new file: read-only mount; the one being written: immutable
    assert "STOPPED" in out and ("Read-only file system" in out or "not permitted" in out)
    assert attached.over
    used = sum(p.stat().st_size for p in project.iterdir() if p.is_file())
    assert used < cap + (160 << 20), f"{used} bytes written past a {cap}-byte cap"
    assert used < 320 << 20  # the guest did not get to write what it wanted
    await wait_for(lambda: (attached.check(), not attached.frozen)[1], "the files to thaw")
    for path in project.glob("fill*"):  # the user frees space: writable again
        path.unlink()
    attached.check()
    assert not attached.over
    await run(executor, fresh_vm, "echo ok > after")


async def test_quota_stops_one_file_held_open_and_growing(
    fresh_vm: RunningVM, executor: AgentExecutor, project: Path
) -> None:
    """A read-only mount stops new opens only: the file QEMU holds open is made immutable."""
    cap = 16 << 20
    attached = await fresh_vm.attach_workspace(Workspace(path=project, quota_bytes=cap))
    out = await run(
        executor, fresh_vm, "dd if=/dev/zero of=big bs=1M count=400 conv=fsync; echo rc=$?",
        ok=False,
    )  # fmt: skip
    assert "rc=0" not in out, out
    assert attached.over
    size = (project / "big").stat().st_size
    assert size < 300 << 20, f"the open file grew to {size} bytes past a {cap}-byte cap"
    await wait_for(lambda: (attached.check(), not attached.frozen)[1], "the file to thaw")
    (project / "big").unlink()  # the guest closed it: the user can delete it
    attached.check()
    assert not attached.over
    await run(executor, fresh_vm, "echo ok > after && echo more >> after")
    await fresh_vm.detach_workspace()
    assert not mounts_under(fresh_vm.workdir / "share" / "ws")


async def test_file_count_cap(fresh_vm: RunningVM, executor: AgentExecutor, project: Path) -> None:
    attached = await fresh_vm.attach_workspace(Workspace(path=project, max_files=200))
    out = await run(
        executor, fresh_vm,
        "mkdir many && for i in $(seq 1 3000); do : > many/$i || { echo STOPPED; break; }; done",
        ok=False,
    )  # fmt: skip
    assert "STOPPED" in out
    assert attached.over and attached.usage.files > 200
    assert len(list((project / "many").iterdir())) < 3000


async def test_after_a_pool_reset_nothing_of_the_previous_user_is_there(
    runtime: Runtime, executor: AgentExecutor, project: Path, settings: Settings
) -> None:
    (project / "secret.txt").write_text("previous user's secret")
    async with VMPool(min_size=1, max_size=1, runtime=runtime, network="isolated") as pool:
        async with AsyncSandbox(pool=pool, workspace=project) as first:
            assert "secret" in (await first.commands.run("cat secret.txt")).stdout
            await first.commands.run("cp secret.txt /root/copied.txt")
            assert isinstance(first.handle, LocalSandbox)
            first_vm = first.handle.vm
        assert first_vm.workspace is None
        assert not [p for p in mounts_under(first_vm.workdir) if p.name in ("ws", "input")]
        async with AsyncSandbox(pool=pool) as second:
            assert second.info().domain != first_vm.name
            out = (
                await second.commands.run(
                    "ls -A /workspace 2>&1; cat /root/copied.txt 2>&1; grep 9p /proc/mounts; "
                    "grep -rl 'previous user' /root /tmp /workspace 2>/dev/null; true"
                )
            ).stdout
            assert "secret" not in out and "9p" not in out and "previous" not in out
            host_mounts = [str(p) for p in mounts_under(settings.vms_dir)]
            assert not [p for p in host_mounts if p.endswith("/ws")], host_mounts


async def test_bad_workspaces_get_one_clear_error(fresh_vm: RunningVM, tmp_path: Path) -> None:
    with pytest.raises(WorkspaceError, match="does not exist"):
        await fresh_vm.attach_workspace(Workspace(path=tmp_path / "missing"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkspaceError, match="not a directory"):
        await fresh_vm.attach_workspace(Workspace(path=tmp_path / "file"))
    assert fresh_vm.workspace is None and not [
        p for p in mounts_under(fresh_vm.workdir) if p.name == "ws"
    ]


async def test_a_guest_mounting_the_share_itself_can_write_nothing_outside_the_workspace(
    fresh_vm: RunningVM, executor: AgentExecutor
) -> None:
    out = await run(
        executor, fresh_vm,
        "modprobe 9p 2>/dev/null; mkdir -p /mnt/s && mount -t 9p -o trans=virtio,version=9p2000.L "
        "agentvm_share /mnt/s && ls -A /mnt/s /mnt/s/ws; touch /mnt/s/x /mnt/s/ws/y; "
        "mkdir /mnt/s/d; echo done",
        ok=False,
    )  # fmt: skip
    assert "done" in out
    share = fresh_vm.workdir / "share"
    assert sorted(p.name for p in share.iterdir()) == ["ws", "xfer"]  # mount points only
    assert list((share / "ws").iterdir()) == []
    assert list((share / "xfer").iterdir()) == []


async def test_reaping_a_vm_with_its_workspace_attached_leaves_the_project_alone(
    runtime: Runtime, image: Image, project: Path
) -> None:
    """What the reaper does for a VM whose process died: the work directory goes, and
    the project mounted inside it stays (unmounted first, never recursed into)."""
    vm = await runtime.vm(image=image, spec=runtime.spec(network="isolated"))
    try:
        await vm.attach_workspace(Workspace(path=project, layout=True))
        await asyncio.to_thread(destroy_and_remove, vm.vm, vm.workdir)
        assert not vm.workdir.exists()
        assert (project / "src" / "main.py").read_text() == "print('from the host')\n"
        assert sorted(p.name for p in project.iterdir()) == ["input", "output", "src", "work"]
    finally:
        await vm.close()


async def test_a_workspace_for_one_run_as_the_seeds_use_it(
    fresh_vm: RunningVM, executor: AgentExecutor, project: Path
) -> None:
    """``execute(vm, cmd, workspace=DIR)``: a directory with input/, output/, work/ gets
    the layout for that run only."""
    for name in ("input", "output", "work"):
        (project / name).mkdir()
        os.chown(project / name, *OWNER)
    (project / "input" / "data.txt").write_text("seed data\n")
    result = await executor.execute(
        fresh_vm, "cat input/data.txt > output/copy.txt && pwd", workspace=project, timeout=60
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "/workspace\n"
    assert [(f.path, f.size) for f in result.output] == [("copy.txt", 10)]
    assert fresh_vm.workspace is None
    assert not [p for p in mounts_under(fresh_vm.workdir) if p.name in ("ws", "input")]
    assert (project / "output" / "copy.txt").read_text() == "seed data\n"
