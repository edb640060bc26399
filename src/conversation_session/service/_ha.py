"""The Home Assistant-shaped endpoint, ``POST /api/conversation/process``: a conversation id
that never expires, and a short spoken sentence (in the request's language) when a turn fails."""

from __future__ import annotations

import logging
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .._exceptions import (
    SessionError,
    SessionLockedError,
    SessionTimeoutError,
    StoreUnavailableError,
)
from ..stores import is_session_id
from ._errors import ApiError, ClientGone, turn_error
from ._log import session_id_var
from ._registry import Busy, Gone
from ._requests import chat_watched, check_text, read_json
from ._state import state_of

__all__ = ['ha_process', 'ha_sorry']

logger = logging.getLogger("conversation_session.service")


_GENERATED_RE = re.compile(r"c[0-9a-f]{24}|[0-9A-HJKMNP-TV-Z]{26}")  # ours, or a ULID (Home Assistant's)


_HA_SORRY = {
    "timeout": {"en": "Sorry, that took too long. Please ask again.",
                "zh-Hans": "抱歉，回答超时了，请再说一遍。", "zh-Hant": "抱歉，回答逾時了，請再說一遍。"},
    "error": {"en": "Sorry, I cannot answer right now.",
              "zh-Hans": "抱歉，我现在无法回答。", "zh-Hant": "抱歉，我現在無法回答。"},
}


def ha_sorry(kind: str, language: str) -> str:
    """The sentence a voice satellite speaks when a turn failed, in ``language`` (a BCP 47
    tag as Home Assistant sends it); English for a language it does not have."""
    parts = language.replace("_", "-").lower().split("-")
    key = "en"
    if parts[0] == "zh":
        key = "zh-Hant" if "hant" in parts or any(p in ("tw", "hk", "mo") for p in parts[1:]) else "zh-Hans"
    return _HA_SORRY[kind][key]


def _ha_answer(speech: str, conversation_id: str, language: str, *, error: str | None = None,
               extra: dict[str, Any] | None = None, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The shape of Home Assistant's ``POST /api/conversation/process`` answer."""
    response: dict[str, Any] = {
        "speech": {"plain": {"speech": speech, "extra_data": None}},
        "card": {},
        "language": language,
        "response_type": "error" if error else "action_done",
        "data": {"code": error, **(details or {})} if error else {"targets": [], "success": [], "failed": []},
    }
    return {"response": response, "conversation_id": conversation_id,
            "continue_conversation": bool(not error and speech.rstrip().endswith(("?", "？"))), **(extra or {})}


async def ha_process(request: Request) -> Response:
    """Home Assistant's conversation API: memory that never expires and survives restarts.

    ``conversation_id`` absent, or one of ours / a ULID that is unknown: a new conversation
    (its id is returned).  A name the device picked itself ("kitchen"): that name keeps
    meaning the same conversation for this token, as Home Assistant does for non-ULID ids."""
    st = state_of(request)
    owner = await st.owner(request)
    data = await read_json(request, st.config.max_body_bytes)
    text = check_text(data, st.config.max_text_bytes)
    language = data.get("language") or "en"
    cid = data.get("conversation_id")
    if not isinstance(language, str) or len(language) > 35:
        raise ApiError(400, "bad_request", '"language" must be a language tag such as "en"')
    if cid is not None and not is_session_id(cid):
        raise ApiError(400, "invalid_id", '"conversation_id" is 1-128 letters, digits, "_" or "-"')
    _, owners = st.tables()
    reg = await st.wait_ready()
    sid: str | None = None
    shown = cid
    if cid is not None:
        entry = await st.io(owners.get, cid)
        if entry is not None and entry.get("owner") == owner:
            sid = cid
        elif not _GENERATED_RE.fullmatch(cid):
            sid = await st.io(owners.find_alias, owner, cid) or (await st.io(owners.create, owner, cid))[0]
    if sid is None:
        sid, _ = await st.io(owners.create, owner)
        shown = sid
    assert shown is not None
    session_id_var.set(sid)

    try:
        result = await chat_watched(reg, sid, text, request.receive)
    except ClientGone:
        st.counters["turns_cancelled"] += 1
        return Response(status_code=499)
    except (Busy, SessionLockedError, Gone, StoreUnavailableError) as exc:
        st.counters["turns_failed"] += 1
        raise turn_error(exc) from None
    except (SessionError, ValueError) as exc:
        st.counters["turns_failed"] += 1
        # A satellite reads the speech aloud: one short sentence in the request's language;
        # what a developer needs goes in ``data``.
        kind = "timeout" if isinstance(exc, SessionTimeoutError) else "error"
        details: dict[str, Any] = {"error": kind, "message": str(exc)}
        if isinstance(exc, SessionTimeoutError):
            details.update(timeout_s=exc.timeout, partial_response=exc.partial_response)
        return JSONResponse(_ha_answer(ha_sorry(kind, language), shown, language, error="failed_to_handle",
                                       details=details))
    st.counters["turns_completed"] += 1
    return JSONResponse(_ha_answer(result.response, shown, language,
                                   extra={"session_id": sid, "turn": result.turn}))
