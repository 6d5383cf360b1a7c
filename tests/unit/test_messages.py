"""Payload validation: what the guest (or host) accepts and refuses."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_vm.errors import ProtocolError
from agent_vm.protocol.configure import Configure
from agent_vm.protocol.messages import Execute, Hello, Ready, Result, Signal, Status


def test_execute_round_trip() -> None:
    req = Execute(
        argv=["ls", "-l"], env={"A": "1"}, cwd="/tmp", user="agent", timeout=5, stdin=True
    )
    assert Execute.from_payload(req.to_payload()) == req


@pytest.mark.parametrize(
    "payload",
    [
        {},  # neither argv nor shell
        {"argv": ["a"], "shell": "b"},  # both
        {"argv": []},
        {"argv": [1]},
        {"shell": "x", "user": "no body"},  # not a user name
        {"shell": "x", "user": "-rf"},
        {"shell": "x", "user": "99999999999"},
        {"shell": "x", "timeout": 0},
        {"shell": "x", "timeout": True},
        {"shell": "x", "env": {"A=B": "1"}},
        {"shell": "x", "env": {"A": 1}},
        {"shell": "x", "extra": 1},
        {"shell": "x" * 200_000},  # Linux's limit for one argument
        {"argv": ["x" * 1000] * 2200},  # and for all of them
    ],
)
def test_execute_rejects_invalid_requests(payload: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        Execute.from_payload(json.dumps(payload).encode())


@pytest.mark.parametrize("raw", [b"", b"not json", b"[]", b"\xff\xfe", b'"str"'])
def test_non_object_payloads_are_protocol_errors(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        Result.from_payload(raw)


def test_result_bounds_are_checked() -> None:
    good = {"exit_code": 0, "signal": None, "timed_out": False, "duration": 0.1}
    assert Result.from_payload(json.dumps(good).encode()).exit_code == 0
    for bad in ({"exit_code": 10_000}, {"signal": 0}, {"signal": 999}, {"timed_out": "no"}):
        with pytest.raises(ProtocolError):
            Result.from_payload(json.dumps({**good, **bad}).encode())


def test_result_error_text_is_truncated() -> None:
    raw = {"exit_code": 1, "signal": None, "timed_out": False, "duration": 1, "error": "e" * 9999}
    assert len(Result.from_payload(json.dumps(raw).encode()).error or "") == 4096


def test_hello_session_length() -> None:
    assert Hello.from_payload(Hello("a" * 32).to_payload()).session == "a" * 32
    with pytest.raises(ProtocolError):
        Hello.from_payload(Hello("short").to_payload())


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_parsers(raw: bytes) -> None:
    for parser in (Execute, Hello, Ready, Result, Signal, Status):
        with contextlib.suppress(ProtocolError):
            parser.from_payload(raw)


def test_signal_range() -> None:
    assert Signal.from_payload(Signal(9).to_payload()).signal == 9
    with pytest.raises(ProtocolError):
        Signal.from_payload(b'{"signal": 100}')


STATIC_NET = {
    "mode": "static",
    "mac": "52:54:00:12:34:56",
    "address": "10.213.0.10/24",
    "gateway": "10.213.0.1",
    "dns": "10.213.0.1",
    "ipv6": False,
}


def test_configure_net_round_trip() -> None:
    msg = Configure(time_ns=1, net=STATIC_NET)
    assert Configure.from_payload(msg.to_payload()).net == STATIC_NET
    dhcp: dict[str, object] = {"mode": "dhcp", "mac": "52:54:00:12:34:56"}
    assert Configure.from_payload(Configure(time_ns=1, net=dhcp).to_payload()).net == dhcp


@pytest.mark.parametrize(
    "change",
    [
        {"mode": "ppp"},
        {"mac": "52:54:00:12:34:56; reboot"},
        {"mac": "52:54:00:12:34"},
        {"address": "10.213.0.10"},  # no prefix length
        {"address": "10.213.0.10/33"},
        {"gateway": "10.213.0.1 && id"},
        {"dns": "300.1.1.1"},
        {"ipv6": "yes"},
        {"extra": 1},
    ],
)
def test_configure_net_values_are_checked(change: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        Configure(time_ns=1, net={**STATIC_NET, **change})


def test_terminal_sizes_are_checked_both_ways() -> None:
    from agent_vm.protocol.messages import Resize

    request = Execute(argv=["bash"], pty=[120, 40])
    assert Execute.from_payload(request.to_payload()).pty == [120, 40]
    assert (Resize.from_payload(Resize(100, 30).to_payload()).cols, 30) == (100, 30)
    for bad in ([0, 24], [80], [80, 24, 1], [80, 1001], [True, 24], ["80", "24"]):
        with pytest.raises(ProtocolError, match="terminal size"):
            Execute(argv=["bash"], pty=bad)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        Resize.from_payload(b'{"cols": 80}')


@pytest.mark.parametrize("user", ["root", "agent", "bob", "build-bot", "svc_1", "m$", "0", "1001"])
def test_any_user_name_or_uid_is_accepted(user: str) -> None:
    assert Execute(shell="id", user=user).user == user


def test_a_one_mib_command_line_fits_a_request() -> None:
    argv = ["python3", "-c", "pass", *["y" * 1023] * 1024]
    request = Execute(argv=argv)
    assert len(request.to_payload()) > 2**20  # more than one ordinary frame: still sent
