"""The egress proxy on real VMs: names checked, refusals readable, secrets injected
outside the VM, against the test host's HTTPS listener (a certificate of the test CA,
which the proxy trusts upstream and the guest does not, unless a test hands it over).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets as token
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from agent_vm.config import Settings
from agent_vm.errors import ConfigError
from agent_vm.image.store import Image
from agent_vm.network.policy import EgressPolicy
from agent_vm.sandbox import AsyncSandbox, Sandbox
from agent_vm.secrets import Secret
from tests.integration.conftest import TEST_HOST_IP
from tests.integration.servers import running_server
from tests.integration.testnet import TEST_CA, TestHost

pytestmark = pytest.mark.integration

OTHER_IP = "198.51.100.11"
POLICY = EgressPolicy(allow_domains=("api.allowed.test", "web.allowed.test"))
GUEST_CA = "/tmp/test-ca.pem"  # the test CA, for proving a connection was spliced


async def curl(sb: AsyncSandbox, args: str) -> tuple[int, str, dict[str, str]]:
    """(status or 0, body, headers) of one request from the guest."""
    result = await sb.commands.run(
        f"curl -sS --max-time 20 -D /tmp/h -o /tmp/b -w '%{{http_code}}' {args}; "
        "echo; cat /tmp/h; echo ---; cat /tmp/b",
        timeout=60,
    )
    code, _, rest = result.stdout.partition("\n")
    head, _, body = rest.partition("---\n")
    headers = {}
    for line in head.splitlines()[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    assert code.strip().isdigit(), result.stdout + result.stderr
    return int(code), body, headers


async def test_names_are_checked_and_refusals_say_why(
    settings: Settings, test_host: TestHost
) -> None:
    async with AsyncSandbox(policy=POLICY, settings=settings) as sb:
        await sb.files.write(GUEST_CA, TEST_CA.read_bytes())
        # an allowed name over TLS is spliced: the guest sees the test host's own
        # certificate (it verifies against the test CA alone), no interception
        status, body, _ = await curl(sb, f"--cacert {GUEST_CA} https://api.allowed.test/")
        assert status == 200 and body.startswith("hello from port 443"), body
        # an allowed address with a name that is not allowed: TLS terminated by the
        # proxy (the guest trusts its CA) and answered with a 403 that says why
        status, body, headers = await curl(
            sb, f"--resolve evil.test:443:{TEST_HOST_IP} https://evil.test/"
        )
        assert status == 403, body
        assert body.strip() == "agent-vm: evil.test is not in this sandbox's allowlist"
        assert headers["x-agent-vm-denied"].startswith("allowlist:")
        # plain HTTP: the Host header is the name
        status, body, _ = await curl(sb, f"-H 'Host: evil.test' http://{TEST_HOST_IP}/")
        assert status == 403 and "evil.test is not in this sandbox's allowlist" in body
        status, body, _ = await curl(sb, "http://web.allowed.test/")
        assert status == 200 and body.startswith("hello from port 80"), body
        # an allowed name at an address it does not resolve to (the test host's other one)
        status, body, headers = await curl(
            sb, f"--resolve web.allowed.test:443:{OTHER_IP} https://web.allowed.test/"
        )
        assert status == 403 and headers["x-agent-vm-denied"].startswith("name-mismatch"), body
        assert f"does not resolve to {OTHER_IP}" in body
        # an address without a name at all
        status, body, _ = await curl(sb, f"http://{OTHER_IP}/")
        assert status == 403 and f"{OTHER_IP} is not in this sandbox's allowlist" in body
        blocked = {(b.kind, b.destination, b.port) for b in await sb.blocked_attempts()}
        assert {("https", "evil.test", 443), ("http", "evil.test", 80)} <= blocked, blocked
        reasons = [b.reason for b in await sb.blocked_attempts()]
        assert "evil.test is not in this sandbox's allowlist" in reasons


async def test_a_secret_is_injected_for_its_host_only(
    settings: Settings, test_host: TestHost
) -> None:
    value = f"sk-real-{token.token_hex(16)}"
    secret = Secret(value, hosts=["api.allowed.test"], header="authorization")
    async with AsyncSandbox(
        policy=POLICY, settings=settings, secrets={"API_TOKEN": secret, "PLAIN": "plain-value"}
    ) as sb:
        await sb.files.write(GUEST_CA, TEST_CA.read_bytes())
        seen = await sb.commands.run("printenv API_TOKEN PLAIN")
        assert seen.stdout.split() == [secret.placeholder, "plain-value"]
        assert value not in seen.stdout

        async def headers(args: str) -> dict[str, Any]:
            status, body, _ = await curl(
                sb, f"-H \"Authorization: Bearer $API_TOKEN\" {args}/_headers?q=1"
            )
            assert status == 200, body
            return dict(json.loads(body))

        # to its host, over TLS: the proxy terminated it and put the value in
        injected = await headers("https://api.allowed.test")
        assert injected["authorization"] == f"Bearer {value}"
        # another allowed host (spliced: the guest's own TLS, the test CA's certificate)
        other = await headers(f"--cacert {GUEST_CA} https://web.allowed.test")
        assert other["authorization"] == f"Bearer {secret.placeholder}"
        # a body past the proxy's buffer (streamed upstream): injected all the same
        await sb.commands.run("head -c 3000000 /dev/zero > /tmp/big")
        status, body, _ = await curl(
            sb, "-H \"Authorization: Bearer $API_TOKEN\" --data-binary @/tmp/big "
            "https://api.allowed.test/_headers",
        )  # fmt: skip
        assert status == 200, body
        uploaded = json.loads(body)
        assert uploaded["authorization"] == f"Bearer {value}"
        assert uploaded["_body_bytes"] == "3000000"
        # its host over plain HTTP: never in clear text
        clear = await headers("http://api.allowed.test")
        assert clear["authorization"] == f"Bearer {secret.placeholder}"
        # the value is nowhere the guest can read: its processes' environments
        env = await sb.commands.run("cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'")
        assert secret.placeholder in env.stdout and value not in env.stdout


def test_secrets_that_cannot_work_are_refused_before_anything_starts(settings: Settings) -> None:
    with pytest.raises(ConfigError, match="not in the sandbox's allowlist"):
        AsyncSandbox(
            policy=POLICY, settings=settings,
            secrets={"K": Secret("value-1234", hosts=["api.example.com"])},
        )  # fmt: skip
    with pytest.raises(ConfigError, match="network='nat'"):
        AsyncSandbox(
            network="isolated", settings=settings,
            secrets={"K": Secret("value-1234", hosts=["api.allowed.test"])},
        )  # fmt: skip
    with pytest.raises(ConfigError, match="not a header a secret can go in"):
        Secret("value-1234", hosts=["api.allowed.test"], header="bad header")
    with pytest.raises(ConfigError, match="not a domain name"):
        Secret("value-1234", hosts=["api.*.test"])


def test_through_a_server_requests_are_audited_and_counted(
    image: Image, test_host: TestHost, tmp_path: Path
) -> None:
    """A server keeps the secret in memory only; every proxied request is in its audit
    log (method, host, path without the query, status, bytes) and its metrics."""
    value = f"sk-real-{token.token_hex(16)}"
    secret = Secret(value, hosts=["api.allowed.test"])
    with running_server(tmp_path / "server") as server:
        with Sandbox(
            server=str(server.socket), policy=POLICY, secrets={"API_TOKEN": secret}
        ) as sb:
            seen = sb.commands.run(
                "curl -sS -H \"x-api-key: $API_TOKEN\" 'https://api.allowed.test/_headers?q=1'"
                f" && echo && curl -sS --resolve evil.test:443:{TEST_HOST_IP} https://evil.test/x?y=2",
                timeout=60,
            )
            assert seen.exit_code == 0, seen.stderr
            assert json.loads(seen.stdout.split("\n", 1)[0])["x-api-key"] == value
            assert "evil.test is not in this sandbox's allowlist" in seen.stdout
            token_value = server.local_token()
            with server.client(token_value) as client:
                metrics = client.get("/metrics").text
        lines = [json.loads(line) for line in server.audit.read_text().splitlines()]
        asked = [e for e in lines if e.get("event") == "egress_request"]
        ours = [e for e in asked if e["host"] == "api.allowed.test"]
        assert ours and ours[0]["path"] == "/_headers" and ours[0]["method"] == "GET"
        assert ours[0]["status"] == 200 and ours[0]["bytes"] > 0
        assert ours[0]["injected"] == ["API_TOKEN"]
        refused = [e for e in asked if e["host"] == "evil.test"]
        assert refused and refused[0]["status"] == 403 and refused[0]["path"] == "/x"
        assert 'agentvm_egress_requests_total{decision="injected"}' in metrics
        assert 'agentvm_egress_requests_total{decision="denied"}' in metrics
        for kept in (server.audit, server.log_path):
            assert value not in kept.read_text()


async def test_a_proxy_that_dies_is_back_with_what_it_knew(
    settings: Settings, test_host: TestHost
) -> None:
    """A guest that crashes the proxy (here: SIGKILL) costs its neighbours seconds: it is
    restarted, and told every sandbox and secret again."""
    value = f"sk-real-{token.token_hex(16)}"
    secret = Secret(value, hosts=["api.allowed.test"], header="x-api-key")
    async with AsyncSandbox(policy=POLICY, settings=settings, secrets={"K": secret}) as sb:
        guard = sb.handle.vm.guard  # type: ignore[attr-defined]
        proxy = guard.proxy
        before, restarts = proxy.pid, proxy.restarts
        os.kill(before, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while proxy.restarts == restarts or not proxy.running:
            assert time.monotonic() < deadline, "the proxy did not come back"
            await asyncio.sleep(0.2)
        assert proxy.pid != before
        status, body, _ = await curl(sb, "-H \"x-api-key: $K\" https://api.allowed.test/_headers")
        assert status == 200 and json.loads(body)["x-api-key"] == value
        status, body, _ = await curl(sb, f"--resolve evil.test:443:{TEST_HOST_IP} https://evil.test/")
        assert status == 403, body
