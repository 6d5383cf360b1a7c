"""Exposed ports: a web server and a WebSocket echo started in a sandbox, reached from
the host through ``get_host``/``expose`` (over the control channel: NAT and isolated
alike), through a server with its port token, and not once the sandbox is gone."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from agent_vm.config import Settings
from agent_vm.image.store import Image
from agent_vm.sandbox import Sandbox
from tests.integration.servers import running_server
from tests.integration.testnet import TestHost

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "agent_vm"]
# A WebSocket echo server on 8765 with the guest's standard library only (no packages).
ECHO = r'''
import base64, hashlib, socket, struct, threading
MAGIC = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
def serve(conn):
    head = b""
    while b"\r\n\r\n" not in head:
        head += conn.recv(4096)
    lines = head.split(b"\r\n")
    key = [x.split(b":", 1)[1].strip() for x in lines if x.lower().startswith(b"sec-websocket-key")]
    accept = base64.b64encode(hashlib.sha1(key[0] + MAGIC.encode()).digest()).decode()
    conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").encode())
    def read(n):
        data = b""
        while len(data) < n:
            data += conn.recv(n - len(data))
        return data
    while True:
        b1, b2 = read(2)
        size = b2 & 127
        if size == 126: size = struct.unpack(">H", read(2))[0]
        elif size == 127: size = struct.unpack(">Q", read(8))[0]
        mask = read(4)
        payload = bytes(c ^ mask[i % 4] for i, c in enumerate(read(size)))
        if b1 & 15 == 8:
            conn.sendall(b"\x88\x00"); return
        reply = b"echo: " + payload
        conn.sendall(bytes([0x81, len(reply)]) + reply)
server = socket.create_server(("127.0.0.1", 8765))
while True:
    threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()
'''
START = (
    "mkdir -p /srv/site && echo 'hello from the sandbox' > /srv/site/index.html && "
    "cd /srv/site && (nohup python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &) && "
    "(nohup python3 /tmp/echo.py >/dev/null 2>&1 &) && "
    "for i in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/8000 && exec 4<>/dev/tcp/127.0.0.1/8765)"
    " 2>/dev/null && exit 0; sleep 0.2; done; exit 1"
)


def start_servers(sb: Sandbox) -> None:
    sb.files.write("/tmp/echo.py", ECHO)
    started = sb.commands.run(START, timeout=60)
    assert started.exit_code == 0, started.stderr


def echo(url: str, headers: dict[str, str] | None = None) -> str:
    with connect(url, additional_headers=headers or {}, open_timeout=60) as ws:
        ws.send("ping")
        return str(ws.recv(timeout=60))


@pytest.mark.parametrize("network", ["nat", "isolated"])
def test_a_web_server_in_a_sandbox_is_reached_from_the_host(
    network: str, settings: Settings, test_host: TestHost
) -> None:
    with Sandbox(network=network, settings=settings) as sb:
        start_servers(sb)
        host = sb.get_host(8000)
        assert host.startswith("127.0.0.1:")  # loopback only, without a server
        page = httpx.get(f"http://{host}/index.html", timeout=60)
        assert page.status_code == 200 and page.text == "hello from the sandbox\n"
        assert echo(f"ws://{sb.get_host(8765)}/") == "echo: ping"
        # a port nothing listens on: a readable 502, not a hang
        refused = httpx.get(f"http://{sb.get_host(9)}/", timeout=60)
        assert refused.status_code == 502 and "port 9" in refused.text
    with pytest.raises(httpx.ConnectError):  # gone with the sandbox
        httpx.get(f"http://{host}/index.html", timeout=10)


def test_through_a_server_a_port_needs_its_token(image: Image, tmp_path: Path) -> None:
    with running_server(tmp_path / "server") as server, Sandbox(
        server=str(server.socket), network="isolated"
    ) as sb:
        start_servers(sb)
        exposed = sb.expose(8000)
        assert exposed.token and exposed.host.startswith("127.0.0.1:")
        denied = httpx.get(f"{exposed.url}index.html", timeout=60)
        assert denied.status_code == 403 and "port token" in denied.text
        header = {"X-Agent-VM-Port-Token": exposed.token}
        page = httpx.get(f"{exposed.url}index.html", headers=header, timeout=60)
        assert page.text == "hello from the sandbox\n"
        # a browser: the token in the query once, then a cookie
        with httpx.Client(follow_redirects=True, timeout=60) as browser:
            landed = browser.get(f"{exposed.url}index.html?agentvm_token={exposed.token}")
            assert landed.text == "hello from the sandbox\n", landed.text
            assert str(landed.url).endswith("/index.html")
        ws = sb.expose(8765)
        assert ws.token is not None
        assert echo(f"ws://{ws.host}/", {"X-Agent-VM-Port-Token": ws.token}) == "echo: ping"
        # the CLI prints the same kind of URL
        printed = subprocess.run(
            [*CLI, "port", sb.sandbox_id, "8000", "--server", str(server.socket)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert printed.returncode == 0, printed.stderr
        url = printed.stdout.splitlines()[0]
        assert url.startswith("http://127.0.0.1:")
        sid, url_of_page = sb.sandbox_id, exposed.url
    time.sleep(0.5)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url_of_page}index.html", headers=header, timeout=10)
    assert sid
