"""Hand-back of native results to asyncio (called by the native module)."""

from __future__ import annotations

import asyncio


def resolve(fut: asyncio.Future[object], ok: bool, value: object) -> None:
    """Completes ``fut`` with ``value`` (a result, or an exception when not ``ok``).

    Runs on the event loop through ``call_soon_threadsafe``; a future that
    was cancelled meanwhile is left alone.
    """
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        assert isinstance(value, BaseException)
        fut.set_exception(value)
