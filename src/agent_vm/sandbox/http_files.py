"""The files API over an ``agent-vm serve`` (``Files`` implemented on its routes).
Content travels as raw HTTP bodies both ways, streamed; trees as the guest's tar, which
is extracted here by ``SafeExtractor`` exactly as a local download is."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from httpx_sse import aconnect_sse

from agent_vm.communication.fileapi import (
    FileEntry,
    Files,
    WatchEvent,
    WriteData,
    chunks_of,
)
from agent_vm.sandbox import wire
from agent_vm.sandbox.client import ServerClient, raise_for

CHUNK = 1 << 20


class HttpFiles(Files):
    def __init__(self, client: ServerClient, prefix: str) -> None:
        self.client = client
        self.url = f"{prefix}/files"

    async def _download(self, what: str, path: str) -> AsyncGenerator[bytes, None]:
        """A streamed GET of ``files/{what}``: a refusal raises before the first chunk."""
        async with self.client.http.stream(
            "GET", f"{self.url}/{what}", params={"path": path}
        ) as response:
            if response.status_code >= 400:
                await response.aread()
                raise_for(response)
            async for chunk in response.aiter_bytes(CHUNK):
                yield chunk

    def read_stream(self, path: str) -> AsyncGenerator[bytes, None]:
        return self._download("content", path)

    def tar_stream(self, remote: str) -> AsyncGenerator[bytes, None]:
        return self._download("tar", remote)

    async def write(self, path: str, data: WriteData, mode: int | None = None) -> int:
        params: dict[str, Any] = {"path": path}
        if mode is not None:
            params["mode"] = mode
        response = await self.client.call(
            "PUT", f"{self.url}/content", params=params, content=chunks_of(data)
        )
        return int(response.json()["bytes"])

    async def untar(self, remote: str, data: WriteData) -> int:
        response = await self.client.call(
            "PUT", f"{self.url}/tar", params={"path": remote}, content=chunks_of(data)
        )
        return int(response.json()["bytes"])

    async def list(self, path: str, depth: int = 1) -> list[FileEntry]:
        data = await self.client.json("GET", self.url, params={"path": path, "depth": depth})
        return [wire.entry_from(item) for item in data]

    async def stat(self, path: str) -> FileEntry:
        return wire.entry_from(
            await self.client.json("GET", f"{self.url}/stat", params={"path": path})
        )

    async def exists(self, path: str) -> bool:
        data = await self.client.json("GET", f"{self.url}/exists", params={"path": path})
        return bool(data["exists"])

    async def make_dir(self, path: str, mode: int = 0o755) -> bool:
        params = {"path": path, "mode": mode}
        return bool((await self.client.json("POST", f"{self.url}/dir", params=params))["made"])

    async def remove(self, path: str) -> None:
        await self.client.call("DELETE", self.url, params={"path": path})

    async def rename(self, old: str, new: str) -> None:
        await self.client.call("POST", f"{self.url}/rename", params={"old": old, "new": new})

    async def watch(self, path: str, recursive: bool = False) -> AsyncIterator[WatchEvent]:
        params = {"path": path, "recursive": recursive}
        async with aconnect_sse(
            self.client.http, "GET", f"{self.url}/watch", params=params
        ) as source:
            if source.response.status_code >= 400:
                await source.response.aread()
                raise_for(source.response)
            async for sse in source.aiter_sse():
                yield wire.watch_from(json.loads(sse.data))
