"""Commands in a real booted VM, through the real agent over virtio-serial."""

from __future__ import annotations

import asyncio
import hashlib
import signal

import pytest

import agent_vm
from agent_vm.errors import ConfigError
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.running import RunningVM
from agent_vm.protocol.frame import HEADER, MAGIC, Frame, encode
from agent_vm.protocol.messages import MessageType


async def test_agent_announced_ready(shared_vm: RunningVM) -> None:
    channel = await shared_vm.channel()
    assert channel.ready is not None
    assert channel.ready.agent_version == agent_vm.__version__
    assert channel.ready.protocol == 1
    assert shared_vm.boot_seconds > 0


async def test_stdout_stderr_and_exit_code(shared_vm: RunningVM, executor: AgentExecutor) -> None:
    result = await executor.execute(shared_vm, "echo out; echo err >&2; exit 3")
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 3)
    assert not result.success and not result.timed_out and result.signal is None


async def test_argv_is_not_interpreted_by_a_shell(
    shared_vm: RunningVM, executor: AgentExecutor
) -> None:
    result = await executor.execute(shared_vm, ["echo", "$HOME", ";", "`id`"])
    assert result.stdout == "$HOME ; `id`\n" and result.success


async def test_env_cwd_and_unprivileged_user(shared_vm: RunningVM, executor: AgentExecutor) -> None:
    result = await executor.execute(
        shared_vm, 'echo "$GREETING $(pwd) $(id -u) $HOME"', env={"GREETING": "hi"}, cwd="/tmp"
    )
    assert result.stdout == "hi /tmp 0 /root\n"
    result = await executor.execute(shared_vm, "id -un; touch /root/x", user="agent")
    assert result.stdout == "agent\n"
    assert result.exit_code == 1 and "Permission denied" in result.stderr


async def test_stdin_is_delivered(shared_vm: RunningVM, executor: AgentExecutor) -> None:
    data = bytes(range(256)) * 1000
    result = await executor.execute(shared_vm, ["sha256sum"], stdin=data)
    assert result.stdout.split()[0] == hashlib.sha256(data).hexdigest()


async def test_python_code(shared_vm: RunningVM, executor: AgentExecutor) -> None:
    result = await executor.execute(shared_vm, code="import sys; print(sys.version_info[:2])")
    assert result.stdout.strip() == "(3, 11)"
    with pytest.raises(ConfigError):
        await executor.execute(shared_vm, "true", code="pass")


async def test_missing_program_is_127_with_a_reason(
    shared_vm: RunningVM, executor: AgentExecutor
) -> None:
    result = await executor.execute(shared_vm, ["no-such-program"])
    assert result.exit_code == 127 and result.error and "no-such-program" in result.error


async def test_killed_by_signal(shared_vm: RunningVM, executor: AgentExecutor) -> None:
    result = await executor.execute(shared_vm, "kill -TERM $$")
    assert result.signal == signal.SIGTERM and result.exit_code == 128 + signal.SIGTERM


async def test_timeout_kills_the_whole_process_tree(
    shared_vm: RunningVM, executor: AgentExecutor
) -> None:
    # Children, a grandchild in its own session (escapes the process group), and a
    # process that ignores SIGTERM: all must be gone after the timeout.
    script = (
        "sleep 301 & (sleep 302 &) ; setsid sleep 303 & "
        "sh -c 'trap \"\" TERM; sleep 304' & echo started; wait"
    )
    result = await executor.execute(shared_vm, script, timeout=2)
    assert result.timed_out and result.stdout == "started\n"
    assert result.signal == signal.SIGKILL
    left = await executor.execute(shared_vm, "pgrep -a sleep || true")
    assert left.stdout == ""


async def test_ten_megabytes_of_output_arrive_intact(
    shared_vm: RunningVM, executor: AgentExecutor
) -> None:
    size = 10 * 1024 * 1024
    pattern = b"0123456789abcdefghijklmnopqrstuvwxyz\n"
    expected = (pattern * (size // len(pattern) + 1))[:size]
    seen: list[int] = []
    result = await executor.execute(
        shared_vm,
        f"yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c {size}",
        on_stdout=lambda chunk: seen.append(len(chunk)),
    )
    assert result.success and not result.truncated
    assert result.stdout_bytes == expected
    assert sum(seen) == size and len(seen) > 1  # streamed in chunks, not one blob


async def test_binary_output_is_byte_exact(shared_vm: RunningVM, executor: AgentExecutor) -> None:
    produced = await executor.execute(
        shared_vm, "head -c 3000000 /dev/urandom > /tmp/blob && sha256sum /tmp/blob"
    )
    digest = produced.stdout.split()[0]
    result = await executor.execute(shared_vm, ["cat", "/tmp/blob"])
    assert len(result.stdout_bytes) == 3_000_000
    assert hashlib.sha256(result.stdout_bytes).hexdigest() == digest
    every_byte = await executor.execute(
        shared_vm, code="import sys; sys.stdout.buffer.write(bytes(range(256)) * 64)"
    )
    assert every_byte.stdout_bytes == bytes(range(256)) * 64


async def test_four_concurrent_executions_in_one_vm(
    shared_vm: RunningVM, executor: AgentExecutor
) -> None:
    # Each command waits until all four have started: this only finishes if they
    # really run at the same time.
    await executor.execute(shared_vm, "rm -rf /tmp/conc && mkdir /tmp/conc")
    script = (
        "touch /tmp/conc/{i}; n=0; "
        "while [ $(ls /tmp/conc | wc -l) -lt 4 ]; do sleep 0.05; n=$((n+1)); "
        "[ $n -gt 400 ] && exit 9; done; echo {i}"
    )
    results = await asyncio.gather(
        *(executor.execute(shared_vm, script.format(i=i), timeout=60) for i in range(4))
    )
    assert [r.stdout for r in results] == ["0\n", "1\n", "2\n", "3\n"]
    assert all(r.success for r in results)


async def test_malformed_frames_leave_the_agent_serving(
    shared_vm: RunningVM, executor: AgentExecutor
) -> None:
    channel = await shared_vm.channel()
    channel.agent_errors.clear()
    corrupt = bytearray(encode(Frame(MessageType.PING, 0xABC)))
    corrupt[-1] ^= 0xFF  # payload CRC no longer matches
    oversized = HEADER.pack(MAGIC, 1, MessageType.EXECUTE, 0, 0xDEF, 0x7FFFFFFF, 0)
    await channel.send_raw(b"garbage that is not a frame" + bytes(corrupt) + oversized)
    await channel.send_raw(encode(Frame(MessageType.EXECUTE, 0x123, b"{not json")))
    await channel.send_raw(encode(Frame(0x66, 0x124, b"")))  # unknown type
    result = await executor.execute(shared_vm, "echo still serving")
    assert result.stdout == "still serving\n"
    for _ in range(50):  # the ERROR replies may trail the result slightly
        if len(channel.agent_errors) >= 4:
            break
        await asyncio.sleep(0.05)
    codes = [error.code for _, error in channel.agent_errors]
    assert codes.count("bad_frame") >= 2 and "bad_request" in codes
    assert {rid for rid, _ in channel.agent_errors} >= {0x123, 0x124}


async def test_ping(shared_vm: RunningVM) -> None:
    status = await (await shared_vm.channel()).ping()
    assert status.uptime > 0 and status.mem_available_kib > 0


async def test_reconnect_discards_the_old_session(
    shared_vm: RunningVM, executor: AgentExecutor
) -> None:
    old = await shared_vm.channel()
    chatter = asyncio.create_task(
        executor.execute(shared_vm, "while true; do echo old; sleep 0.01; done", timeout=60)
    )
    await asyncio.sleep(0.5)
    await shared_vm.reconnect()  # new HELLO: the agent kills the old session's commands
    with pytest.raises(Exception):  # noqa: B017 - the old channel's request fails, any way
        await chatter
    assert old.closed
    # 'ol[d]' matches the old loop's command line but not this command's own.
    fresh = await executor.execute(shared_vm, "echo new; pgrep -c -f 'echo ol[d]' || true")
    assert fresh.stdout == "new\n0\n"  # new output only, and the old loop is dead
