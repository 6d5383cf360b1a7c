"""``agent-vm mcp`` (issue 21): its tools driven by the official ``mcp`` client, in
process against a real server and sandbox, and once end to end over stdio (the way
Claude Code runs it) with a real sandbox."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from mcp import Client, StdioServerParameters

from agent_vm.api.mcptools import build
from agent_vm.api.tokens import TokenStore
from agent_vm.image.store import Image
from tests.integration.servers import Server, running_server

TOOLS = {"create_sandbox", "run_command", "read_file", "write_file", "list_files",
         "remove_sandbox"}  # fmt: skip


@pytest.fixture(scope="module")
def served(image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    root = tmp_path_factory.mktemp("mcp-server")
    _, token = TokenStore(root / "tokens.json").create("mcp", max_sandboxes=4)
    with running_server(root, "--pool", ":light:isolated:1:2", tokens=root / "tokens.json") as s:
        yield s, token


def _value(result: Any) -> Any:
    """A tool's answer: its structured content, else its text (JSON where it is)."""
    assert not result.is_error, result.content
    if result.structured_content is not None:
        found = result.structured_content
        return found.get("result", found) if isinstance(found, dict) else found
    text = "".join(getattr(part, "text", "") for part in result.content)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


async def test_the_tools_in_process(served: tuple[Server, str]) -> None:
    server, token = served
    mcp, tools = build(f"unix://{server.socket}", token)
    try:
        async with Client(mcp) as client:
            listed = await client.list_tools()
            assert {tool.name for tool in listed.tools} == TOOLS
            made = _value(await client.call_tool("create_sandbox", {"network": "isolated"}))
            sid = made["sandbox_id"]
            wrote = await client.call_tool(
                "write_file", {"sandbox_id": sid, "path": "/root/notes/a.txt", "content": "hé"}
            )
            assert _value(wrote)["bytes"] == 3
            ran = _value(await client.call_tool(
                "run_command", {"sandbox_id": sid, "command": "cat /root/notes/a.txt; exit 4"}
            ))  # fmt: skip
            assert (ran["stdout"], ran["exit_code"]) == ("hé", 4)
            read = await client.call_tool(
                "read_file", {"sandbox_id": sid, "path": "/root/notes/a.txt"}
            )
            assert _value(read) == "hé"
            entries = _value(
                await client.call_tool("list_files", {"sandbox_id": sid, "path": "/root/notes"})
            )
            assert [e["path"] for e in entries] == ["/root/notes/a.txt"]
            missing = await client.call_tool("read_file", {"sandbox_id": sid, "path": "/nope"})
            assert missing.is_error  # one line, and the session goes on
            unknown = await client.call_tool(
                "run_command", {"sandbox_id": "sb-x", "command": "true"}
            )
            assert unknown.is_error
            assert "removed" in _value(
                await client.call_tool("remove_sandbox", {"sandbox_id": sid})
            )
            assert sid not in tools.sandboxes
    finally:
        await tools.close()


async def test_end_to_end_over_stdio(served: tuple[Server, str]) -> None:
    server, token = served
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "agent_vm", "mcp", "--server", f"unix://{server.socket}"],
        env={**os.environ, "AGENT_VM_TOKEN": token},
    )
    async with Client(params) as client:
        assert {tool.name for tool in (await client.list_tools()).tools} == TOOLS
        sid = _value(await client.call_tool("create_sandbox", {"network": "isolated"}))[
            "sandbox_id"
        ]
        ran = _value(
            await client.call_tool("run_command", {"sandbox_id": sid, "command": "uname -s"})
        )
        assert ran["stdout"] == "Linux\n"
        # left for the server to stop: the MCP server kills what its session made
    with server.client(token) as api:
        assert api.get("/v1/sandboxes").json() == []
