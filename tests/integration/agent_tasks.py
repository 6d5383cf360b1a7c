"""Scripted agent tasks shared by the agent tests and ``bench/agents.py``: a project
with one file, the model's turns that make each agent edit it, and one run of an agent
in a sandbox whose allowlist is the scripted API's name only."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent_vm.communication.workspace import Workspace
from agent_vm.execution.agents import agent_plan
from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.running import RunningVM
from agent_vm.execution.runtime import Runtime
from agent_vm.image.recipe import find_recipe
from agent_vm.image.store import Image
from agent_vm.network.policy import EgressPolicy
from agent_vm.secrets import Secret

API = "api.allowed.test"
TEST_HOST_IP = "198.51.100.10"
ORIGINAL = "def greet():\n    return 'hello'\n"
EDITED = "def greet():\n    return 'hello, world'\n"


def control(path: str, body: Any | None = None, test_host_ip: str = TEST_HOST_IP) -> Any:
    """The scripted API's control endpoints, from the host."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{test_host_ip}{path}", data=data)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "greet.py").write_text(ORIGINAL)
    return root


# the claude recipe's switches for telemetry, error reports and update checks
NONESSENTIAL_SWITCHES = (
    "DISABLE_AUTOUPDATER", "DISABLE_TELEMETRY", "DISABLE_ERROR_REPORTING",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC",
)  # fmt: skip
CLAUDE_SCRIPT = {
    "tools_only": True,  # Claude Code's side calls (titles, summaries) get a plain "done"
    "turns": [
        {"text": "Reading it.", "tool_calls": [
            {"name": "Read", "input": {"file_path": "/workspace/greet.py"}}]},
        {"text": "Editing it.", "tool_calls": [
            {"name": "Edit", "input": {"file_path": "/workspace/greet.py",
                                       "old_string": "'hello'", "new_string": "'hello, world'"}}]},
        {"text": "Done: greet() now says hello, world."},
    ],
}  # fmt: skip


async def run_agent(
    runtime: Runtime, image: Image, name: str, args: list[str], workspace: Path, key: str,
    base_url: str = f"http://{API}", extra_env: dict[str, str] | None = None,
    inspect: Callable[[RunningVM], Awaitable[None]] | None = None,
) -> tuple[int, str, str, set[str]]:  # fmt: skip
    """Run an agent in a fresh VM; ``inspect`` looks at the VM after it finished."""
    plan = agent_plan(find_recipe(name), args, base_url, {_key_env(name): key}, tty=False)
    assert plan.allowlist == (API,)
    vm = await runtime.vm(
        image=image,
        spec=runtime.spec(profile="standard"),
        policy=EgressPolicy(allow_domains=plan.allowlist),
    )
    try:
        proxied = {k: v for k, v in plan.secrets.items() if isinstance(v, Secret)}
        if proxied:  # the host's proxy holds the key; the VM gets the placeholder
            await vm.set_secrets(proxied)
        hidden = {k: v.placeholder if isinstance(v, Secret) else v for k, v in plan.secrets.items()}
        await vm.attach_workspace(Workspace(path=workspace))
        result = await AgentExecutor().execute(
            vm, plan.command, env={**plan.env, **(extra_env or {}), **hidden}, timeout=900
        )
        if inspect is not None:
            await inspect(vm)
        refused = {b.destination for b in vm.guard.blocked(vm.name)} if vm.guard else set()
    finally:
        await vm.close()
    return result.exit_code, result.stdout, result.stderr, refused


def _key_env(name: str) -> str:
    agent = find_recipe(name).recipe.agent
    assert agent is not None and agent.api_key_env
    return agent.api_key_env


AIDER_REPLY = [{"text": f"greet.py\n```python\n{EDITED}```\n"}]  # the "whole" edit format
AIDER_ARGS = [
    "--model", "openai/gpt-test", "--edit-format", "whole", "--no-show-model-warnings",
    "--message", "Make greet() say hello, world.", "greet.py",
]  # fmt: skip
CLAUDE_ARGS = ["Make greet() say hello, world."]

# Codex (0.171) offers one freeform tool, ``exec``: JavaScript that calls its nested
# tools; the script has it call its own ``apply_patch`` on the file, then answer
CODEX_PATCH = (
    "*** Begin Patch\n*** Update File: greet.py\n@@\n-    return 'hello'\n"
    "+    return 'hello, world'\n*** End Patch\n"
)
CODEX_JS = f"text(JSON.stringify(await tools.apply_patch({json.dumps(CODEX_PATCH)})));"
CODEX_SCRIPT = {
    "tools_only": True,
    "turns": [
        {"text": "Patching greet.py.", "tool_calls": [
            {"name": "exec", "custom": True,
             "input": CODEX_JS}]},
        {"text": "Done: greet() now says hello, world."},
    ],
}  # fmt: skip
CODEX_ARGS = ["Make greet() say hello, world."]
