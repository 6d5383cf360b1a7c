"""The E2B-shaped facade, blocking and async, over fresh VMs and over a pool."""

from __future__ import annotations

import asyncio
import os

from agent_vm.config import Settings
from agent_vm.core.connection import LibvirtConnection
from agent_vm.execution.pool import VMPool
from agent_vm.execution.reaper import owned_domains
from agent_vm.execution.runtime import Runtime
from agent_vm.image.store import Image
from agent_vm.sandbox import AsyncSandbox, Sandbox, shared_loop


def my_domains(connection: LibvirtConnection) -> set[str]:
    pid = str(os.getpid())
    return {d.vm.name for d in owned_domains(connection) if d.metadata.get("pid") == pid}


def test_blocking_sandbox_runs_commands_and_cleans_up(
    image: Image, settings: Settings, connection: LibvirtConnection
) -> None:
    before = my_domains(connection)
    streamed: list[str] = []
    with Sandbox(settings=settings) as sb:
        assert sb.sandbox_id in my_domains(connection)
        result = sb.commands.run(
            "printf 'héllo wörld\\n'; echo oops >&2; exit 3",
            timeout=30,
            envs={"X": "1"},
            on_stdout=streamed.append,
        )
        assert (result.stdout, result.stderr, result.exit_code) == ("héllo wörld\n", "oops\n", 3)
        assert "".join(streamed) == "héllo wörld\n"  # text, never a split character
        assert sb.commands.run(["sh", "-c", "echo $X"], envs={"X": "42"}).stdout == "42\n"
    assert my_domains(connection) == before
    sb.kill()  # idempotent


def test_blocking_create_and_kill(settings: Settings, connection: LibvirtConnection) -> None:
    sb = Sandbox.create(settings=settings)
    name = sb.sandbox_id
    try:
        assert sb.commands.run("hostname").stdout.strip() == name
    finally:
        sb.kill()
    assert name not in my_domains(connection)


async def test_async_twin_has_the_same_names(
    settings: Settings, connection: LibvirtConnection
) -> None:
    before = my_domains(connection)
    async with AsyncSandbox(settings=settings) as sb:
        result = await sb.commands.run("echo async", timeout=30)
        assert result.stdout == "async\n" and result.exit_code == 0
    created = await AsyncSandbox.create(settings=settings)
    assert (await created.commands.run("true")).success
    await created.kill()
    await created.kill()
    assert my_domains(connection) == before


async def test_sandboxes_over_a_pool_return_their_vm(runtime: Runtime) -> None:
    async with VMPool(min_size=1, max_size=2, runtime=runtime) as pool:
        async with AsyncSandbox(pool=pool) as sb:
            assert (await sb.commands.run("echo pooled")).stdout == "pooled\n"
            assert pool.stats().in_use == 1
        assert pool.stats().in_use == 0


def test_blocking_sandbox_over_a_pool(settings: Settings) -> None:
    loop = shared_loop()
    # A runtime lives on one event loop: this pool gets its own, on the sandboxes' loop.
    pool = VMPool(min_size=1, max_size=1, settings=settings)
    loop.run(pool.initialize())
    try:
        with Sandbox(pool=pool) as sb:
            assert sb.commands.run("echo from-pool").stdout == "from-pool\n"
        assert loop.run(asyncio.sleep(0, result=pool.stats().in_use)) == 0
    finally:
        loop.run(pool.shutdown())
