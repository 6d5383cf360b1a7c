"""The scripted model API agents are tested against (``testhost_server.py``), reached from
a sandbox whose allowlist resolves only the test host's name; every other name (the real
APIs, update checks, telemetry) is refused and counted."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.runtime import Runtime
from agent_vm.image.store import Image
from agent_vm.network.guard import NetworkGuard
from agent_vm.network.policy import EgressPolicy
from tests.integration.conftest import TEST_HOST_IP
from tests.integration.testnet import TestHost

API = "api.allowed.test"

GUEST_CLIENT = r"""
import json, socket, urllib.request

def post(path, body):
    request = urllib.request.Request(
        f"http://API{path}", data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "x-api-key": "test"},
    )
    with urllib.request.urlopen(request, timeout=20) as response:
        return response.read().decode()

def events(text):  # SSE: "data: ..." lines
    return [json.loads(line[6:]) for line in text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]

out = {}
anthropic = events(post("/v1/messages", {"model": "claude-test", "stream": True,
                                         "messages": [{"role": "user", "content": "edit"}]}))
out["anthropic_types"] = [e["type"] for e in anthropic]
out["tool"] = [e["content_block"]["name"] for e in anthropic
               if e["type"] == "content_block_start" and e["content_block"]["type"] == "tool_use"]
out["input"] = json.loads("".join(e["delta"]["partial_json"] for e in anthropic
                                  if e["type"] == "content_block_delta"
                                  and e["delta"]["type"] == "input_json_delta"))
openai = events(post("/v1/chat/completions", {"model": "gpt-test", "stream": True,
                                              "messages": [{"role": "user", "content": "x"}]}))
out["openai_finish"] = [c["choices"][0]["finish_reason"] for c in openai][-1]
out["openai_text"] = "".join(c["choices"][0]["delta"].get("content") or "" for c in openai)
refused = []
for name in ("api.anthropic.com", "api.openai.com", "statsig.anthropic.com"):
    try:
        socket.getaddrinfo(name, 443)
    except socket.gaierror:
        refused.append(name)
out["refused"] = refused
print(json.dumps(out))
""".replace("API", API)


def control(path: str, body: Any | None = None) -> Any:
    """The test host's script endpoint, from the host (the namespace's address)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{TEST_HOST_IP}{path}", data=data)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


async def test_a_sandbox_reaches_only_the_scripted_model_api(
    runtime: Runtime,
    image: Image,
    guard: NetworkGuard,
    test_host: TestHost,
    scripted_model: None,
) -> None:
    edit = {"name": "Write", "input": {"file_path": "/workspace/a.txt", "content": "hi\n"}}
    control("/_script", [{"text": "I will edit.", "tool_calls": [edit]}, {"text": "Done."}])
    vm = await runtime.vm(image=image, policy=EgressPolicy(allow_domains=(API,)))
    try:
        result = await AgentExecutor().execute(vm, code=GUEST_CLIENT, timeout=120)
        assert result.exit_code == 0, result.stderr
        seen = json.loads(result.stdout)
        blocked = (
            {(b.kind, b.destination) for b in vm.guard.blocked(vm.name)} if vm.guard else set()
        )
    finally:
        await vm.close()
    assert seen["tool"] == ["Write"] and seen["input"] == edit["input"]
    assert seen["anthropic_types"][0] == "message_start"
    assert seen["anthropic_types"][-1] == "message_stop"
    assert (seen["openai_text"], seen["openai_finish"]) == ("Done.", "stop")
    assert seen["refused"] == ["api.anthropic.com", "api.openai.com", "statsig.anthropic.com"]
    assert {("dns", "api.anthropic.com"), ("dns", "api.openai.com")} <= blocked, blocked
    asked = control("/_requests")
    assert [r["path"] for r in asked] == ["/v1/messages", "/v1/chat/completions"]
    assert asked[0]["body"]["model"] == "claude-test"
