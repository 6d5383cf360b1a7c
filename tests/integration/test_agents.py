"""Real agents in real sandboxes: the Claude Code binary and Aider, from the images of the
shipped recipes, edit a workspace file through their own tools, driven by the scripted
model API on the test host. Their allowlist resolves only the test host's name: every
other name they try (update checks, telemetry, the real APIs) is refused, and the test
says which were.

The first run builds both images from the recipes (npm and PyPI at build time, about
three minutes here); later runs reuse them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets as token
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.running import RunningVM
from agent_vm.execution.runtime import Runtime
from agent_vm.image.recipe import find_recipe
from agent_vm.image.store import Image
from agent_vm.network.guard import NetworkGuard
from tests.integration.agent_tasks import (
    AIDER_ARGS,
    AIDER_REPLY,
    API,
    CLAUDE_ARGS,
    CLAUDE_SCRIPT,
    CODEX_ARGS,
    CODEX_SCRIPT,
    EDITED,
    NONESSENTIAL_SWITCHES,
    control,
    project,
    run_agent,
)  # fmt: skip
from tests.integration.servers import running_server
from tests.integration.test_secrets import files_holding
from tests.integration.testnet import TestHost

CLI = [sys.executable, "-m", "agent_vm"]


@pytest_asyncio.fixture(scope="module")
async def claude_image(runtime: Runtime) -> Image:
    return await runtime.build_recipe(find_recipe("claude").path)


@pytest_asyncio.fixture(scope="module")
async def aider_image(runtime: Runtime) -> Image:
    return await runtime.build_recipe(find_recipe("aider").path)


@pytest_asyncio.fixture(scope="module")
async def codex_image(runtime: Runtime) -> Image:
    return await runtime.build_recipe(find_recipe("codex").path)


async def test_claude_code_edits_a_workspace_file(
    runtime: Runtime, claude_image: Image, guard: NetworkGuard, test_host: TestHost,
    tmp_path: Path, scripted_model: None,
) -> None:  # fmt: skip
    """Over HTTPS, with the key injected by the host's egress proxy: the guest holds a
    placeholder, and neither its environment, its disk nor its memory (QEMU's, read
    from the host) ever holds the key."""
    workspace = project(tmp_path)
    key = f"sk-ant-test-{token.token_hex(8)}"
    control("/_script", CLAUDE_SCRIPT)
    # the recipe's switches for telemetry, error reports and update checks turned off
    # here, so that the policy is what stops them
    traffic_on = {name: "" for name in NONESSENTIAL_SWITCHES}
    traces: dict[str, Any] = {}

    async def look(vm: RunningVM) -> None:
        env = await AgentExecutor().execute(vm, "cat /proc/[0-9]*/environ | tr '\\0' '\\n'")
        traces["env"] = env.stdout
        assert vm.qemu_pid is not None
        traces["memory"] = process_memory_holds(vm.qemu_pid, key.encode(), b"agentvm-secret-")
        traces["disk"] = files_holding(key.encode(), [vm.workdir, workspace], 0)

    code, out, err, refused = await run_agent(
        runtime, claude_image, "claude", CLAUDE_ARGS, workspace, key,
        base_url=f"https://{API}", extra_env=traffic_on, inspect=look,
    )  # fmt: skip
    asked = control("/_requests")
    assert code == 0, f"stdout: {out}\nstderr: {err}\nrequests: {[r['path'] for r in asked]}"
    assert (workspace / "greet.py").read_text() == EDITED
    assert "hello, world" in out
    with_tools = [r for r in asked if r["body"].get("tools")]
    assert len(with_tools) == 3, [r["path"] for r in asked]
    assert {r["key"] for r in asked} == {key}  # the key arrived, put in by the proxy
    assert "SHLVL" in traces["env"] and key not in traces["env"]  # every process's env
    # the scan works (it finds the placeholder in the guest's RAM) and finds no key
    assert traces["memory"] == {key.encode(): False, b"agentvm-secret-": True}
    assert traces["disk"] == []
    # the tool results went back to the model: the Read saw the file's content
    assert "return 'hello'" in json.dumps(with_tools[1]["body"]["messages"])
    # its own traffic (metrics, feature flags, update checks) goes to the real API's
    # name, which the policy refused: the only name it got was the test host's
    assert "api.anthropic.com" in refused and API not in refused, refused
    print(f"Claude Code's names refused by the policy: {sorted(refused)}")


async def test_aider_edits_a_workspace_file(
    runtime: Runtime, aider_image: Image, guard: NetworkGuard, test_host: TestHost,
    tmp_path: Path, scripted_model: None,
) -> None:  # fmt: skip
    workspace = project(tmp_path)
    key = f"sk-test-{token.token_hex(8)}"
    control("/_script", AIDER_REPLY)
    args = AIDER_ARGS
    code, out, err, refused = await run_agent(
        runtime, aider_image, "aider", args, workspace, key, f"http://{API}/v1"
    )
    asked = control("/_requests")
    assert code == 0, f"stdout: {out}\nstderr: {err}\nrequests: {[r['path'] for r in asked]}"
    assert (workspace / "greet.py").read_text() == EDITED, out
    chats = [r for r in asked if r["path"] == "/v1/chat/completions"]
    assert chats and {r["key"] for r in chats} == {key}
    assert "return 'hello'" in json.dumps(chats[0]["body"]["messages"])  # it sent the file
    # its model-price download (litellm's table on GitHub) was refused, not made
    assert "raw.githubusercontent.com" in refused and API not in refused
    print(f"Aider's names refused by the policy: {sorted(refused)}")


async def test_codex_edits_a_workspace_file(
    runtime: Runtime, codex_image: Image, guard: NetworkGuard, test_host: TestHost,
    tmp_path: Path, scripted_model: None,
) -> None:  # fmt: skip
    workspace = project(tmp_path)
    key = f"sk-test-{token.token_hex(8)}"
    control("/_script", CODEX_SCRIPT)
    code, out, err, refused = await run_agent(
        runtime, codex_image, "codex", CODEX_ARGS, workspace, key, f"http://{API}/v1"
    )
    asked = control("/_requests")
    assert code == 0, f"stdout: {out}\nstderr: {err}\nrequests: {[r['path'] for r in asked]}"
    assert (workspace / "greet.py").read_text() == EDITED
    turns = [r for r in asked if r["path"] == "/v1/responses"]
    assert len(turns) == 2 and {r["key"] for r in turns} == {key}
    # the second turn carried the result of Codex's own apply_patch back to the model
    assert "custom_tool_call_output" in json.dumps(turns[1]["body"]["input"])
    assert "Done: greet() now says hello, world." in out
    # its plugin sync (GitHub) and its ChatGPT back end were refused, not reached
    assert {"github.com", "chatgpt.com"} <= refused and API not in refused, refused
    print(f"Codex's names refused by the policy: {sorted(refused)}")


def process_memory_holds(pid: int, *needles: bytes) -> dict[bytes, bool]:
    """Which of ``needles`` are anywhere in process ``pid``'s readable memory (for QEMU:
    the guest's RAM and everything QEMU holds), read through /proc/PID/mem."""
    found = dict.fromkeys(needles, False)
    longest = max(map(len, needles))
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            tail = b""
            while start < end:
                try:
                    mem.seek(start)
                    chunk = mem.read(min(16 << 20, end - start))
                except (OSError, OverflowError, ValueError):
                    break
                for needle in needles:
                    found[needle] = found[needle] or needle in tail + chunk
                tail, start = chunk[-longest:], start + len(chunk)
                if not chunk:
                    break
    return found


@pytest.mark.parametrize("where", ["local", "server"])
def test_the_agent_command_runs_claude_headless(
    where: str,
    claude_image: Image,
    test_host: TestHost,
    tmp_path: Path,
    scripted_model: None,
) -> None:
    """``agent-vm agent claude`` as a user types it: image (built), workspace, key from
    the environment, base URL, headless without a terminal, the agent's exit code; on
    this host, or through a server found on its socket."""
    workspace = project(tmp_path)
    key = f"sk-ant-test-{token.token_hex(8)}"
    control("/_script", CLAUDE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "AGENT_VM_TOKEN"}
    with contextlib.ExitStack() as stack:
        server = None
        if where == "server":
            server = stack.enter_context(running_server(tmp_path / "server"))
            env["AGENT_VM_SOCKET"] = str(server.socket)
        proc = subprocess.run(
            [*CLI, "agent", "claude", "--workspace", str(workspace), "--base-url",
             f"https://{API}", "--", "Make greet() say hello, world."],
            env={**env, "ANTHROPIC_API_KEY": key}, capture_output=True, timeout=900,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if server is not None:
            log = server.log_path.read_text()
            assert "sandbox_created" in log and key not in log
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert (workspace / "greet.py").read_text() == EDITED
    assert {r["key"] for r in control("/_requests")} == {key}  # injected by the proxy
    assert key.encode() not in proc.stderr


def test_the_agent_command_says_what_is_missing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    proc = subprocess.run(
        [*CLI, "agent", "claude", "--workspace", str(tmp_path), "--", "hi"],
        env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 125
    assert "ANTHROPIC_API_KEY is not set" in proc.stderr
    assert "Traceback" not in proc.stderr
