"""The service's error answers: ``ApiError`` (status, stable code, message) and how a library
error maps to one (``turn_error``), with the JSON of a completed turn (``result_json``)."""

from __future__ import annotations

import logging
from typing import Any

from starlette.responses import JSONResponse

from .._exceptions import (
    BackendError,
    SessionError,
    SessionLockedError,
    SessionTimeoutError,
    StoreUnavailableError,
)
from .._result import ChatResult
from ._log import request_id_var
from ._registry import Busy, Gone

__all__ = ['ApiError', 'ClientGone', 'result_json', 'turn_error']

logger = logging.getLogger("conversation_session.service")


class ApiError(Exception):
    """An error answer: HTTP status, a stable code, a message saying what to do."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra},
                "request_id": request_id_var.get()}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client disconnected while its turn ran: the turn was cancelled."""


def result_json(result: ChatResult) -> dict[str, Any]:
    out = {
        "response": result.response,
        "turn": result.turn,
        "figures": {
            "ttft_s": result.ttft_s, "total_s": result.total_s, "prompt_tokens": result.prompt_tokens,
            "cached_tokens": result.cached_tokens, "completion_tokens": result.completion_tokens,
            "saved": result.saved, "durability": result.durability,
            "finish_reason": result.finish_reason, "trimmed_turns": result.trimmed_turns,
        },
    }
    if result.tool_calls:  # each call the turn made: id, name, arguments, result or error, duration_s
        out["tool_calls"] = [dict(c) for c in result.tool_calls]
    if getattr(result, "interrupted", False):  # barge-in: what reached the user was kept
        out["interrupted"] = True
        out["heard_fraction"] = getattr(result, "heard_fraction", None)
    return out


def turn_error(exc: BaseException) -> ApiError:
    """A library error as the answer a client can act on."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, SessionTimeoutError):
        return ApiError(504, "timeout", str(exc), extra={"partial_response": exc.partial_response})
    if isinstance(exc, (Busy, SessionLockedError)):
        return ApiError(409, "busy", str(exc), headers={"Retry-After": "1"})
    if isinstance(exc, Gone):
        return ApiError(404, "not_found", "no such session")
    if isinstance(exc, BackendError):
        return ApiError(502, "backend_error", str(exc))
    if isinstance(exc, StoreUnavailableError):
        return ApiError(503, "store_unavailable", str(exc), headers={"Retry-After": "2"})
    if isinstance(exc, ValueError):
        return ApiError(400, "invalid_text", str(exc))
    if isinstance(exc, SessionError):
        return ApiError(500, "session_error", str(exc))
    logger.error("unexpected error", exc_info=exc)
    return ApiError(500, "internal", "internal error; see the server log for this request id")
