"""The services of a test host; run inside its network namespace by ``testnet.py``.

HTTP on 80 and 8080, HTTPS on 443 with ``--tls CERT KEY`` (``/`` names the port and the
client, ``/bytes/N`` sends N bytes, ``/_headers`` returns the request's headers),
a TCP listener on 22 that sends an SSH-like banner, UDP echo on 443 and 5000, and a DNS
server on 53 (UDP and TCP) answering the names of a zone given as JSON. Prints "ready"
once everything listens. Only ever answers; it never opens a connection itself.

The HTTP ports also serve a **scripted model API** for agents under test: the Anthropic
Messages API (``POST /v1/messages``), OpenAI's chat completions (``POST
/v1/chat/completions``), streamed (SSE) or not, and OpenAI's Responses API (``POST
/v1/responses``, streamed; a scripted ``shell`` call takes the shape of the shell tool the
client offers). ``POST /_script`` with a JSON list of
turns (``{"text": "...", "tool_calls": [{"name": ..., "input": {...}}]}``) sets what
the next requests get, one turn each (then a plain "done"); with ``{"turns": [...],
"tools_only": true}`` only requests that offer tools take turns (an agent's side calls
get "done"). ``GET /_requests`` returns the requests received (paths, bodies and the API
key sent), so a test can see what an agent asked.
"""

from __future__ import annotations

import json
import signal
import socket
import socketserver
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

from dnslib import QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSRecord, DNSServer

HTTP_PORTS = (80, 8080)
HTTPS_PORT = 443
BANNER_PORT = 22
UDP_ECHO_PORTS = (443, 5000)
CHUNK = b"x" * 65536


def _offers_tools(body: dict[str, Any]) -> bool:
    """A request of an agent's main loop: it offers tools (at the top, or as the
    Responses API's ``additional_tools`` input item that Codex sends)."""
    given = body.get("input")
    items: list[Any] = given if isinstance(given, list) else []
    return bool(body.get("tools")) or any(
        isinstance(i, dict) and i.get("type") == "additional_tools" for i in items
    )


class _Model:
    """The scripted turns and the requests seen (shared by both HTTP ports)."""

    lock = threading.Lock()
    turns: ClassVar[list[dict[str, Any]]] = []
    requests: ClassVar[list[dict[str, Any]]] = []
    tools_only: ClassVar[bool] = False  # side requests (titles, summaries) get "done"

    @classmethod
    def next_turn(cls, path: str, body: dict[str, Any], key: str) -> dict[str, Any]:
        with cls.lock:
            cls.requests.append({"path": path, "body": body, "key": key})
            if cls.tools_only and not _offers_tools(body):
                return {"text": "done"}
            return cls.turns.pop(0) if cls.turns else {"text": "done"}


def _tool_id(number: int) -> str:
    """Unique across turns, as the real APIs' are (agents key their tool results by it)."""
    return f"toolu_{len(_Model.requests)}_{number}"


def _anthropic_events(turn: dict[str, Any], model: str) -> list[dict[str, Any]]:
    calls = turn.get("tool_calls", [])
    events: list[dict[str, Any]] = [{
        "type": "message_start",
        "message": {"id": f"msg_{len(_Model.requests)}", "type": "message",
                    "role": "assistant", "model": model, "content": [], "stop_reason": None,
                    "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}},
    }]  # fmt: skip
    index = 0
    if turn.get("text"):
        events += [
            {"type": "content_block_start", "index": index,
             "content_block": {"type": "text", "text": ""}},
            {"type": "content_block_delta", "index": index,
             "delta": {"type": "text_delta", "text": turn["text"]}},
            {"type": "content_block_stop", "index": index},
        ]  # fmt: skip
        index += 1
    for number, call in enumerate(calls):
        events += [
            {"type": "content_block_start", "index": index,
             "content_block": {"type": "tool_use", "id": _tool_id(number),
                               "name": call["name"], "input": {}}},
            {"type": "content_block_delta", "index": index,
             "delta": {"type": "input_json_delta", "partial_json": json.dumps(call["input"])}},
            {"type": "content_block_stop", "index": index},
        ]  # fmt: skip
        index += 1
    stop = "tool_use" if calls else "end_turn"
    events += [
        {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
         "usage": {"output_tokens": 1}},
        {"type": "message_stop"},
    ]  # fmt: skip
    return events


def _anthropic_message(turn: dict[str, Any], model: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = (
        [{"type": "text", "text": turn["text"]}] if turn.get("text") else []
    )
    content += [
        {"type": "tool_use", "id": _tool_id(n), "name": c["name"], "input": c["input"]}
        for n, c in enumerate(turn.get("tool_calls", []))
    ]
    return {
        "id": "msg_1", "type": "message", "role": "assistant", "model": model,
        "content": content, "stop_reason": "tool_use" if turn.get("tool_calls") else "end_turn",
        "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1},
    }  # fmt: skip


def _openai_chunks(turn: dict[str, Any], model: str) -> list[dict[str, Any]]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip

    chunks = [chunk({"role": "assistant", "content": turn.get("text", "")})]
    calls = turn.get("tool_calls", [])
    for number, call in enumerate(calls):
        chunks.append(chunk({"tool_calls": [{
            "index": number, "id": f"call_{number}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["input"])},
        }]}))  # fmt: skip
    chunks.append(chunk({}, "tool_calls" if calls else "stop"))
    return chunks


def _openai_completion(turn: dict[str, Any], model: str) -> dict[str, Any]:
    calls = [
        {"id": f"call_{n}", "type": "function",
         "function": {"name": c["name"], "arguments": json.dumps(c["input"])}}
        for n, c in enumerate(turn.get("tool_calls", []))
    ]  # fmt: skip
    message: dict[str, Any] = {"role": "assistant", "content": turn.get("text", "")}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": message,
                     "finish_reason": "tool_calls" if calls else "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }  # fmt: skip


def _responses_call(call: dict[str, Any], number: int, tools: list[Any]) -> dict[str, Any]:
    """A scripted ``shell`` call in the shape of whichever shell tool the client offered
    (Codex's tool set depends on its version and model family)."""
    call_id = f"call_{len(_Model.requests)}_{number}"
    if call.get("custom"):  # a freeform tool (Codex's ``exec``: JavaScript calling tools)
        return {"type": "custom_tool_call", "id": f"ctc_{call_id}", "call_id": call_id,
                "name": call["name"], "input": call["input"], "status": "completed"}  # fmt: skip
    offered = {t.get("name") or t.get("type") for t in tools if isinstance(t, dict)}
    name, arguments = call["name"], call["input"]
    if name == "shell":
        command = arguments["command"]
        if "shell_command" in offered:
            name, arguments = "shell_command", {"command": command}
        elif "exec_command" in offered:
            name, arguments = "exec_command", {"cmd": command}
        elif "local_shell" in offered and "shell" not in offered:
            return {"type": "local_shell_call", "id": f"lsh_{call_id}", "call_id": call_id,
                    "status": "completed",
                    "action": {"type": "exec", "command": ["bash", "-lc", command]}}  # fmt: skip
        else:
            arguments = {"command": ["bash", "-lc", command]}
    return {"type": "function_call", "id": f"fc_{call_id}", "call_id": call_id, "name": name,
            "arguments": json.dumps(arguments)}  # fmt: skip


def _responses_events(turn: dict[str, Any], model: str, tools: list[Any]) -> list[dict[str, Any]]:
    """OpenAI's Responses API, streamed: the events Codex acts on."""
    rid = f"resp_{len(_Model.requests)}"
    items: list[dict[str, Any]] = []
    if turn.get("text"):
        items.append({"type": "message", "id": f"msg_{rid}", "role": "assistant",
                      "status": "completed",
                      "content": [{"type": "output_text", "text": turn["text"],
                                   "annotations": []}]})  # fmt: skip
    items += [_responses_call(c, n, tools) for n, c in enumerate(turn.get("tool_calls", []))]
    response = {"id": rid, "object": "response", "model": model, "status": "in_progress",
                "output": []}  # fmt: skip
    events: list[dict[str, Any]] = [{"type": "response.created", "response": response}]
    for index, item in enumerate(items):
        events.append({"type": "response.output_item.added", "output_index": index, "item": item})
        if item["type"] == "message":
            events.append({"type": "response.output_text.delta", "output_index": index,
                           "item_id": item["id"], "content_index": 0,
                           "delta": turn["text"]})  # fmt: skip
        events.append({"type": "response.output_item.done", "output_index": index, "item": item})
    usage = {"input_tokens": 1, "input_tokens_details": {"cached_tokens": 0},
             "output_tokens": 1, "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": 2}  # fmt: skip
    events.append({"type": "response.completed",
                   "response": {**response, "status": "completed", "output": items,
                                "usage": usage}})  # fmt: skip
    return events


class _HTTP(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _json(self, status: int, data: object) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, lines: list[bytes]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        for line in lines:
            self.wfile.write(line)
            self.wfile.flush()
        self.close_connection = True

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if self.path.split("?")[0] == "/_headers":  # headers, and how much body came
            received = len(self.rfile.read(length))
            self._json(200, {**{k.lower(): v for k, v in self.headers.items()},
                             "_body_bytes": str(received)})  # fmt: skip
            return
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self._json(400, {"error": "body is not JSON"})
            return
        path = self.path.split("?")[0]
        if path == "/_script":  # a list of turns, or {"turns": [...], "tools_only": true}
            script = body if isinstance(body, dict) else {"turns": body}
            with _Model.lock:
                _Model.turns = list(script["turns"])
                _Model.tools_only = bool(script.get("tools_only"))
                _Model.requests = []
            self._json(200, {"turns": len(_Model.turns)})
            return
        if path not in ("/v1/messages", "/v1/chat/completions", "/v1/responses"):
            self._json(404, {"error": f"no {path}"})
            return
        auth = self.headers.get("x-api-key") or self.headers.get("Authorization") or ""
        turn = _Model.next_turn(path, body, auth.removeprefix("Bearer "))
        model = str(body.get("model", "fake-model"))
        streamed = bool(body.get("stream"))
        if path == "/v1/responses":
            tools = body.get("tools") or []
            self._stream([
                f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode()
                for e in _responses_events(turn, model, tools)
            ])  # fmt: skip
        elif path == "/v1/messages":
            if not streamed:
                self._json(200, _anthropic_message(turn, model))
                return
            self._stream([
                f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode()
                for e in _anthropic_events(turn, model)
            ])  # fmt: skip
        elif not streamed:
            self._json(200, _openai_completion(turn, model))
        else:
            chunks = [f"data: {json.dumps(c)}\n\n".encode() for c in _openai_chunks(turn, model)]
            self._stream([*chunks, b"data: [DONE]\n\n"])

    def do_GET(self) -> None:
        if self.path.split("?")[0] == "/_headers":  # what arrived, for the proxy's tests
            self._json(200, {k.lower(): v for k, v in self.headers.items()})
            return
        if self.path == "/_requests":
            with _Model.lock:
                self._json(200, list(_Model.requests))
            return
        if self.path.startswith("/bytes/"):
            size = int(self.path.removeprefix("/bytes/"))
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            while size > 0:
                chunk = CHUNK[: min(size, len(CHUNK))]
                self.wfile.write(chunk)
                size -= len(chunk)
            return
        port = self.server.server_port  # type: ignore[attr-defined]  # an HTTPServer
        body = f"hello from port {port} to {self.client_address[0]}\n"
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        return


class _Banner(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(b"SSH-2.0-agentvm-testhost\r\n")


class _Zone(BaseResolver):  # type: ignore[misc]
    def __init__(self, zone: dict[str, str]) -> None:
        self.zone = {name.lower().rstrip("."): address for name, address in zone.items()}

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()
        name = str(request.q.qname).lower().rstrip(".")
        if name not in self.zone:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype == QTYPE.A:
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(self.zone[name]), ttl=60))
        return reply


def _udp_echo(port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(data, peer)


class _TLSServer(ThreadingHTTPServer):
    """HTTPS: the handshake in the request's own thread (a slow client holds no other)."""

    daemon_threads = True
    context: ssl.SSLContext

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            wrapped = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        self.RequestHandlerClass(wrapped, client_address, self)  # type: ignore[arg-type]


class _TCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main() -> None:
    zone = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    detached = "--detached" in sys.argv
    servers: list[socketserver.BaseServer] = []
    for port in HTTP_PORTS:
        http = ThreadingHTTPServer(("0.0.0.0", port), _HTTP)
        http.daemon_threads = True
        servers.append(http)
    servers.append(_TCPServer(("0.0.0.0", BANNER_PORT), _Banner))
    if "--tls" in sys.argv:  # HTTPS on 443, with the test CA's certificate
        cert, key = sys.argv[sys.argv.index("--tls") + 1 : sys.argv.index("--tls") + 3]
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        https = _TLSServer(("0.0.0.0", HTTPS_PORT), _HTTP)
        https.context = context
        servers.append(https)
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    for port in UDP_ECHO_PORTS:
        threading.Thread(target=_udp_echo, args=(port,), daemon=True).start()
    resolver = _Zone(zone)
    for tcp in (False, True):
        quiet = DNSLogger(logf=lambda _: None)
        dns = DNSServer(resolver, port=53, address="0.0.0.0", tcp=tcp, logger=quiet)
        dns.start_thread()
    print("ready", flush=True)
    if detached:  # until the last test session using it kills it
        while True:
            signal.pause()
    sys.stdin.read()  # until the test closes our stdin (or dies)


if __name__ == "__main__":
    main()
