"""Small statistics and reporting helpers shared by the benchmarks."""

from __future__ import annotations

import json
import math
import platform
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from agent_vm import timeutil


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); with few samples p99 is the maximum."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(samples: list[float]) -> dict[str, Any]:
    return {
        "n": len(samples),
        "p50": statistics.median(samples),
        "p99": percentile(samples, 99),
        "min": min(samples),
        "max": max(samples),
        "samples": samples,
    }


def host_info() -> dict[str, Any]:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "when": timeutil.isoformat(),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": len(
            [
                ln
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("processor")
            ]
        ),
    }


def print_table(
    title: str,
    rows: list[tuple[str, dict[str, Any] | None, str]],
    fmt_value: Callable[[float], str] | None = None,
) -> None:
    """rows: (label, summary or None when not measured, note); values are seconds unless
    ``fmt_value`` says how to show them."""
    show = fmt_value or fmt
    table = Table(title=title)
    for column in ("measurement", "n", "p50", "p99", "min", "max", "note"):
        table.add_column(
            column, justify="right" if column in ("n", "p50", "p99", "min", "max") else "left"
        )
    for label, data, note in rows:
        if data is None:
            table.add_row(label, "-", "-", "-", "-", "-", note)
            continue
        table.add_row(
            label,
            str(data["n"]),
            show(data["p50"]),
            show(data["p99"]),
            show(data["min"]),
            show(data["max"]),
            note,
        )
    Console(width=150).print(table)


def fmt(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.3f} s"


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
