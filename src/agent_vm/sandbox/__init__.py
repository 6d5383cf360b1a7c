"""The sandbox API: ``Sandbox`` (blocking) and ``AsyncSandbox``, with the same names.

>>> from agent_vm.sandbox import Sandbox
>>> with Sandbox() as sb:
...     result = sb.commands.run("echo hi", timeout=10)
...     print(result.stdout, result.exit_code)
"""

from agent_vm.sandbox._async import AsyncCommands, AsyncFiles, AsyncSandbox, CommandResult
from agent_vm.sandbox._sync import Commands, Files, Sandbox, shared_loop

__all__ = [
    "AsyncCommands",
    "AsyncFiles",
    "AsyncSandbox",
    "CommandResult",
    "Commands",
    "Files",
    "Sandbox",
    "shared_loop",
]
