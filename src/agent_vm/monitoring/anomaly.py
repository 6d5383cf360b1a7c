"""Anomaly detection on what sandboxes really do: rules with fixed thresholds (a burst of
blocked connections, an output flood, a process storm, a disk filling up) and z-scores
of a sandbox's figures against its own recent window (execution duration, CPU and
network bytes per monitor tick). Alerts are rate-limited per sandbox and rule; what is
done about one (log, pause, kill) is the caller's (the server's watcher).

Pure logic fed with real figures: the server gives it libvirt's bulk stats, the guard's
blocked counts and the guest's PING.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from agent_vm import timeutil
from agent_vm.config import Settings


@dataclass(frozen=True)
class Thresholds:
    blocked_burst: int = 20
    blocked_window: float = 10.0
    output_bytes: int = 256 << 20
    load1: float = 64.0
    disk_fraction: float = 0.9
    zscore: float = 4.0
    window: int = 60
    min_samples: int = 10
    alert_interval: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Thresholds:
        return cls(
            blocked_burst=settings.anomaly_blocked_burst,
            blocked_window=settings.anomaly_blocked_window,
            output_bytes=settings.anomaly_output_bytes,
            load1=settings.anomaly_load1,
            disk_fraction=settings.anomaly_disk_fraction,
            zscore=settings.anomaly_zscore,
            window=settings.anomaly_window,
            min_samples=settings.anomaly_min_samples,
            alert_interval=settings.anomaly_alert_interval,
        )


@dataclass(frozen=True)
class Alert:
    sandbox: str
    rule: str  # blocked_burst, output_flood, process_storm, disk_filling, <figure>_zscore
    detail: str
    value: float
    at: datetime = field(default_factory=timeutil.now)


@dataclass(frozen=True)
class Tick:
    """One monitor look at a sandbox: cumulative counters and current gauges."""

    cpu_seconds: float | None = None
    net_bytes: int | None = None
    blocked_total: int = 0
    load1: float | None = None
    disk_used: int | None = None
    disk_cap: int | None = None


class _Rolling:
    def __init__(self, size: int) -> None:
        self.values: deque[float] = deque(maxlen=size)

    def zscore(self, value: float, min_samples: int) -> float | None:
        """``value`` against the window so far (then added to it)."""
        z = None
        if len(self.values) >= min_samples:
            mean = sum(self.values) / len(self.values)
            spread = math.sqrt(sum((v - mean) ** 2 for v in self.values) / len(self.values))
            # a flat window (spread 0) would make any change infinite: floor the spread
            z = (value - mean) / max(spread, abs(mean) * 0.05, 1e-9)
        self.values.append(value)
        return z


@dataclass
class _State:
    durations: _Rolling
    cpu: _Rolling
    net: _Rolling
    last_cpu: float | None = None
    last_net: int | None = None
    last_blocked: int = 0
    blocked_times: deque[tuple[float, int]] = field(default_factory=deque)


class AnomalyDetector:
    def __init__(
        self, thresholds: Thresholds | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.t = thresholds or Thresholds()
        self.clock = clock
        self._states: dict[str, _State] = {}
        self._last_alert: dict[tuple[str, str], float] = {}

    def _state(self, sandbox: str) -> _State:
        state = self._states.get(sandbox)
        if state is None:
            size = self.t.window
            state = _State(_Rolling(size), _Rolling(size), _Rolling(size))
            self._states[sandbox] = state
        return state

    def forget(self, sandbox: str) -> None:
        self._states.pop(sandbox, None)
        for key in [k for k in self._last_alert if k[0] == sandbox]:
            del self._last_alert[key]

    def _alert(self, out: list[Alert], sandbox: str, rule: str, detail: str, value: float) -> None:
        now = self.clock()
        last = self._last_alert.get((sandbox, rule))
        if last is not None and now - last < self.t.alert_interval:
            return  # rate-limited
        self._last_alert[(sandbox, rule)] = now
        out.append(Alert(sandbox, rule, detail, value))

    def _z(self, out: list[Alert], sandbox: str, name: str, window: _Rolling, value: float) -> None:
        z = window.zscore(value, self.t.min_samples)
        if z is not None and z > self.t.zscore:
            self._alert(out, sandbox, f"{name}_zscore", f"{name} {value:.3g} is {z:.1f} "
                        f"standard deviations above its window", z)  # fmt: skip

    def execution(self, sandbox: str, seconds: float, output_bytes: int) -> list[Alert]:
        out: list[Alert] = []
        state = self._state(sandbox)
        self._z(out, sandbox, "duration", state.durations, seconds)
        if output_bytes > self.t.output_bytes:
            detail = f"one execution wrote {output_bytes} bytes of output"
            self._alert(out, sandbox, "output_flood", detail, output_bytes)
        return out

    def tick(self, sandbox: str, figures: Tick) -> list[Alert]:
        out: list[Alert] = []
        state = self._state(sandbox)
        now = self.clock()
        fresh = max(0, figures.blocked_total - state.last_blocked)
        state.last_blocked = figures.blocked_total
        if fresh:
            state.blocked_times.append((now, fresh))
        while state.blocked_times and now - state.blocked_times[0][0] > self.t.blocked_window:
            state.blocked_times.popleft()
        burst = sum(n for _, n in state.blocked_times)
        if burst >= self.t.blocked_burst:
            self._alert(out, sandbox, "blocked_burst", f"{burst} blocked attempts in "
                        f"{self.t.blocked_window:g} s", burst)  # fmt: skip
        if figures.cpu_seconds is not None:
            if state.last_cpu is not None:
                self._z(out, sandbox, "cpu", state.cpu, figures.cpu_seconds - state.last_cpu)
            state.last_cpu = figures.cpu_seconds
        if figures.net_bytes is not None:
            if state.last_net is not None:
                self._z(out, sandbox, "network", state.net, figures.net_bytes - state.last_net)
            state.last_net = figures.net_bytes
        if figures.load1 is not None and figures.load1 > self.t.load1:
            self._alert(out, sandbox, "process_storm", f"guest load {figures.load1:.1f}",
                        figures.load1)  # fmt: skip
        if figures.disk_used is not None and figures.disk_cap:
            used = figures.disk_used / figures.disk_cap
            if used > self.t.disk_fraction:
                self._alert(out, sandbox, "disk_filling", f"disk {used:.0%} of its cap", used)
        return out
