"""asyncio helpers for blocking work that must not be abandoned half-done.

``asyncio.to_thread`` cannot stop its thread: a caller cancelled while the thread
creates a file, an ipset or a domain would run its clean-up before the thing exists,
and leak it. :func:`finish_in_thread` waits for the thread before re-raising.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


async def finish_in_thread(
    fn: Callable[P, T],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """Run ``fn`` in a thread. If the caller is cancelled meanwhile, first wait for the
    thread to finish, then re-raise the cancellation."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await future
        raise


async def finish_then_undo(fn: Callable[[], T], undo: Callable[[T], Awaitable[object]]) -> T:
    """Like :func:`finish_in_thread`; when cancelled after ``fn`` produced something,
    ``undo`` it (shielded) before re-raising: nothing made is left unowned."""
    future = asyncio.ensure_future(asyncio.to_thread(fn))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            made = await future
            await asyncio.shield(undo(made))
        raise
