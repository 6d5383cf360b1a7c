"""Running the host's firewall tools (iptables-*, nft, ipset) with one error shape.

Reads race with concurrent writers: iptables-save of a table whose rules refer to an
ipset that another thread destroys at that moment fails with "Set with index N in kernel
doesn't exist" (seen while 30 sandboxes were torn down at once). Callers that only read,
or whose write is idempotent, pass ``attempts`` > 1 and such failures are retried with a
short backoff instead of being taken for the state of the firewall.
"""

from __future__ import annotations

import subprocess
import time

from agent_vm.errors import NetworkError

INSTALL_HINTS = {
    "ipset": "apt-get install ipset",
    "nft": "apt-get install nftables",
}
BACKOFF = 0.05  # seconds, times the attempt number


def run_tool(
    argv: list[str], *, stdin: str | None = None, attempts: int = 1, timeout: float = 30.0
) -> str:
    """stdout of ``argv``; NetworkError (with the tool's stderr) if it keeps failing."""
    stderr = ""
    for attempt in range(attempts):
        try:
            proc = subprocess.run(
                argv, input=stdin, capture_output=True, text=True, check=False, timeout=timeout
            )
        except FileNotFoundError as exc:
            hint = INSTALL_HINTS.get(argv[0], "apt-get install iptables")
            raise NetworkError(f"{argv[0]} is not installed", hint=hint) from exc
        except subprocess.TimeoutExpired:
            stderr = f"no answer within {timeout:g} s"
        else:
            if proc.returncode == 0:
                return proc.stdout
            stderr = proc.stderr.strip()
        if attempt + 1 < attempts:
            time.sleep(BACKOFF * (attempt + 1))
    raise NetworkError(f"{' '.join(argv)} failed: {stderr}")


def succeeds(argv: list[str]) -> bool:
    """True when ``argv`` exits 0 (for yes/no questions such as ``ipset test``)."""
    try:
        return subprocess.run(argv, capture_output=True, check=False, timeout=30).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
