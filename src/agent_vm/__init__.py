"""agent-vm: run untrusted CLI coding agents inside real QEMU/KVM virtual machines.

>>> from agent_vm import Sandbox
>>> with Sandbox() as sb:
...     print(sb.commands.run("echo hi").stdout)

The public names below are imported on first use (PEP 562), so importing the package, or
its standard-library-only parts (``protocol``, ``guest``, ``errors``), costs nothing more;
the guest image ships those parts with its own stub of this file.
"""

from __future__ import annotations

import importlib

from agent_vm.version import __version__

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing alone costs ~10 ms

__all__ = [
    "AgentVMError",
    "AgentVMTimeout",
    "AsyncSandbox",
    "EgressPolicy",
    "ExecutionResult",
    "NetworkMode",
    "ResourceProfile",
    "Runtime",
    "Sandbox",
    "Secret",
    "VMPool",
    "Workspace",
    "__version__",
]

_WHERE = {
    "AgentVMError": "agent_vm.errors",
    "AgentVMTimeout": "agent_vm.errors",
    "AsyncSandbox": "agent_vm.sandbox",
    "EgressPolicy": "agent_vm.network.policy",
    "ExecutionResult": "agent_vm.execution.result",
    "NetworkMode": "agent_vm.core.template",
    "ResourceProfile": "agent_vm.core.template",
    "Runtime": "agent_vm.execution.runtime",
    "Sandbox": "agent_vm.sandbox",
    "Secret": "agent_vm.secrets",
    "VMPool": "agent_vm.execution.pool",
    "Workspace": "agent_vm.communication.workspace",
}

if TYPE_CHECKING:
    from agent_vm.communication.workspace import Workspace
    from agent_vm.core.template import NetworkMode, ResourceProfile
    from agent_vm.errors import AgentVMError, AgentVMTimeout
    from agent_vm.execution.pool import VMPool
    from agent_vm.execution.result import ExecutionResult
    from agent_vm.execution.runtime import Runtime
    from agent_vm.network.policy import EgressPolicy
    from agent_vm.sandbox import AsyncSandbox, Sandbox
    from agent_vm.secrets import Secret


def __getattr__(name: str) -> object:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'agent_vm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
