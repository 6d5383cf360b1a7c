"""The egress proxy of one agent-vm process: start it, tell it about sandboxes, hear it.

The proxy (``proxyd/daemon.py``, mitmproxy) runs as a child process in its own
environment, listening on the sandbox gateway; ``redirect.py`` sends each of this
process's sandboxes' web traffic to it. What it is told of a sandbox (its policy, the
host's ranges, the secrets it injects) goes down a pipe and stays in memory on both
sides: a secret value is never written anywhere. What it reports comes back up the pipe:
refusals go to the blocked-attempt counters, every request to ``on_request`` (the
server's audit log and metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from agent_vm.config import Settings
from agent_vm.errors import ConfigError, NetworkError
from agent_vm.host import egress as env
from agent_vm.logs import get_logger
from agent_vm.network import redirect
from agent_vm.network.policy import EgressPolicy
from agent_vm.network.vmnet import VMNetwork
from agent_vm.secrets import Secret

log = get_logger(__name__)

READY_TIMEOUT = 60.0
RESTART_ATTEMPTS = 5
RESTART_DELAY = 0.2  # seconds, times the attempt
HOST_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")


@dataclass(frozen=True)
class ProxyEvent:
    """One line the proxy reported: ``kind`` is request, denied or splice."""

    kind: str
    vm: str
    data: Mapping[str, Any]


def check_secrets(
    secrets: Mapping[str, Secret], policy: EgressPolicy | None, network: str
) -> None:
    """Refuse, before anything starts, secrets the proxy could never inject."""
    if not secrets:
        return
    if network != "nat":
        raise ConfigError(
            f"secrets {', '.join(sorted(secrets))} are injected by the egress proxy, which "
            f"only a sandbox on the filtered network (network='nat') has, not {network!r}",
            hint="use network='nat', or pass the value as a plain secret",
        )
    for name, secret in secrets.items():
        if not name.isidentifier():
            raise ConfigError(f"secret {name!r}: not a variable name")
        if policy is None or policy.allow_domains is None:
            continue
        for host in secret.hosts:
            probe = "x." + host[2:] if host.startswith("*.") else host
            if not policy.allows_name(probe):
                raise ConfigError(
                    f"secret {name} is bound to {host}, which is not in the sandbox's "
                    f"allowlist {list(policy.allow_domains)}",
                    hint=f"add {host} to allow_domains, or bind the secret to an allowed host",
                )


class EgressProxy:
    """One proxy process per agent-vm process (started with the network guard)."""

    def __init__(
        self,
        settings: Settings,
        gateway: IPv4Address,
        upstreams: list[tuple[str, int]],
        on_event: Callable[[ProxyEvent], None],
    ) -> None:
        self.settings = settings
        self.gateway = gateway
        self.upstreams = upstreams
        self.on_event = on_event
        self.port = 0
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._restarting: asyncio.Task[None] | None = None
        self._bundle: Path | None = None
        # tap -> what the proxy was told of it: told again to a restarted proxy
        self._known: dict[str, tuple[VMNetwork, dict[str, Secret]]] = {}

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise NetworkError("the egress proxy is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def _prepare(self) -> tuple[Path, Path]:
        """Interpreter, CA, the bundle upstream certificates are checked against, the
        nat chain (blocking)."""
        state = self.settings.state_dir
        python = env.ensure_venv(state)
        env.ensure_ca(state)
        bundle = env.egress_dir(state) / f"upstream-ca-{os.getpid()}.pem"  # this process's
        parts = [Path(p).read_text() for p in HOST_BUNDLES if Path(p).exists()]
        if self.settings.egress_upstream_ca is not None:
            parts.append(self.settings.egress_upstream_ca.read_text())
        if not parts:
            raise NetworkError("no CA bundle on this host to check upstream certificates with",
                               hint="apt-get install ca-certificates")  # fmt: skip
        staged = bundle.with_suffix(".tmp")
        staged.write_text("\n".join(parts))
        staged.replace(bundle)
        self._bundle = bundle
        redirect.ensure_base()
        return python, bundle

    def _free_port(self) -> int:
        with socket.socket() as probe:
            probe.bind((str(self.gateway), 0))
            return int(probe.getsockname()[1])

    async def start(self) -> None:
        python, bundle = await asyncio.to_thread(self._prepare)
        self.port = await asyncio.to_thread(self._free_port)
        daemon = resources.files("agent_vm.proxyd").joinpath("daemon.py")
        argv = [
            str(python), str(daemon), "--listen", str(self.gateway), "--port", str(self.port),
            "--confdir", str(env.ca_dir(self.settings.state_dir)), "--upstream-ca", str(bundle),
            *(f"--dns={host}:{port}" for host, port in self.upstreams),
        ]  # fmt: skip
        self._proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            start_new_session=True, limit=1 << 20,
        )  # fmt: skip
        assert self._proc.stdout is not None
        try:
            line = await asyncio.wait_for(self._proc.stdout.readline(), READY_TIMEOUT)
        except TimeoutError:
            line = b""
        if not line.startswith(b'{"ev": "ready"'):
            await self._stop()
            raise NetworkError(
                "the egress proxy did not start",
                hint=f"run {' '.join(argv[:2])} --help to see why",
            )
        self._reader = asyncio.create_task(self._read(), name="egress-proxy-events")
        log.info("egress_proxy_started", port=self.port, pid=self._proc.pid)

    async def _read(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        while line := await proc.stdout.readline():
            try:
                data = json.loads(line)
                event = ProxyEvent(str(data.pop("ev")), str(data.pop("vm")), data)
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            try:
                self.on_event(event)
            except Exception:
                log.exception("egress_event_listener_failed")
        if proc.returncode is None:
            await proc.wait()
        if self._proc is not proc:
            return  # closed (or replaced) by us
        log.error("egress_proxy_exited", code=proc.returncode, sandboxes=len(self._known),
                  remedy="restarted at once; their web traffic fails until it is back")  # fmt: skip
        self._proc = None
        self._restarting = asyncio.create_task(self._restart(), name="egress-proxy-restart")

    async def _restart(self) -> None:
        """A proxy that died (a guest found a bug in it, say) is started again and told
        every sandbox it knew, so neighbours lose seconds of web traffic, not all of it."""
        for attempt in range(1, RESTART_ATTEMPTS + 1):
            await asyncio.sleep(RESTART_DELAY * attempt)
            try:
                await self.start()
                for vm, secrets in list(self._known.values()):
                    await self.configure(vm, secrets)
            except (NetworkError, OSError) as exc:
                log.error("egress_proxy_restart_failed", attempt=attempt, error=str(exc))
                await self._stop()
                continue
            self.restarts += 1
            log.info("egress_proxy_restarted", port=self.port, sandboxes=len(self._known))
            return

    async def _send(self, message: dict[str, Any]) -> None:
        if not self.running:
            raise NetworkError("the egress proxy is not running")
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(message).encode() + b"\n")
        await self._proc.stdin.drain()

    async def configure(self, vm: VMNetwork, secrets: Mapping[str, Secret]) -> None:
        """Tell the proxy of ``vm`` (again, when its policy or secrets change), then
        redirect its web traffic there."""
        self._known[vm.tap] = (vm, dict(secrets))
        addressing, policy = vm.addressing, vm.policy
        local = [f"{a}/32" for a in (addressing.gateway, *addressing.host_addresses)]
        await self._send({
            "op": "vm", "address": str(addressing.address), "vm": vm.vm_name,
            "allow": None if policy.allow_domains is None else list(policy.allow_domains),
            "cidrs": [str(c) for c in policy.allow_cidrs],
            "nonpublic": [str(n) for n in addressing.nonpublic],
            "local": [*local, str(addressing.network)],
            "secrets": [
                {"name": name, "placeholder": s.placeholder, "value": s.value,
                 "hosts": list(s.hosts), "header": s.header}
                for name, s in secrets.items()
            ],
        })  # fmt: skip
        await asyncio.to_thread(redirect.add_vm, vm.tap, self.port, policy.tcp_ports)

    async def forget(self, vm: VMNetwork) -> None:
        self._known.pop(vm.tap, None)
        await asyncio.to_thread(redirect.remove_vm, vm.tap)
        with contextlib.suppress(NetworkError, ConnectionError):
            await self._send({"op": "drop", "address": str(vm.addressing.address)})

    async def close(self) -> None:
        if self._restarting is not None:
            self._restarting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restarting
        await self._stop()
        if self._bundle is not None:
            self._bundle.unlink(missing_ok=True)

    async def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
