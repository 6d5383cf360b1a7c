"""The sandbox API: ``Sandbox`` (blocking) and ``AsyncSandbox``, with the same names.

>>> from agent_vm.sandbox import Sandbox
>>> with Sandbox() as sb:
...     result = sb.commands.run("echo hi", timeout=10)
...     print(result.stdout, result.exit_code)
"""

from agent_vm.sandbox._async import AsyncSandbox
from agent_vm.sandbox._async_commands import (
    AsyncCommandHandle,
    AsyncCommands,
    AsyncPty,
    CommandResult,
)
from agent_vm.sandbox._async_files import AsyncFiles
from agent_vm.sandbox._sync import Sandbox
from agent_vm.sandbox._sync_commands import CommandHandle, Commands, Pty
from agent_vm.sandbox._sync_files import Files
from agent_vm.sandbox.base import CommandInfo, SandboxInfo, SandboxState
from agent_vm.sandbox.twins import shared_loop

__all__ = [
    "AsyncCommandHandle",
    "AsyncCommands",
    "AsyncFiles",
    "AsyncPty",
    "AsyncSandbox",
    "CommandHandle",
    "CommandInfo",
    "CommandResult",
    "Commands",
    "Files",
    "Pty",
    "Sandbox",
    "SandboxInfo",
    "SandboxState",
    "shared_loop",
]
