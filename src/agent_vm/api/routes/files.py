"""``/v1/sandboxes/{id}/files``: content and trees streamed both ways (the guest's tar
passed on untouched: the client extracts it as safely as a local download), metadata,
and file events as server-sent events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from agent_vm.api.deps import Service, Token
from agent_vm.api.schemas import Exists, FileEntryView, Made, Renamed, Written
from agent_vm.sandbox import wire

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}/files", tags=["files"])


def _body(media: str, what: str) -> dict[int | str, dict[str, Any]]:
    return {200: {"content": {media: {}}, "description": what}}


@router.get("", response_model=list[FileEntryView])
async def list_files(
    sandbox_id: str, owner: Token, service: Service, path: str,
    depth: Annotated[int, Query(ge=1, le=8)] = 1,
) -> list[dict[str, Any]]:  # fmt: skip
    entries = await service.files(owner, sandbox_id).list(path, depth)
    return [wire.entry_json(e) for e in entries]


@router.get(
    "/content", response_class=StreamingResponse,
    responses=_body("application/octet-stream", "the file's bytes"),
)  # fmt: skip
async def read_file(
    sandbox_id: str, owner: Token, service: Service, path: str
) -> StreamingResponse:
    """The file's bytes (a refusal, such as a directory, is an error answer)."""
    stream = await service.download(owner, sandbox_id, path)
    return StreamingResponse(stream, media_type="application/octet-stream")


@router.put("/content", response_model=Written)
async def write_file(
    sandbox_id: str, owner: Token, service: Service, request: Request, path: str,
    mode: Annotated[int | None, Query(ge=0, le=0o7777)] = None,
) -> dict[str, Any]:  # fmt: skip
    written = await service.upload(owner, sandbox_id, path, request.stream(), mode=mode)
    return {"path": path, "bytes": written}


@router.get(
    "/tar", response_class=StreamingResponse,
    responses=_body("application/x-tar", "the guest's tar of the directory"),
)  # fmt: skip
async def read_tree(
    sandbox_id: str, owner: Token, service: Service, path: str
) -> StreamingResponse:
    """A directory as the guest's tar stream."""
    stream = await service.download(owner, sandbox_id, path, tree=True)
    return StreamingResponse(stream, media_type="application/x-tar")


@router.put("/tar", response_model=Written)
async def write_tree(
    sandbox_id: str, owner: Token, service: Service, request: Request, path: str
) -> dict[str, Any]:
    """A tar stream unpacked by the guest into ``path`` (made if missing)."""
    sent = await service.upload(owner, sandbox_id, path, request.stream(), tree=True)
    return {"path": path, "bytes": sent}


@router.get(
    "/watch", response_class=StreamingResponse,
    responses=_body("text/event-stream", "WatchEvent JSON per event"),
)  # fmt: skip
async def watch(
    sandbox_id: str, owner: Token, service: Service, path: str, recursive: bool = False
) -> StreamingResponse:
    """File events under ``path`` as server-sent events, until the client leaves."""
    files = service.files(owner, sandbox_id)
    await files.stat(path)  # a missing path is an error answer

    async def stream() -> AsyncIterator[bytes]:
        async for event in files.watch(path, recursive):
            yield f"event: {event.type}\ndata: {json.dumps(wire.watch_json(event))}\n\n".encode()

    return StreamingResponse(stream(), media_type="text/event-stream")


@router.get("/stat", response_model=FileEntryView)
async def stat_file(sandbox_id: str, owner: Token, service: Service, path: str) -> dict[str, Any]:
    return wire.entry_json(await service.files(owner, sandbox_id).stat(path))


@router.get("/exists", response_model=Exists)
async def exists(sandbox_id: str, owner: Token, service: Service, path: str) -> dict[str, Any]:
    return {"path": path, "exists": await service.files(owner, sandbox_id).exists(path)}


@router.post("/dir", response_model=Made)
async def make_dir(
    sandbox_id: str, owner: Token, service: Service, path: str,
    mode: Annotated[int, Query(ge=0, le=0o7777)] = 0o755,
) -> dict[str, Any]:  # fmt: skip
    return {"path": path, "made": await service.files(owner, sandbox_id).make_dir(path, mode)}


@router.post("/rename", response_model=Renamed)
async def rename(
    sandbox_id: str, owner: Token, service: Service, old: str, new: str
) -> dict[str, Any]:
    await service.files(owner, sandbox_id).rename(old, new)
    return {"old": old, "new": new}


@router.delete("", status_code=204)
async def remove_file(sandbox_id: str, owner: Token, service: Service, path: str) -> Response:
    await service.files(owner, sandbox_id).remove(path)
    return Response(status_code=204)
