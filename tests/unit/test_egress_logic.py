"""Pure logic of the egress proxy's and exposed ports' host side: secrets and what is
refused before anything starts, the redirection rule, the port token's checks."""

from __future__ import annotations

import asyncio

import h11
import pytest

from agent_vm.errors import ConfigError
from agent_vm.names import matches
from agent_vm.network import redirect
from agent_vm.network.egress import check_secrets
from agent_vm.network.policy import EgressPolicy
from agent_vm.sandbox.ports import _head, _redirect, presented
from agent_vm.secrets import Secret, parse_any, redact


def test_a_secret_is_checked_and_its_value_never_shown() -> None:
    secret = Secret("sk-real-value", ["API.Example.com."], header="x-api-key")
    assert secret.hosts == ("api.example.com",)
    assert "sk-real-value" not in repr(secret)
    assert secret.placeholder.startswith("agentvm-secret-") and len(secret.placeholder) == 47
    assert Secret("sk-real-value", ["a.test"]).placeholder != secret.placeholder
    for bad, says in [
        ({"hosts": []}, "needs the hosts"),
        ({"hosts": ["bad host"]}, "not a domain name"),
        ({"hosts": ["api.*.test"]}, "not a domain name"),
        ({"hosts": ["a.test"], "header": "Content-Length"}, "not a header"),
        ({"hosts": ["a.test"], "header": "x api key"}, "not a header"),
    ]:
        with pytest.raises(ConfigError, match=says):
            Secret("sk-real-value", **bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="line break"):
        Secret("sk-real\r\nX-Evil: 1", ["a.test"])


def test_cli_secrets_of_both_kinds() -> None:
    environ = {"PLAIN": "plain-value", "KEY": "key-value"}
    parsed = parse_any(["PLAIN", "KEY:api.a.test,*.b.test:authorization"], environ)
    assert parsed["PLAIN"] == "plain-value"
    key = parsed["KEY"]
    assert isinstance(key, Secret) and key.value == "key-value"
    assert key.hosts == ("api.a.test", "*.b.test") and key.header == "authorization"
    with pytest.raises(ConfigError, match="not set"):
        parse_any(["MISSING:api.a.test"], environ)


def test_secrets_that_could_never_be_injected_are_refused() -> None:
    key = {"K": Secret("value-1234", ["api.a.test"])}
    check_secrets(key, None, "nat")
    check_secrets(key, EgressPolicy(allow_domains=("api.a.test",)), "nat")
    check_secrets({"K": Secret("value-1234", ["*.a.test"])},
                  EgressPolicy(allow_domains=("*.a.test",)), "nat")  # fmt: skip
    with pytest.raises(ConfigError, match="not in the sandbox's allowlist"):
        check_secrets(key, EgressPolicy(allow_domains=("other.test",)), "nat")
    with pytest.raises(ConfigError, match="network='nat'"):
        check_secrets(key, None, "isolated")
    with pytest.raises(ConfigError, match="not a variable name"):
        check_secrets({"not-a-name": key["K"]}, None, "nat")


def test_name_patterns() -> None:
    assert matches(("pypi.org",), "PyPI.org.") and not matches(("pypi.org",), "x.pypi.org")
    assert matches(("*.github.com",), "api.github.com")
    assert not matches(("*.github.com",), "github.com")
    assert not matches(("*.github.com",), "evilgithub.com")


def test_the_redirection_skips_the_host_and_non_public_ranges() -> None:
    rule = redirect._rule("agvm-0123456789", 40000, (80, 443))
    assert "--physdev-in agvm-0123456789 " in rule and "--dports 80,443 " in rule
    assert "! --match-set agentvm-local dst" in rule
    assert "! --match-set agentvm-nonpublic dst" in rule
    assert rule.endswith("-j REDIRECT --to-ports 40000")


def parse(raw: bytes) -> tuple[bytes, h11.Request | None]:
    async def read() -> tuple[bytes, h11.Request | None]:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return await _head(reader)

    return asyncio.run(read())


def request(raw: bytes) -> h11.Request:
    head, parsed = parse(raw)
    assert parsed is not None and head == raw
    return parsed


def test_a_port_token_comes_in_a_header_a_cookie_or_the_query() -> None:
    base = b"GET /app?x=1 HTTP/1.1\r\nHost: h\r\n"
    assert presented(request(base + b"X-Agent-VM-Port-Token: t1\r\n\r\n")) == ("t1", False)
    assert presented(request(base + b"Cookie: a=b; agentvm_port_token=t2\r\n\r\n")) == (
        "t2", False,
    )  # fmt: skip
    query = request(b"GET /app?x=1&agentvm_token=t3 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert presented(query) == ("t3", True)
    assert presented(request(base + b"\r\n")) == (None, False)
    redirect_to = _redirect(query.target, "t3").decode()
    assert "location: /app?x=1\r\n" in redirect_to
    assert "set-cookie: agentvm_port_token=t3; Path=/; HttpOnly; SameSite=Strict" in redirect_to


def test_what_is_not_http_gets_no_token_check_passed() -> None:
    assert parse(b"\x16\x03\x01garbage that is not a request line\r\n\r\n")[1] is None


def test_redaction_covers_proxied_values() -> None:
    from agent_vm.secrets import register

    register({"K": "proxied-value-xyz"})
    assert redact("sent proxied-value-xyz") == "sent [secret K]"
