"""Blocking access to the asyncio client, for code that is not async.

One event loop runs in a daemon thread; each call submits a coroutine to it and waits.
Output callbacks therefore run on that loop's thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from agent_vm.communication.channel import AgentChannel, OutputCallback, RawExecution
from agent_vm.communication.transport import Transport
from agent_vm.protocol.messages import Execute, Ready, Status

T = TypeVar("T")


class BackgroundLoop:
    """An asyncio event loop in a daemon thread."""

    def __init__(self, name: str = "agent-vm-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
        if not self.loop.is_running():
            self.loop.close()


class SyncAgentChannel:
    """The same operations as :class:`AgentChannel`, blocking."""

    def __init__(self, transport: Transport, *, name: str = "vm") -> None:
        self._loop = BackgroundLoop(f"agent-{name}")
        self._channel = self._loop.run(self._create(transport, name))

    @staticmethod
    async def _create(transport: Transport, name: str) -> AgentChannel:
        return AgentChannel(transport, name=name)  # bound to the background loop

    def connect(self, timeout: float = 30.0) -> Ready:
        return self._loop.run(self._channel.connect(timeout))

    def execute(
        self,
        request: Execute,
        *,
        stdin: bytes | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        wait_timeout: float | None = None,
    ) -> RawExecution:
        return self._loop.run(
            self._channel.execute(
                request,
                stdin=stdin,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
                wait_timeout=wait_timeout,
            )
        )

    def ping(self, timeout: float = 5.0) -> Status:
        return self._loop.run(self._channel.ping(timeout))

    def close(self) -> None:
        try:
            self._loop.run(self._channel.close(), timeout=10)
        finally:
            self._loop.close()
