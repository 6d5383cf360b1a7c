"""The audit log's chain: kept across rotation and restarts, broken by any edit,
removal or reordering, and free of secrets (pure file logic: no VM needed)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from agent_vm import secrets
from agent_vm.monitoring import audit
from agent_vm.monitoring.audit import AuditLogger, files_of, verify


def write(path: Path, count: int, **kwargs: int) -> None:
    log = AuditLogger(path, **kwargs)
    for number in range(count):
        log.log("execution_finished", sandbox=f"sb-{number % 3}", exit_code=number)
    log.close()


def test_lines_chain_across_rotation_and_restart(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write(path, 30, max_bytes=1024, keep=100)
    write(path, 5, max_bytes=1024, keep=100)  # a restarted server continues the chain
    files = files_of(path)
    assert len(files) > 3 and files[-1] == path
    verdict = verify(path)
    assert verdict.ok and verdict.lines == 35 and verdict.first_seq == 1, verdict
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = json.loads(files[0].read_text().splitlines()[0])
    assert first["seq"] == 1 and first["prev"] == audit.GENESIS
    assert first["at"][-6:] in ("-05:00", "-04:00")


def test_files_rotated_away_leave_a_chain_that_starts_later(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write(path, 40, max_bytes=1024, keep=2)
    verdict = verify(path)
    assert verdict.ok and (verdict.first_seq or 0) > 1, verdict


def rewrite(path: Path, change: object) -> None:
    rows = path.read_text().splitlines(keepends=True)
    path.write_text("".join(change(rows)))  # type: ignore[operator]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (
            lambda rows: [rows[0], rows[1].replace('"exit_code": 1', '"exit_code": 0'), *rows[2:]],
            "line 2: its hash does not match",
        ),
        (lambda rows: [rows[0], *rows[2:]], "line 2: seq 3 where 2 was due"),
        (lambda rows: [rows[1], rows[0], *rows[2:]], "line 2: seq 1 where 3 was due"),
        (lambda rows: [*rows[:-1]], None),  # the last line cut: still a valid prefix
        (lambda rows: [rows[0], "not json\n", *rows[1:]], "line 2: not a JSON object"),
    ],
)
def test_tampering_is_found_at_its_first_bad_line(
    tmp_path: Path, change: object, says: str | None
) -> None:
    path = tmp_path / "audit.log"
    write(path, 6)
    rewrite(path, change)
    verdict = verify(path)
    if says is None:
        assert verdict.ok
    else:
        assert not verdict.ok and says in (verdict.problem or ""), verdict


def test_a_line_rewritten_with_a_fresh_hash_still_breaks_the_next_link(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write(path, 4)
    rows = [json.loads(r) for r in path.read_text().splitlines()]
    forged = {k: v for k, v in rows[1].items() if k != "hash"} | {"exit_code": 99}
    forged["hash"] = audit._digest(forged["prev"], forged)
    rows[1] = forged
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    verdict = verify(path)
    assert not verdict.ok and "line 3: does not follow" in (verdict.problem or "")


def test_secrets_and_long_fields_never_reach_the_file(tmp_path: Path) -> None:
    value = "sk-live-0123456789abcdef"
    secrets.register({"API_KEY": value})
    path = tmp_path / "audit.log"
    log = AuditLogger(path)
    log.log("execution_started", command=f"curl -H 'x-api-key: {value}' x", big="y" * 10000)
    log.close()
    data = path.read_text()
    assert value not in data
    assert "[cut]" in data and len(data) < 6000
    assert verify(path).ok
