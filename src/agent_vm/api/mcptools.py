"""``agent-vm mcp``: sandboxes as MCP tools, for Claude Code and other MCP clients.

A stdio server (the official ``mcp`` SDK's ``MCPServer``) over the sandbox API
(``agent_vm.sandbox``), so the same tools work against an ``agent-vm serve`` (``server``)
or against VMs started by this process. The sandboxes it made are the ones it knows;
those still there when the client goes are killed. A tool's refusal (no such sandbox,
a file missing) reaches the client as a tool error with agent-vm's one line.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from mcp.server.mcpserver import MCPServer

from agent_vm.sandbox import AsyncSandbox
from agent_vm.sandbox.base import SandboxState

MAX_READ = 1 << 20  # a file read into the conversation (use commands for more)
MAX_OUTPUT = 256 << 10  # per stream of a command's output sent back


def _clipped(text: str) -> str:
    if len(text) <= MAX_OUTPUT:
        return text
    return text[:MAX_OUTPUT] + f"\n[... {len(text) - MAX_OUTPUT} more characters cut]"


class Tools:
    """The sandboxes one MCP session made, and what its tools do with them."""

    def __init__(self, server: str | None, token: str | None, image: str | None) -> None:
        self.server = server
        self.token = token
        self.image = image
        self.sandboxes: dict[str, AsyncSandbox] = {}

    def _get(self, sandbox_id: str) -> AsyncSandbox:
        found = self.sandboxes.get(sandbox_id)
        if found is None or found.state is not SandboxState.RUNNING:
            known = ", ".join(self.sandboxes) or "none"
            raise ValueError(f"no running sandbox {sandbox_id!r} (this session's: {known})")
        return found

    async def create(self, image: str | None, network: str, lifetime: int) -> dict[str, Any]:
        sandbox = await AsyncSandbox.create(
            server=self.server, token=self.token, image=image or self.image, network=network,
            lifetime_seconds=float(lifetime), labels={"made-by": "mcp"},
        )  # fmt: skip
        self.sandboxes[sandbox.sandbox_id] = sandbox
        return {"sandbox_id": sandbox.sandbox_id, "image": sandbox.info().image or "default"}

    async def run(
        self, sandbox_id: str, command: str, cwd: str | None, timeout: int
    ) -> dict[str, Any]:
        result = await self._get(sandbox_id).commands.run(command, cwd=cwd, timeout=float(timeout))
        return {
            "exit_code": result.exit_code, "stdout": _clipped(result.stdout),
            "stderr": _clipped(result.stderr),
        }  # fmt: skip

    async def read(self, sandbox_id: str, path: str) -> str:
        data = await self._get(sandbox_id).files.read(path, format="bytes")
        assert isinstance(data, bytes)
        if len(data) > MAX_READ:
            raise ValueError(f"{path} has {len(data)} bytes, over {MAX_READ}: read parts of it "
                             "with run_command (head, sed -n)")  # fmt: skip
        return data.decode(errors="replace")

    async def write(self, sandbox_id: str, path: str, content: str) -> dict[str, Any]:
        written = await self._get(sandbox_id).files.write(path, content)
        return {"path": path, "bytes": written}

    async def list(self, sandbox_id: str, path: str, depth: int) -> list[dict[str, Any]]:
        entries = await self._get(sandbox_id).files.list(path, depth=max(1, min(depth, 5)))
        return [{"path": e.path, "type": e.type, "size": e.size} for e in entries]

    async def remove(self, sandbox_id: str) -> str:
        sandbox = self.sandboxes.pop(sandbox_id, None)
        if sandbox is None:
            raise ValueError(f"no sandbox {sandbox_id!r} made in this session")
        await sandbox.kill()
        return f"sandbox {sandbox_id} removed"

    async def close(self) -> None:
        for sandbox_id in list(self.sandboxes):
            with contextlib.suppress(Exception):
                await self.sandboxes.pop(sandbox_id).kill()


def build(
    server: str | None = None, token: str | None = None, image: str | None = None
) -> tuple[MCPServer, Tools]:
    """The MCP server and its tools' state (``tools.close()`` kills what is left)."""
    tools = Tools(server, token, image)
    mcp = MCPServer(
        "agent-vm",
        instructions="Sandboxes are real VMs: create one, run commands and use files in it, "
        "remove it when done. Nothing in a sandbox can reach this machine.",
    )

    @mcp.tool()
    async def create_sandbox(
        image: str | None = None, network: str = "nat", lifetime_seconds: int = 3600
    ) -> dict[str, Any]:
        """Start a sandbox (a VM; image: an agent-vm image, default the default one;
        network: nat or isolated). Returns its sandbox_id."""
        return await tools.create(image, network, lifetime_seconds)

    @mcp.tool()
    async def run_command(
        sandbox_id: str, command: str, cwd: str | None = None, timeout_seconds: int = 120
    ) -> dict[str, Any]:
        """Run a bash command in the sandbox; returns exit_code, stdout and stderr."""
        return await tools.run(sandbox_id, command, cwd, timeout_seconds)

    @mcp.tool()
    async def read_file(sandbox_id: str, path: str) -> str:
        """A file of the sandbox as text (up to 1 MiB)."""
        return await tools.read(sandbox_id, path)

    @mcp.tool()
    async def write_file(sandbox_id: str, path: str, content: str) -> dict[str, Any]:
        """Write text to a file in the sandbox (parents are made)."""
        return await tools.write(sandbox_id, path, content)

    @mcp.tool()
    async def list_files(sandbox_id: str, path: str = "/", depth: int = 1) -> list[dict[str, Any]]:
        """Entries below a directory of the sandbox (depth 1 to 5)."""
        return await tools.list(sandbox_id, path, depth)

    @mcp.tool()
    async def remove_sandbox(sandbox_id: str) -> str:
        """Remove a sandbox this session made (its VM is destroyed)."""
        return await tools.remove(sandbox_id)

    return mcp, tools


@contextlib.asynccontextmanager
async def serving(
    server: str | None, token: str | None, image: str | None
) -> AsyncIterator[MCPServer]:
    mcp, tools = build(server, token, image)
    try:
        yield mcp
    finally:
        await tools.close()


async def run_stdio(server: str | None, token: str | None, image: str | None) -> None:
    """Serve on stdin/stdout until the client closes them."""
    async with serving(server, token, image) as mcp:
        await mcp.run_stdio_async()
