"""Reading a request safely (a bounded JSON body, a checked text field) and running a turn
that is cancelled if its client disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive

from ..stores._record import is_utf8_text
from ._errors import ApiError, ClientGone

__all__ = ["chat_watched", "check_text", "read_json", "run_watched", "wait_disconnect"]

logger = logging.getLogger("conversation_session.service")


async def read_json(request: Request, limit: int, *, optional: bool = False) -> dict[str, Any]:
    """The body as a JSON object, at most ``limit`` bytes (413 beyond, 400 if not an object)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "bad_request", "invalid Content-Length")
        if int(length) > limit:
            raise ApiError(413, "too_large", f"the body is over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "too_large", f"the body is over {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client went away while sending the body") from None
    raw = b"".join(chunks)
    if not raw.strip():
        if optional:
            return {}
        raise ApiError(400, "bad_json", 'send a JSON object, e.g. {"text": "hello"}')
    try:
        data = json.loads(raw, parse_constant=_not_json)
    except (ValueError, RecursionError):
        raise ApiError(400, "bad_json", "the body is not valid UTF-8 JSON (NaN and Infinity are not JSON)") from None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object")
    return data


def _not_json(name: str) -> Any:
    """``NaN``, ``Infinity``: Python's parser takes them, JSON does not (and no number field
    of ours can hold one)."""
    raise ValueError(f"{name} is not JSON")


def check_text(data: dict[str, Any], limit: int, field: str = "text") -> str:
    text = data.get(field)
    if not isinstance(text, str):
        raise ApiError(400, "invalid_text", f'"{field}" must be a string')
    if not text.strip():
        raise ApiError(400, "invalid_text", f'"{field}" is empty')
    if not is_utf8_text(text):
        raise ApiError(400, "invalid_text", f'"{field}" holds a lone surrogate and cannot be saved as UTF-8')
    if len(text.encode()) > limit:
        raise ApiError(413, "too_large", f'"{field}" is over {limit} bytes')
    if "\x00" in text:
        raise ApiError(400, "invalid_text", f'"{field}" holds a NUL character')
    return text


async def wait_disconnect(receive: Receive) -> None:
    """Return when the client has gone (after the body was read, ``receive`` only says that)."""
    while True:
        message = await receive()
        if message["type"] in ("http.disconnect", "websocket.disconnect"):
            return


async def run_watched(coro: Awaitable[Any], receive: Receive) -> Any:
    """Run ``coro``; if the client disconnects first, cancel it (the backend stops generating
    and nothing of the turn is kept) and raise ``ClientGone``."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        watch.cancel()
        with contextlib.suppress(BaseException):
            await work
        raise
    if work in done:
        watch.cancel()
        return work.result()
    work.cancel()
    with contextlib.suppress(BaseException):
        await work
    raise ClientGone()


async def chat_watched(registry: Any, session_id: str, text: str, receive: Receive) -> Any:
    """One turn on ``session_id``, held in ``registry`` for its length and cancelled (nothing
    kept) if the client disconnects first (``ClientGone``)."""
    async def turn() -> Any:
        async with registry.hold(session_id) as session:
            assert session is not None
            return await session.chat(text)

    return await run_watched(turn(), receive)
