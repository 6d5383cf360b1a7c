"""Two test sessions on one host share the session's test host: the one that leaves
first does not take it from the other; the last one out removes it. (Here two holders
in one process stand for two sessions: ``flock`` tells open files apart, not processes.)
Traffic goes only to the test host this test makes, in its own namespace."""

from __future__ import annotations

import subprocess
import urllib.request
from ipaddress import IPv4Interface

from tests.integration.testnet import TestHost, unused_by_the_host

ADDRESS = "198.18.77.10"  # the benchmarking range, routed into this test's namespace only


def holder() -> TestHost:
    return TestHost(
        name="agvtest9",
        host_side=IPv4Interface("198.18.77.1/24"),
        addresses=(IPv4Interface(f"{ADDRESS}/24"),),
        shared=True,
    )


def answers() -> bool:
    try:
        with urllib.request.urlopen(f"http://{ADDRESS}/", timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def namespace_exists() -> bool:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return any(line.split()[0] == "agvtest9" for line in out.stdout.splitlines() if line)


def test_a_shared_test_host_outlives_the_first_session_to_leave() -> None:
    unused_by_the_host("198.18.77.")  # else the address could be on the host's LAN
    first, second = holder(), holder()
    try:
        first.start()
        assert answers()
        second.start()  # the other session finds it up and uses it as it is
        first.stop()  # the first session ends ...
        assert answers() and namespace_exists()  # ... and the second one keeps its host
        second.stop()  # the last one out removes it
        assert not namespace_exists() and not answers()
    finally:
        for host in (first, second):
            host.stop()
        holder()._teardown()
