"""What the server records and watches: the audit log, the metrics, and a monitor that
looks at every sandbox each ``monitor_interval`` (libvirt's bulk stats in one call, the
guard's blocked counts, the guest's PING every few looks), feeds the anomaly detector and
acts on its alerts.

Actions: rule alerts (blocked burst, output flood, process storm, disk filling) get the
sandbox's action (its own, else the server's ``anomaly_action``): ``log``, ``pause``
(the domain is suspended; executions are refused until ``resume``) or ``kill`` (the
sandbox is removed). z-score alerts are statistical, so they are logged and counted
only: a sandbox that starts real work after idling must not be stopped for it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from agent_vm.config import Settings
from agent_vm.errors import AgentVMError
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

if TYPE_CHECKING:
    from agent_vm.api.service import Hosted, SandboxService

log = get_logger(__name__)

RULES = {"blocked_burst", "output_flood", "process_storm", "disk_filling"}
PING_EVERY = 5  # looks
VIOLATION_SAMPLE = 5  # destinations named per audit event


class Watch:
    def __init__(self, settings: Settings, *, audit: AuditLogger | None = None) -> None:
        self.settings = settings
        self.audit = audit
        self.metrics = MetricsCollector()
        self.detector = AnomalyDetector(Thresholds.from_settings(settings))
        self.guest: dict[str, GuestFigures] = {}
        self._blocked_seen: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._live: Callable[[], Mapping[str, object]] = dict

    def record(self, event: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.log(event, **fields)

    # ------------------------------------------------------------------ wiring

    def attach(self, service: SandboxService) -> None:
        runtime = service.runtime
        self._live = lambda: service.sandboxes
        self.metrics.sources = Sources(
            connection=lambda: runtime.connection.connection,
            targets=lambda: [
                Target(h.id, h.vm.name, h.owner) for h in list(service.sandboxes.values())
            ],
            pools=lambda: service.source.pool_stats(),
            blocked=lambda vm: self._blocked_count(service, vm),
            guest=self.guest,
        )
        self._task = asyncio.create_task(self._monitor(service), name="agent-vm-monitor")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.audit is not None:
            self.audit.close()

    @staticmethod
    def _blocked_count(service: SandboxService, vm_name: str) -> int:
        for hosted in list(service.sandboxes.values()):
            if hosted.vm.name == vm_name and hosted.vm.guard is not None:
                return hosted.vm.guard.blocked_count(vm_name)
        return 0

    # ------------------------------------------------------------------ events

    def sandbox_gone(self, hosted: Hosted, reason: str) -> None:
        self.detector.forget(hosted.id)
        self.guest.pop(hosted.vm.name, None)
        self._blocked_seen.pop(hosted.id, None)
        self.record("sandbox_deleted", sandbox=hosted.id, owner=hosted.owner, reason=reason)

    def execution_finished(
        self, hosted: Hosted, execution_id: str, result: dict[str, Any], seconds: float,
        output_bytes: int,
    ) -> list[Alert]:  # fmt: skip
        if result.get("killed"):
            outcome = "killed"
        elif result.get("timed_out"):
            outcome = "timeout"
        elif result.get("exit_code") is None:
            outcome = "error"
        else:
            outcome = "ok" if result["exit_code"] == 0 else "nonzero"
        self.metrics.observe_execution(outcome, seconds)
        self.record("execution_finished", sandbox=hosted.id, execution=execution_id,
                    owner=hosted.owner, outcome=outcome, exit_code=result.get("exit_code"),
                    duration=round(seconds, 4), output_bytes=output_bytes,
                    error=result.get("error"))  # fmt: skip
        if hosted.id not in self._live():
            return []  # removed meanwhile (deleted, killed): nothing to watch any more
        return self.detector.execution(hosted.id, seconds, output_bytes)

    # ------------------------------------------------------------------ the monitor

    async def _monitor(self, service: SandboxService) -> None:
        looks = 0
        while True:
            await asyncio.sleep(self.settings.monitor_interval)
            looks += 1
            try:
                await self._look(service, ping=looks % PING_EVERY == 1)
            except Exception as exc:  # a bad look must not end the watching
                log.warning("monitor_look_failed", error=str(exc))

    async def _look(self, service: SandboxService, *, ping: bool) -> None:
        hosted = list(service.sandboxes.values())
        if not hosted:
            return
        connection = service.runtime.connection.connection
        names = {h.vm.name for h in hosted}
        figures = await asyncio.to_thread(bulk_stats, connection, names)
        if ping:
            await asyncio.gather(*(self._ping(h) for h in hosted))
        for sandbox in hosted:
            if sandbox.id not in service.sandboxes:
                continue  # removed meanwhile
            alerts = self.detector.tick(
                sandbox.id, self._tick(sandbox, figures.get(sandbox.vm.name))
            )
            await self.act(service, sandbox, alerts)

    async def _ping(self, hosted: Hosted) -> None:
        if hosted.paused:
            return
        with contextlib.suppress(AgentVMError, OSError, TimeoutError):
            status = await (await hosted.vm.channel()).ping(timeout=2.0)
            self.guest[hosted.vm.name] = GuestFigures(status.load1, status.mem_available_kib)

    def _tick(self, hosted: Hosted, found: DomainFigures | None) -> Tick:
        guard = hosted.vm.guard
        total = guard.blocked_count(hosted.vm.name) if guard is not None else 0
        seen = self._blocked_seen.get(hosted.id, 0)
        if total > seen and guard is not None:
            fresh = guard.blocked(hosted.vm.name)[-(total - seen) :]
            for attempt in fresh:
                self.metrics.blocked.labels(attempt.kind, reason_class(attempt.reason)).inc()
            self.record("policy_violation", sandbox=hosted.id, owner=hosted.owner,
                        count=total - seen, total=total,
                        sample=[f"{a.kind} {a.destination}:{a.port} ({a.reason})"
                                for a in fresh[:VIOLATION_SAMPLE]])  # fmt: skip
        self._blocked_seen[hosted.id] = total
        guest = self.guest.get(hosted.vm.name)
        return Tick(
            cpu_seconds=found.cpu_seconds if found else None,
            net_bytes=(found.net_rx_bytes + found.net_tx_bytes) if found else None,
            blocked_total=total,
            load1=guest.load1 if guest else None,
            disk_used=found.disk_allocation_bytes if found else None,
            disk_cap=found.disk_capacity_bytes if found else None,
        )

    async def act(self, service: SandboxService, hosted: Hosted, alerts: Sequence[Alert]) -> None:
        for alert in alerts:
            action = (
                (hosted.anomaly_action or self.settings.anomaly_action)
                if alert.rule in RULES
                else "log"
            )
            log.warning("anomaly", sandbox=hosted.id, rule=alert.rule, detail=alert.detail,
                        action=action)  # fmt: skip
            self.metrics.alerts.labels(alert.rule, action).inc()
            self.record("anomaly", sandbox=hosted.id, owner=hosted.owner, rule=alert.rule,
                        detail=alert.detail, value=alert.value, action=action)  # fmt: skip
            if action == "pause" and not hosted.paused:
                await service.pause(hosted, f"anomaly: {alert.rule}")
            elif action == "kill":
                await service.kill_sandbox(hosted, f"anomaly: {alert.rule}")
                return
