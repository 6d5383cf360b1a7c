"""The E2B door's pure parts: the key form of tokens, the user and path rules, the
translation of the guest's watch events, the error table and request checks."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from connectrpc.code import Code
from e2b.envd.filesystem import filesystem_pb as pb
from hypothesis import given
from hypothesis import strategies as st

from agent_vm.api.e2b import door
from agent_vm.api.e2b.control import NewSandbox, _metadata_filter, spec_of
from agent_vm.api.e2b.errors import connect_error, http_status
from agent_vm.api.e2b.filesystem import Converter
from agent_vm.api.tokens import TokenStore, e2b_key, from_e2b_key
from agent_vm.communication.fileapi import WatchEvent
from agent_vm.errors import (
    ConfigError,
    NotFoundError,
    QuotaError,
    SandboxFileError,
    SandboxStateError,
)


@given(st.text(max_size=200))
def test_the_key_form_spells_the_token_back(token: str) -> None:
    key = e2b_key(token)
    assert key.startswith("e2b_") and all(c in "0123456789abcdef" for c in key[4:])
    assert from_e2b_key(key) == token


def test_either_form_of_a_token_is_accepted(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    record, token = store.create("alice")
    assert store.verify(e2b_key(token)) == store.verify(token) == record
    for bad in ("e2b_zz", "e2b_", e2b_key(token)[:-2], e2b_key(token + "x"), "e2b_ff"):
        assert store.verify(bad) is None
    assert store.record(record.id) == record
    store.revoke("alice")
    assert store.record(record.id) is None and store.verify(e2b_key(token)) is None


def test_access_tokens_differ_by_sandbox_and_owner(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    alice, bob = store.create("alice")[0], store.create("bob")[0]
    one = door.access_token(alice, "sb-1")
    assert one == door.access_token(alice, "sb-1")  # derived: the same after a restart
    assert len({one, door.access_token(alice, "sb-2"), door.access_token(bob, "sb-1")}) == 3


def test_the_user_of_a_request() -> None:
    def basic(value: bytes) -> str:
        return "Basic " + base64.b64encode(value).decode()

    assert door.user_of(None) is None and door.user_of("Bearer x") is None
    assert door.user_of(basic(b"root:")) == "root"
    assert door.user_of(basic(b":")) is None
    with pytest.raises(door.Refused) as refused:
        door.user_of("Basic %%%")
    assert refused.value.status == 400


def test_paths_resolve_against_the_user_s_home() -> None:
    target = door.Target(service=None, hosted=None, owner=None, user="user")  # type: ignore[arg-type]
    assert target.path("a/b.txt") == "/home/user/a/b.txt"
    assert target.path("~/x") == "/home/user/x" and target.path("~") == "/home/user"
    assert target.path("/etc/../tmp/./f") == "/tmp/f" and target.path("/") == "/"
    assert target.as_user("root").path("x") == "/root/x"


def _events(*raw: tuple[str, str]) -> list[tuple[str, pb.EventType]]:
    convert = Converter("/w")
    out: list[tuple[str, pb.EventType]] = []
    for kind, path in raw:
        out += [(e.name, e.type) for e in convert(WatchEvent(kind, path, False))]
    return out


def test_an_atomic_write_reads_as_an_in_place_one() -> None:
    seen = _events(
        ("create", "/w/d/.f.txt.agentvm-7"), ("modify", "/w/d/.f.txt.agentvm-7"),
        ("move_from", "/w/d/.f.txt.agentvm-7"), ("move_to", "/w/d/f.txt"),
    )  # fmt: skip
    assert seen == [("d/f.txt", pb.EventType.CREATE), ("d/f.txt", pb.EventType.WRITE),
                    ("d/f.txt", pb.EventType.CHMOD)]  # fmt: skip
    assert _events(("move_from", "/w/a"), ("move_to", "/w/b"), ("delete", "/w/b")) == [
        ("a", pb.EventType.RENAME), ("b", pb.EventType.CREATE), ("b", pb.EventType.REMOVE),
    ]  # fmt: skip
    assert _events(("overflow", "/w")) == []


@pytest.mark.parametrize(
    ("error", "code", "status"),
    [
        (NotFoundError("x"), Code.NOT_FOUND, 404),
        (SandboxFileError("x", code="exists", path="/a"), Code.ALREADY_EXISTS, 409),
        (SandboxFileError("x", code="not_a_directory", path="/a"), Code.INVALID_ARGUMENT, 400),
        (QuotaError("x"), Code.RESOURCE_EXHAUSTED, 429),
        (ConfigError("x"), Code.INVALID_ARGUMENT, 400),
        (SandboxStateError("x", state="paused"), Code.UNAVAILABLE, 502),
    ],
)
def test_errors_in_e2b_s_terms(error: Any, code: Code, status: int) -> None:
    assert connect_error(error).code is code
    assert http_status(error) == status


def test_the_sdk_s_metadata_query_is_unquoted_twice() -> None:
    assert _metadata_filter("a%3Db=c%2526d&x=y") == {"a=b": "c&d", "x": "y"}
    assert _metadata_filter(None) == {}


def test_a_new_sandbox_becomes_a_spec() -> None:
    new = NewSandbox.model_validate({
        "templateID": "base", "timeout": 90, "autoPause": True, "metadata": {"k": "v"},
        "autoResume": {"enabled": True}, "allow_internet_access": False, "mcp": None,
    })  # fmt: skip
    spec = spec_of(new, snapshot=False)
    assert (spec.image, spec.network, spec.lifetime, spec.on_expiry, spec.auto_resume) == (
        None, "isolated", 90.0, "pause", True,
    )  # fmt: skip
    assert spec_of(NewSandbox(templateID="mine"), snapshot=True).snapshot == "mine"
    assert spec_of(NewSandbox(templateID="base"), False).network == "nat"
    assert spec_of(NewSandbox(templateID="base"), False, internet="isolated").network == "isolated"
    refusals: list[dict[str, Any]] = [
        {"network": {"denyOut": ["0.0.0.0/0"]}}, {"volumeMounts": [{"x": 1}]},
        {"mcp": {"server": {}}},
    ]  # fmt: skip
    for refused in refusals:
        with pytest.raises(ConfigError, match="does not offer"):
            spec_of(NewSandbox.model_validate({"templateID": "base", **refused}), False)


def test_an_envd_request_names_its_sandbox_by_header_or_host() -> None:
    from starlette.datastructures import Headers

    from agent_vm.api.e2b.envd import sandbox_of

    assert sandbox_of(Headers({"e2b-sandbox-id": "sb-1", "host": "x"})) == "sb-1"
    assert sandbox_of(Headers({"host": "49983-sb-2ab.box.example:443"})) == "sb-2ab"
    assert sandbox_of(Headers({"host": "8080-sb-2ab.box.example"})) is None  # a port: not envd
    assert sandbox_of(Headers({"host": "api.box.example"})) is None
