"""Run E2B's own Python SDK test suite against agent-vm's E2B door.

    .venv/bin/python scripts/e2b_suite.py /path/to/E2B/packages/python-sdk/tests \\
        [--folders sync/sandbox_sync/commands,...] [--out e2b-suite.json]

The suite is E2B's (e2b-dev/E2B, ``packages/python-sdk/tests``): fetch it yourself, it
is not part of this repository. This starts ``agent-vm serve --e2b-port`` with a warm
pool (``light`` ISOLATED, 2..4) and a token of its own (24 sandboxes), points the suite at it
with the SDK's environment variables only (``E2B_API_URL``, ``E2B_SANDBOX_URL``,
``E2B_API_KEY``), runs each folder with pytest (junit XML), and prints passed / failed /
skipped per folder, with each failure's first line.

E2B's tests that reach the internet or E2B's hosted domains (``NOT_HERE``) are never
run, and every sandbox is on an isolated network whatever it asks for
(``--e2b-network isolated``): nothing a test of theirs runs can leave this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from agent_vm.api.tokens import TokenStore, e2b_key  # noqa: E402

FOLDERS = [
    "sync/sandbox_sync/commands", "sync/sandbox_sync/files", "sync/sandbox_sync/pty",
    "async/sandbox_async/commands", "async/sandbox_async/files", "async/sandbox_async/pty",
    "sync/sandbox_sync/test_*.py", "async/sandbox_async/test_*.py", "sync/api_sync",
    "async/api_async",
]  # fmt: skip


# files and tests that send traffic off this machine (the internet, *.e2b.app)
NOT_HERE = [
    "test_internet_access.py", "test_network.py", "test_host.py",
    "test_config_propagation.py", "test_sync_client_lifecycle.py",
    "test_auto_resume_wakes_on_http_request",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def outcomes(report: Path) -> list[dict[str, str]]:
    found = []
    for case in ET.parse(report).getroot().iter("testcase"):
        result, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                result = "failed" if child.tag != "skipped" else "skipped"
                message = (child.get("message") or "").splitlines()[0][:300] if child.get(
                    "message") else ""  # fmt: skip
        found.append({"test": f"{case.get('classname')}::{case.get('name')}",
                      "result": result, "message": message})  # fmt: skip
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("suite", type=Path)
    parser.add_argument("--folders", default=",".join(FOLDERS))
    parser.add_argument("--out", type=Path, default=Path("e2b-suite.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="e2b-suite-"))
    _, token = TokenStore(work / "tokens.json").create(
        "e2b-suite", max_sandboxes=24, max_executions=64
    )
    port = free_port()
    env = {**os.environ, "AGENT_VM_AUDIT_LOG": str(work / "audit.log"),
           "AGENT_VM_TOKENS_FILE": str(work / "tokens.json")}  # fmt: skip
    log = (work / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "agent_vm", "serve", "--socket", str(work / "api.sock"),
         "--e2b-port", str(port), "--e2b-network", "isolated", "--pool", ":light:isolated:2:4"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    suite_env = {**os.environ, "E2B_API_URL": url, "E2B_SANDBOX_URL": url,
                 "E2B_API_KEY": e2b_key(token)}  # fmt: skip
    results: dict[str, Any] = {}
    try:
        time.sleep(5)
        while subprocess.run(["curl", "-s", "-o", "/dev/null", f"{url}/sandboxes"],
                             check=False).returncode != 0:  # fmt: skip
            if server.poll() is not None:
                raise SystemExit((work / "server.log").read_text()[-2000:])
            time.sleep(1)
        for folder in args.folders.split(","):
            report = work / (folder.replace("/", "_").replace("*", "all") + ".xml")
            targets = sorted(str(p.relative_to(args.suite)) for p in args.suite.glob(folder)
                             if p.name not in NOT_HERE)  # fmt: skip
            skip = " and ".join(f"not {name}" for name in NOT_HERE if not name.endswith(".py"))
            subprocess.run(
                [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                 "--timeout", "90", f"--junitxml={report}", "-k", skip, *targets],
                cwd=args.suite, env=suite_env, check=False, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            cases = outcomes(report) if report.exists() else []
            counts = {k: sum(1 for c in cases if c["result"] == k)
                      for k in ("passed", "failed", "skipped")}  # fmt: skip
            results[folder] = {**counts, "cases": cases}
            print(f"{folder:40} passed {counts['passed']:3}  failed {counts['failed']:3}"
                  f"  skipped {counts['skipped']:3}", flush=True)  # fmt: skip
            for case in cases:
                if case["result"] == "failed":
                    print(f"    FAILED {case['test']}: {case['message'][:160]}")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=300)
        log.close()
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
