"""What the server records and watches: the audit log, the metrics, and a monitor that
looks at every sandbox each ``monitor_interval`` (libvirt's bulk stats in one call, the
guard's blocked counts, the guest's PING every few looks), feeds the anomaly detector and
acts on its alerts.

The monitor reports alerts to whoever attached it (the service), which acts on them:
this module never calls the service (no import cycle, one owner of the actions).

Actions: rule alerts (blocked burst, output flood, process storm, disk filling) get the
sandbox's action (its own, else the server's ``anomaly_action``): ``log``, ``pause``
(the domain is suspended; executions are refused until ``resume``) or ``kill`` (the
sandbox is removed). z-score alerts are statistical, so they are logged and counted
only: a sandbox that starts real work after idling must not be stopped for it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent_vm.config import Settings
from agent_vm.errors import AgentVMError
from agent_vm.execution.shells import PoolStats
from agent_vm.logs import get_logger
from agent_vm.monitoring.anomaly import Alert, AnomalyDetector, Thresholds, Tick
from agent_vm.monitoring.audit import AuditLogger
from agent_vm.monitoring.metrics import (
    DomainFigures,
    GuestFigures,
    MetricsCollector,
    Sources,
    Target,
    bulk_stats,
    reason_class,
)
from agent_vm.sandbox.base import Exit, SandboxHandle, SandboxState

log = get_logger(__name__)

RULES = {"blocked_burst", "output_flood", "process_storm", "disk_filling"}
PING_EVERY = 5  # looks
VIOLATION_SAMPLE = 5  # destinations named per audit event


@dataclass(frozen=True)
class Watched:
    """A sandbox as the monitor sees it."""

    id: str
    owner: str
    handle: SandboxHandle
    domain: str | None  # its libvirt domain (bulk stats), where it has one


Act = Callable[[str, list[Alert]], Awaitable[None]]


class Watch:
    def __init__(
        self,
        settings: Settings,
        *,
        audit: AuditLogger | None = None,
        connection: Callable[[], Any] | None = None,
        pools: Callable[[], Mapping[str, PoolStats]] = dict,
        held: Callable[[], Mapping[str, int]] = dict,
    ) -> None:
        self.settings = settings
        self.audit = audit
        self.connection = connection  # libvirt, for bulk stats (None: no domains here)
        self.metrics = MetricsCollector()
        self.detector = AnomalyDetector(Thresholds.from_settings(settings))
        self.guest: dict[str, GuestFigures] = {}  # by domain
        self._blocked_seen: dict[str, int] = {}  # by sandbox
        self._blocked_total: dict[str, int] = {}  # by domain, for the scrape
        self._task: asyncio.Task[None] | None = None
        self._live: Callable[[], list[Watched]] = list
        self.metrics.sources = Sources(
            connection=connection,
            targets=lambda: [
                Target(w.id, w.domain, w.owner) for w in self._live() if w.domain is not None
            ],
            pools=pools,
            blocked=lambda domain: self._blocked_total.get(domain, 0),
            guest=self.guest,
            held=held,
        )

    def record(self, event: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.log(event, **fields)

    # ------------------------------------------------------------------ wiring

    def attach(self, live: Callable[[], list[Watched]], act: Act) -> None:
        """Watch what ``live`` returns; hand alerts to ``act`` (sandbox id, alerts)."""
        self._live = live
        self._task = asyncio.create_task(self._monitor(act), name="agent-vm-monitor")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.audit is not None:
            self.audit.close()

    # ------------------------------------------------------------------ events

    def sandbox_gone(self, sandbox_id: str, owner: str, domain: str | None, reason: str) -> None:
        self.detector.forget(sandbox_id)
        if domain is not None:
            self.guest.pop(domain, None)
            self._blocked_total.pop(domain, None)
        self._blocked_seen.pop(sandbox_id, None)
        self.record("sandbox_deleted", sandbox=sandbox_id, owner=owner, reason=reason)

    def command_finished(
        self, sandbox_id: str, owner: str, command_id: str, exit: Exit | None, seconds: float,
        output_bytes: int, *, terminal: bool = False, live: bool = True,
    ) -> list[Alert]:  # fmt: skip
        if exit is None or (exit.exit_code is None and exit.failure is None):
            outcome = "killed"  # its sandbox went first
        elif exit.signal == 9 and not exit.timed_out:
            outcome = "killed"
        elif exit.timed_out:
            outcome = "timeout"
        elif exit.failure is not None:
            outcome = "error"
        else:
            outcome = "ok" if exit.exit_code == 0 else "nonzero"
        exit_code = exit.exit_code if exit is not None else None
        if terminal:
            self.record("terminal_ended", sandbox=sandbox_id, execution=command_id, owner=owner,
                        exit_code=exit_code, signal=exit.signal if exit else None)  # fmt: skip
            return []
        self.metrics.observe_execution(outcome, seconds)
        self.record("execution_finished", sandbox=sandbox_id, execution=command_id,
                    owner=owner, outcome=outcome, exit_code=exit_code,
                    duration=round(seconds, 4), output_bytes=output_bytes,
                    error=exit.error if exit else None)  # fmt: skip
        if not live:
            return []  # removed meanwhile (deleted, killed): nothing to watch any more
        return self.detector.execution(sandbox_id, seconds, output_bytes)

    def actions(
        self, alerts: Sequence[Alert], own: str | None, owner: str
    ) -> list[tuple[str, str]]:
        """Each alert logged, counted and audited; the (action, rule) pairs to carry out:
        a rule's alert gets the sandbox's action (``own``) or the server's, a statistical
        one is logged only."""
        todo = []
        for alert in alerts:
            action = (own or self.settings.anomaly_action) if alert.rule in RULES else "log"
            log.warning("anomaly", sandbox=alert.sandbox, rule=alert.rule, detail=alert.detail,
                        action=action)  # fmt: skip
            self.metrics.alerts.labels(alert.rule, action).inc()
            self.record("anomaly", sandbox=alert.sandbox, owner=owner, rule=alert.rule,
                        detail=alert.detail, value=alert.value, action=action)  # fmt: skip
            if action != "log":
                todo.append((action, alert.rule))
        return todo

    def egress(self, sandbox_id: str, owner: str, kind: str, data: Mapping[str, Any]) -> None:
        """What the egress proxy reported of a sandbox: counted, and its requests and
        spliced connections audited (refusals are in its blocked attempts too). The proxy
        reports each refusal once as ``denied``: that is what counts it, not the 403's
        request line (a refused TLS name the guest cannot be answered on has none)."""
        if kind == "request":
            self.record("egress_request", sandbox=sandbox_id, owner=owner,
                        method=data.get("method"), host=data.get("host"),
                        path=data.get("path"), status=data.get("status"),
                        bytes=data.get("bytes"), injected=data.get("injected") or [],
                        denied=data.get("denied"))  # fmt: skip
            if data.get("denied"):
                return
            decision = "injected" if data.get("injected") else "forwarded"
        elif kind == "splice":
            decision = "spliced"
            self.record("egress_connection", sandbox=sandbox_id, owner=owner,
                        host=data.get("host"), port=data.get("port"), spliced=True)  # fmt: skip
        elif kind == "denied":
            decision = "denied"
        else:
            return
        self.metrics.egress.labels(decision).inc()

    # ------------------------------------------------------------------ the monitor

    async def _monitor(self, act: Act) -> None:
        looks = 0
        while True:
            await asyncio.sleep(self.settings.monitor_interval)
            looks += 1
            try:
                await self._look(act, ping=looks % PING_EVERY == 1)
            except Exception as exc:  # a bad look must not end the watching
                log.warning("monitor_look_failed", error=str(exc))

    async def _look(self, act: Act, *, ping: bool) -> None:
        watched = self._live()
        if not watched:
            return
        figures: dict[str, DomainFigures] = {}
        domains = {w.domain for w in watched if w.domain is not None}
        if self.connection is not None and domains:
            figures = await asyncio.to_thread(bulk_stats, self.connection(), domains)
        if ping:
            await asyncio.gather(*(self._ping(w) for w in watched))
        for sandbox in watched:
            found = figures.get(sandbox.domain) if sandbox.domain else None
            tick = await self._tick(sandbox, found)
            alerts = self.detector.tick(sandbox.id, tick)
            if alerts:
                await act(sandbox.id, alerts)

    async def _ping(self, watched: Watched) -> None:
        if watched.handle.state is not SandboxState.RUNNING or watched.domain is None:
            return
        with contextlib.suppress(AgentVMError, OSError, TimeoutError):
            figures = await watched.handle.stats()
            self.guest[watched.domain] = GuestFigures(figures.load1, figures.mem_available_kib)

    async def _tick(self, watched: Watched, found: DomainFigures | None) -> Tick:
        total, seen = 0, self._blocked_seen.get(watched.id, 0)
        with contextlib.suppress(AgentVMError):
            total = await watched.handle.blocked_count()
        if total > seen:
            with contextlib.suppress(AgentVMError):
                fresh = (await watched.handle.blocked())[-(total - seen) :]
                for attempt in fresh:
                    self.metrics.blocked.labels(attempt.kind, reason_class(attempt.reason)).inc()
                self.record("policy_violation", sandbox=watched.id, owner=watched.owner,
                            count=total - seen, total=total,
                            sample=[f"{a.kind} {a.destination}:{a.port} ({a.reason})"
                                    for a in fresh[:VIOLATION_SAMPLE]])  # fmt: skip
        self._blocked_seen[watched.id] = total
        if watched.domain is not None:
            self._blocked_total[watched.domain] = total
        guest = self.guest.get(watched.domain) if watched.domain else None
        return Tick(
            cpu_seconds=found.cpu_seconds if found else None,
            net_bytes=(found.net_rx_bytes + found.net_tx_bytes) if found else None,
            blocked_total=total,
            load1=guest.load1 if guest else None,
            disk_used=found.disk_allocation_bytes if found else None,
            disk_cap=found.disk_capacity_bytes if found else None,
        )
