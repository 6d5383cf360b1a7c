"""The HTTP backend: sandboxes held by an ``agent-vm serve``, through its API (httpx for
requests, httpx-sse for events). The only module that knows sandboxes can be remote.

``server`` is ``http(s)://host:port`` or a Unix socket path (``/run/agent-vm/api.sock``
or ``unix:///run/agent-vm/api.sock``). The token comes from the argument, from
``AGENT_VM_TOKEN``, or (root, on the server's host) from the server's local token file.
``client.py`` holds the connection, the error mapping and the event following.
"""

from __future__ import annotations

import builtins
import os
import signal as signals
from collections.abc import AsyncIterator, Mapping
from typing import Any

from agent_vm.errors import ConfigError, NotFoundError
from agent_vm.network.policy import Blocked, EgressPolicy
from agent_vm.sandbox import wire
from agent_vm.sandbox.base import (
    CommandInfo,
    CommandSpec,
    Event,
    Exit,
    ExposedPort,
    GuestFigures,
    PoolInfo,
    Progress,
    SandboxHandle,
    SandboxInfo,
    SandboxSpec,
    SandboxState,
    SnapshotInfo,
)
from agent_vm.sandbox.client import RECONNECT_SECONDS, ServerClient
from agent_vm.sandbox.http_files import HttpFiles


class HttpCommand:
    """One command on a server."""

    def __init__(self, client: ServerClient, info: CommandInfo) -> None:
        self.client = client
        self._info = info
        self.url = f"/v1/executions/{info.id}"

    @property
    def id(self) -> str:
        return self._info.id

    def info(self) -> CommandInfo:
        return self._info

    async def follow(self, after: int = -1) -> AsyncIterator[Event]:
        async for data in self.client.events(f"{self.url}/events", after, f"command {self.id}"):
            event = wire.event_from(data)
            yield event
            if isinstance(event, Exit):
                return

    async def send_stdin(self, data: bytes) -> None:
        await self.client.call("POST", f"{self.url}/stdin", content=data)

    async def close_stdin(self) -> None:
        await self.client.call("POST", f"{self.url}/stdin", params={"close": True})

    async def signal(self, signum: int) -> None:
        name = signals.Signals(signum).name.removeprefix("SIG")
        await self.client.call("POST", f"{self.url}/signal", json={"signal": name})

    async def kill(self) -> None:
        await self.client.call("POST", f"{self.url}/kill")

    async def resize(self, cols: int, rows: int) -> None:
        await self.client.call("POST", f"{self.url}/resize", json={"cols": cols, "rows": rows})


def command_body(spec: CommandSpec) -> dict[str, Any]:
    return {
        "cmd": list(spec.cmd) if isinstance(spec.cmd, tuple) else spec.cmd, "code": spec.code,
        "env": dict(spec.envs), "cwd": spec.cwd, "user": spec.user, "timeout": spec.timeout,
        "stdin": wire.b64(spec.stdin) if spec.stdin is not None else None,
        "stdin_open": spec.stdin_open,
        "pty": {"cols": spec.pty[0], "rows": spec.pty[1]} if spec.pty is not None else None,
    }  # fmt: skip


class HttpSandbox(SandboxHandle):
    def __init__(self, client: ServerClient, info: SandboxInfo, auto_resume: bool = False) -> None:
        self.client = client
        self.auto_resume = auto_resume  # the server resumes it: no local state check
        self.keep: dict[str, Any] = {}
        self.id = info.id
        self._info = info
        self.state = info.state
        self.prefix = f"/v1/sandboxes/{info.id}"
        self._files = HttpFiles(client, self.prefix)

    def _update(self, data: Mapping[str, Any]) -> SandboxInfo:
        self._info = wire.sandbox_from(data)
        self.state = self._info.state
        return self._info

    def info(self) -> SandboxInfo:
        return self._info

    async def refresh(self) -> SandboxInfo:
        return self._update(await self.client.json("GET", self.prefix))

    async def run(self, spec: CommandSpec) -> HttpCommand:
        if not (self.auto_resume and self.state is SandboxState.PAUSED):
            self._require("run")
        data = await self.client.json("POST", f"{self.prefix}/executions", json=command_body(spec))
        return HttpCommand(self.client, wire.command_from(data))

    async def command(self, command_id: str) -> HttpCommand:
        self._require("command")
        data = await self.client.json("GET", f"/v1/executions/{command_id}")
        return HttpCommand(self.client, wire.command_from(data))

    async def commands(self) -> list[CommandInfo]:
        self._require("commands")
        data = await self.client.json("GET", f"{self.prefix}/executions")
        return [wire.command_from(item) for item in data]

    @property
    def files(self) -> HttpFiles:
        self._require("files")
        return self._files

    async def policy(self) -> EgressPolicy | None:
        self._require("policy")
        data = await self.client.json("GET", f"{self.prefix}/policy")
        return EgressPolicy.model_validate(data) if data is not None else None

    async def set_policy(self, policy: EgressPolicy) -> None:
        self._require("set_policy")
        await self.client.call("PUT", f"{self.prefix}/policy", json=policy.model_dump(mode="json"))

    async def blocked(self) -> list[Blocked]:
        self._require("blocked")
        data = await self.client.json("GET", f"{self.prefix}/blocked")
        return [wire.blocked_from(item) for item in data]

    async def blocked_count(self) -> int:
        return len(await self.blocked())

    async def expose(
        self, port: int, *, token: str | None = None, host: str = "127.0.0.1"
    ) -> ExposedPort:
        """On the server's host: it picks the address and the token."""
        self._require("expose")
        del token, host
        data = await self.client.json("POST", f"{self.prefix}/ports", json={"port": port})
        return ExposedPort(int(data["port"]), str(data["host"]), str(data["url"]), data["token"])

    async def stats(self) -> GuestFigures:
        self._require("stats")
        return wire.figures_from(await self.client.json("GET", f"{self.prefix}/stats"))

    async def pause(self, reason: str = "requested", to_disk: bool = True) -> None:
        self._require("pause")
        self._update(await self.client.json("POST", f"{self.prefix}/pause"))

    async def resume(self) -> None:
        self._require("resume")
        self._update(await self.client.json("POST", f"{self.prefix}/resume"))

    async def snapshot(self, name: str) -> SnapshotInfo:
        self._require("snapshot")
        data = await self.client.json("POST", f"{self.prefix}/snapshot", json={"name": name})
        return wire.snapshot_from(data)

    async def fork(self, count: int = 1) -> builtins.list[SandboxHandle]:
        self._require("fork")
        data = await self.client.json("POST", f"{self.prefix}/fork", json={"count": count})
        return [HttpSandbox(self.client, wire.sandbox_from(item)) for item in data]

    async def keep_alive(self, lifetime: float) -> None:
        body = {"lifetime_seconds": lifetime}
        self._update(await self.client.json("POST", f"{self.prefix}/keepalive", json=body))

    async def close(self) -> None:
        if self.state in (SandboxState.CLOSING, SandboxState.CLOSED):
            return
        self.state = SandboxState.CLOSING
        try:
            await self.client.call("DELETE", self.prefix)
        except NotFoundError:
            pass  # gone already (its lifetime ended, or another client removed it)
        finally:
            self.state = SandboxState.CLOSED


class HttpBackend:
    """Sandboxes on one ``agent-vm serve``."""

    def __init__(
        self, server: str | None, token: str | None = None, *,
        reconnect_seconds: float = RECONNECT_SECONDS,
    ) -> None:  # fmt: skip
        self._args = (server, token, reconnect_seconds)
        self.client = ServerClient(server, token, reconnect_seconds)

    def check(self, spec: SandboxSpec) -> None:
        """What a server cannot be asked for, refused before anything is sent."""
        workspace = spec.workspace
        if workspace is not None and (workspace.layout or workspace.quota_bytes is not None):
            raise ConfigError(
                "through a server a workspace is a directory and readonly only",
                hint="pass workspace=PATH (below the server's --workspace-root)",
            )

    async def acquire(self, spec: SandboxSpec, progress: Progress | None = None) -> HttpSandbox:
        profile = spec.profile if isinstance(spec.profile, str) else spec.profile.model_dump()
        body = {
            "image": spec.image, "profile": profile, "network": spec.network,
            "labels": dict(spec.labels), "lifetime_seconds": spec.lifetime, "cold": spec.cold,
            "policy": spec.policy.model_dump(mode="json") if spec.policy is not None else None,
            "anomaly_action": spec.anomaly_action, "snapshot": spec.snapshot,
            "on_expiry": spec.on_expiry, "auto_resume": spec.auto_resume,
            "proxied_secrets": {
                name: {"value": s.value, "hosts": list(s.hosts), "header": s.header,
                       "placeholder": s.placeholder}
                for name, s in spec.proxied.items()
            },
            "workspace": {"path": os.fspath(spec.workspace.path.absolute()),
                          "readonly": spec.workspace.readonly}
            if spec.workspace is not None else None,
        }  # fmt: skip
        if self.client.http.is_closed:  # used again after close()
            self.client = ServerClient(*self._args)
        data = await self.client.json("POST", "/v1/sandboxes", json=body)
        return HttpSandbox(self.client, wire.sandbox_from(data), spec.auto_resume)

    async def get(self, sandbox_id: str) -> HttpSandbox:
        data = await self.client.json("GET", f"/v1/sandboxes/{sandbox_id}")
        return HttpSandbox(self.client, wire.sandbox_from(data))

    async def list(self) -> builtins.list[SandboxHandle]:
        data = await self.client.json("GET", "/v1/sandboxes")
        return [HttpSandbox(self.client, wire.sandbox_from(item)) for item in data]

    async def release(self, handle: SandboxHandle) -> None:
        await handle.close()

    async def pools(self) -> builtins.list[PoolInfo]:
        return [wire.pool_from(item) for item in await self.client.json("GET", "/v1/pools")]

    async def snapshots(self) -> builtins.list[SnapshotInfo]:
        return [wire.snapshot_from(item) for item in await self.client.json("GET", "/v1/snapshots")]

    async def remove_snapshot(self, name: str) -> None:
        await self.client.call("DELETE", f"/v1/snapshots/{name}")

    async def close(self) -> None:
        await self.client.close()
