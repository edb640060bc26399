"""What the Ollama and OpenAI surfaces share: which session a request reaches, how the
client's messages are reconciled with the durable history, and one turn run for both.

**Which session.**  An explicit id wins: the ``X-Session-Id`` header, Open WebUI's
``X-OpenWebUI-Chat-Id``, or OpenAI's ``user`` field.  An id that is one of this token's service
sessions (``/v1/sessions``) is that session; any other string names a session of its own for
this token.  Without one, the session is named after the ``model`` asked for (``:latest``
ignored), per token.  Ids made here are derived from the token's owner id and the name (a
hash), so every worker and every restart finds the same session without a lookup table of its
own; they are rows of the ownership table like any other, so the native API lists them.

**Reconciliation** (``reconcile``; docs/compat.md says it for users).  The client's last
message is the new user message.  Its earlier messages are a window onto the durable history,
never a second copy of it:

* without an explicit id they are only a window: nothing of them is appended (the durable
  history already holds what was said; a client that trimmed it, or that rolled over to only
  its system prompt and the new message, continues the same conversation);
* with an explicit id they are the whole conversation (a request carrying only the new message
  continues, unless the id came from Open WebUI's header: Open WebUI always sends everything,
  so there it is an edit of the first message): if they match the start of the stored
  history, or its end (a client that trims), it is a continuation; if the client lacks the
  last reply and asks the same message again, it is a regenerate (the session's ``retry``:
  the old reply goes to ``undone`` in the same write that saves the new one); otherwise the
  stored history is rewound to the common prefix (``rewind_to``: withdrawn messages are kept
  under ``undone``, as by ``undo``) and the client's differing turns are added before the turn.

**Tool calls pass through** (``parse_tools``): the tools the client declares are offered to
the model and never run here.  A call the model makes ends the turn: it is committed as a
pending call (``"client": true`` on the call, so the orphan repair on load leaves it for the
client) and returned in the API's shape.  A request whose last messages are ``tool`` results
answers the pending calls (``AsyncConversationSession.stream_tool_results``: by
``tool_call_id``, or in order without ids, as Home Assistant's Ollama integration sends them);
its other messages are not reconciled (they are what led to the call).  Stored tool messages
are left out of the comparison: only user messages and assistant replies with text take part.

The client's system prompt is the prompt's system prompt for that request (the stored one
otherwise); it is not saved.  Comparisons touch at most the client's messages (O(client
messages), not O(history)).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .._exceptions import SessionError
from .._result import ChatResult
from ..session._aio import AsyncConversationSession
from ..stores import is_session_id
from ..stores._record import MessageDict, is_utf8_text
from ._errors import ApiError, ClientGone, turn_error
from ._log import session_id_var
from ._requests import run_watched

__all__ = [
    "CompatError",
    "CompatRequest",
    "PathToken",
    "Reconcile",
    "TurnEvent",
    "answers_errors_as",
    "check_name",
    "derived_sid",
    "durations",
    "explicit_session",
    "finish",
    "first_event",
    "model_key",
    "parse_messages",
    "parse_tools",
    "reconcile",
    "resolve_session",
    "run_turn",
    "served_models",
    "whole_turn",
]

logger = logging.getLogger("conversation_session.service")

SESSION_HEADERS = ("x-session-id", "x-openwebui-chat-id")
WHOLE_HEADER = "x-openwebui-chat-id"  # Open WebUI sends the whole conversation, always
_MAX_NAME = 256
_MAX_TOOLS = 256


class CompatError(Exception):
    """A bad request, said in the words of the API that received it (each surface shapes it)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


Handler = Callable[[Request], Awaitable[Response]]
ErrorBody = Callable[[int, str, "str | None", "str | None"], dict[str, Any]]


def answers_errors_as(body: ErrorBody) -> Callable[[Handler], Handler]:
    """A route decorator: every failure answered in the shape of the API that received it,
    ``body(status, message, param, code)`` with the HTTP status (a bad request, a service error
    mapped by ``turn_error``, an unexpected one logged there); a client that went away gets 499."""
    def decorate(fn: Handler) -> Handler:
        @functools.wraps(fn)
        async def wrapped(request: Request) -> Response:
            try:
                return await fn(request)
            except CompatError as exc:
                return JSONResponse(body(exc.status, exc.message, exc.param, exc.code), status_code=exc.status)
            except ClientGone:
                return Response(status_code=499)
            except Exception as exc:  # noqa: BLE001 - mapped; unknown ones are logged by turn_error
                err = exc if isinstance(exc, ApiError) else turn_error(exc)
                return JSONResponse(body(err.status, err.message, None, err.code), status_code=err.status,
                                    headers=err.headers)
        return wrapped
    return decorate


def explicit_session(request: Request) -> str | None:
    """The conversation a client names in a header (``SESSION_HEADERS``), checked; None if none."""
    for header in SESSION_HEADERS:
        value = request.headers.get(header)
        if value:
            return check_name(value, header)
    return None


def model_key(model: str) -> str:
    """The name a model's memory is keyed on: ``kitchen`` and ``kitchen:latest`` are one."""
    return model.strip().removesuffix(":latest")


def derived_sid(owner: str, kind: str, name: str) -> str:
    """The service session id of ``name`` (a model or a client's own id) for ``owner``: the same
    in every worker and after every restart, valid as a store id, and not guessable without the
    token (the owner id is a hash of it)."""
    digest = hashlib.sha256(f"conversation-session\0{owner}\0{kind}\0{name}".encode()).hexdigest()
    return ("m" if kind == "model" else "x") + digest[:24]


def served_models(config: Any, backend_model: str | None) -> list[tuple[str, str]]:
    """(name, served by) for every model the compat surfaces list: the service's own model
    (its file name without ``.gguf``, or the server's model name), then each ``--assistant``."""
    base = os.path.basename(str(backend_model or config.model or "model")).removesuffix(".gguf") or "model"
    out = [(model_key(base), base)]
    for spec in config.assistants:
        name, _, served = spec.partition("=")
        if name not in (n for n, _ in out):
            out.append((name, served or base))
    return out


def _text_of(content: Any, where: str) -> str:
    """A message's text: a string, or OpenAI's list of parts (text parts joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise CompatError(400, f"{where}: only text content is supported, not {kind!r}", param="messages")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise CompatError(400, f"{where}: content must be a string", param="messages")


@dataclass
class CompatRequest:
    """One chat request, whichever API it came in."""

    model: str
    system: str | None             # the client's system prompt (None: the session's own)
    history: list[MessageDict]     # the client's earlier user/assistant messages
    text: str                      # the new user message
    explicit: str | None = None    # an explicit session id, if the client gave one
    whole: bool = False            # the client always sends the whole conversation (Open WebUI's header)
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = True
    tools: list[dict[str, Any]] = field(default_factory=list)  # the client's tools (it runs them)
    results: list[dict[str, Any]] | None = None  # the client's results of the pending calls (``text`` is "")


def parse_messages(raw: Any, limit: int) -> tuple[str | None, list[MessageDict], str, list[dict[str, Any]] | None]:
    """(system prompt, earlier user/assistant messages, new user message, tool results) of a
    request's ``messages``.  Assistant messages that ask for calls and ``tool`` messages are
    left out of the comparison; ``tool`` messages at the end are the client's results of the
    pending calls (then there is no new user message: ``""``, and the results are a list)."""
    if not isinstance(raw, list) or not raw:
        raise CompatError(400, '"messages" must be a non-empty list', param="messages")
    system: list[str] = []
    convo: list[MessageDict] = []
    results: list[dict[str, Any]] = []  # the tool messages since the last user/assistant message
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise CompatError(400, f"messages[{i}] must be an object with a role", param="messages")
        role = m["role"]
        text = _text_of(m.get("content"), f"messages[{i}]")
        if not is_utf8_text(text) or "\x00" in text:
            raise CompatError(400, f"messages[{i}]: the text cannot be saved (a lone surrogate or NUL)",
                              param="messages")
        if role in ("system", "developer"):
            if not convo:
                system.append(text)  # a system message after the conversation began is left out
        elif role in ("user", "assistant"):
            results = []
            if role == "assistant" and (m.get("tool_calls") or not text.strip()):
                continue  # a call request: stored as the session made it, not compared
            convo.append({"role": role, "content": text})
        elif role in ("tool", "function"):
            call_id = m.get("tool_call_id")
            if call_id is not None and not isinstance(call_id, str):
                raise CompatError(400, f"messages[{i}].tool_call_id must be a string", param="messages")
            if len(text.encode()) > limit:
                raise CompatError(413, f"messages[{i}]: the tool result is over {limit} bytes", param="messages")
            results.append({"content": text, "tool_call_id": call_id or None})
        else:
            raise CompatError(400, f"messages[{i}]: unknown role {role!r}", param="messages")
    if results:
        return ("\n\n".join(system) if system else None), convo, "", results
    if not convo or convo[-1]["role"] != "user":
        raise CompatError(400, "the last message must be the user's, or tool results", param="messages")
    text = convo.pop()["content"]
    if not text.strip():
        raise CompatError(400, "the user's message is empty", param="messages")
    if len(text.encode()) > limit:
        raise CompatError(413, f"the user's message is over {limit} bytes", param="messages")
    return ("\n\n".join(system) if system else None), convo, text, None


def parse_tools(tools: Any, choice: Any = None) -> list[dict[str, Any]]:
    """The client's tools as the schemas offered to the model (``{"type": "function",
    "function": {"name", "description", "parameters"}}``).  ``tool_choice`` (OpenAI): ``"none"``
    offers none, ``{"type": "function", "function": {"name"}}`` only that one; ``"auto"`` and
    ``"required"`` offer all (a model cannot be forced to call here)."""
    if tools is None:
        return []
    if not isinstance(tools, list) or len(tools) > _MAX_TOOLS:
        raise CompatError(400, f'"tools" must be a list of at most {_MAX_TOOLS} tools', param="tools")
    out: list[dict[str, Any]] = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise CompatError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                              param="tools")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise CompatError(400, f"tools[{i}].function.parameters must be an object", param="tools")
        schema: dict[str, Any] = {"name": fn["name"], "description": str(fn.get("description") or ""),
                                  "parameters": params or {"type": "object", "properties": {}}}
        out.append({"type": "function", "function": schema})
    if choice is None or choice in ("auto", "required"):
        return out
    if choice == "none":
        return []
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise CompatError(400, '"tool_choice" must be "none", "auto", "required" or a function', param="tool_choice")
    chosen = [t for t in out if t["function"]["name"] == name]
    if not chosen:
        raise CompatError(400, f'"tool_choice" names {name!r}, which is not in "tools"', param="tool_choice")
    return chosen


def check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > _MAX_NAME or not value.isprintable():
        raise CompatError(400, f"{what} must be a printable string of 1-{_MAX_NAME} characters")
    return value.strip()


async def resolve_session(st: Any, owner: str, model: str, explicit: str | None) -> str:
    """The service session id this request reaches (created if new; see the module docstring)."""
    _, owners = st.tables()
    if explicit is not None:
        if is_session_id(explicit):
            entry = await st.io(owners.get, explicit)
            if entry is not None and entry.get("owner") == owner:
                session_id_var.set(explicit)
                return explicit
        sid = derived_sid(owner, "id", explicit)
    else:
        sid = derived_sid(owner, "model", model_key(model))
    entry = await st.io(owners.get, sid)
    if entry is None:
        await st.io(lambda: owners.create(owner, None, None, sid))
    session_id_var.set(sid)
    return sid


# -- reconciliation -------------------------------------------------------------------------
@dataclass(frozen=True)
class Reconcile:
    """What to do before the turn: nothing, a regenerate, or rewind and add turns."""

    retry: bool = False
    rewind_to: int | None = None
    imports: tuple[MessageDict, ...] = ()


def _same(a: MessageDict, b: MessageDict) -> bool:
    return a["role"] == b["role"] and a["content"].strip() == b["content"].strip()


def reconcile(stored: Sequence[MessageDict], prior: Sequence[MessageDict], text: str, explicit: bool,
              whole: bool = False) -> Reconcile:
    """The rule of the module docstring; reads at most ``2 * len(prior) + 2`` stored messages.
    ``whole``: the client always sends the whole conversation (Open WebUI), so even a lone
    new message is the whole of it (an edit of the first message)."""
    n, size = len(stored), len(prior)
    if not explicit or (size == 0 and not whole):
        return Reconcile()  # a window (or only the new message): the durable history stands
    k = 0
    while k < min(n, size) and _same(stored[k], prior[k]):
        k += 1
    if k == size == n:
        return Reconcile()
    if 0 < size < n and all(_same(stored[n - size + i], prior[i]) for i in range(size)):
        return Reconcile()  # a trimmed tail ending where the history ends
    if (n >= 2 and stored[-1]["role"] == "assistant" and stored[-2]["role"] == "user"
            and stored[-2]["content"].strip() == text.strip() and size <= n - 2
            and all(_same(stored[n - 2 - size + i], prior[i]) for i in range(size))):
        return Reconcile(retry=True)  # the same question again, without the last reply: regenerate
    while 0 < k < size and prior[k]["role"] != "user":
        k -= 1  # a differing reply: its whole turn is replaced (the store keeps whole turns)
    imports = tuple(prior[k:])
    if imports:
        roles = [m["role"] for m in imports]
        if roles != ["user", "assistant"] * (len(roles) // 2):
            raise CompatError(400, "the conversation differs from the stored one and its differing messages do not "
                                   "alternate user, assistant: send whole turns", param="messages")
    return Reconcile(rewind_to=k if k < n else None, imports=imports)


# -- the turn ---------------------------------------------------------------------------------
@dataclass
class TurnEvent:
    """A piece of the reply (``text``), or the end (``result``, with ``stopped`` when a stop
    sequence ended it)."""

    text: str = ""
    result: ChatResult | None = None
    stopped: bool = False


@contextlib.contextmanager
def _request_settings(session: AsyncConversationSession, req: CompatRequest, cap: int) -> Any:
    """The request's sampling and system prompt, for this turn only (the session is held by
    this request alone; everything is restored after it)."""
    core = session._core  # the service owns this session object: per-turn settings live on its core
    saved = (core.max_tokens, core.temperature, core.sampling, core.conversation.system_prompt)
    try:
        if req.max_tokens is not None and req.max_tokens > 0:
            core.max_tokens = min(req.max_tokens, cap)
        if req.temperature is not None:
            core.temperature = float(req.temperature)
        if req.seed is not None:
            core.sampling = {**core.sampling, "seed": int(req.seed)}
        if req.system is not None and req.system.strip():
            core.conversation.system_prompt = req.system
        yield
    finally:
        core.max_tokens, core.temperature, core.sampling, core.conversation.system_prompt = saved


async def _apply(session: AsyncConversationSession, plan: Reconcile) -> None:
    if plan.rewind_to is not None:
        gone = await session.rewind_to(plan.rewind_to)
        logger.info("client's conversation differs: %d stored message(s) withdrawn (kept under 'undone')", gone)
    if plan.imports:
        try:
            await session.import_turns(list(plan.imports))
        except ValueError as exc:
            raise CompatError(400, str(exc), param="messages") from None


def _compared(stored: Sequence[MessageDict]) -> tuple[list[MessageDict], list[int]]:
    """The stored messages that take part in reconciliation (user messages, assistant replies
    with text) and their indexes (one pass over the history)."""
    index = [i for i, m in enumerate(stored) if m["role"] == "user" or
             (m["role"] == "assistant" and "tool_calls" not in m and m["content"].strip())]
    return [stored[i] for i in index], index


async def run_turn(st: Any, sid: str, req: CompatRequest) -> AsyncGenerator[TurnEvent, None]:
    """Hold session ``sid``, reconcile, run the turn: its pieces, then its result.  Closing
    the generator early (a client gone) cancels the turn; nothing of it is kept."""
    reg = await st.wait_ready()
    async with reg.hold(sid) as session:
        assert session is not None
        plan = Reconcile()
        stored = session._core.conversation.messages
        if req.results is None:
            plan = reconcile(stored, req.history, req.text, req.explicit is not None, req.whole)
        if plan != Reconcile() and any(m["role"] == "tool" for m in stored):
            # The client's view leaves the session's call messages out: compare without them
            # (only here, where the plain comparison found a difference, is the history scanned).
            shown, index = _compared(stored)
            plan = reconcile(shown, req.history, req.text, True, req.whole)
            if plan.rewind_to is not None:
                at = plan.rewind_to
                plan = Reconcile(retry=plan.retry, imports=plan.imports,
                                 rewind_to=index[at] if at < len(index) else len(session._core.conversation.messages))
        await _apply(session, plan)
        with _request_settings(session, req, st.config.max_tokens):
            if req.results is not None:
                try:
                    turn = session.stream_tool_results(req.results, client_tools=req.tools)
                    await turn.__aenter__()
                except (ValueError, SessionError) as exc:
                    raise CompatError(400, f"the tool results answer no pending call: {exc}",
                                      param="messages") from None
            elif plan.retry:
                turn = session.stream_retry(client_tools=req.tools)
            else:
                turn = session.stream(req.text, client_tools=req.tools)
            hold = max((len(s) for s in req.stop), default=1) - 1
            async with turn:
                full = ""
                sent = 0
                stopped_at: int | None = None
                async for piece in turn:
                    full += piece
                    found = [i for i in (full.find(s, max(sent - len(s), 0)) for s in req.stop if s) if i >= 0]
                    if found:
                        stopped_at = min(found)
                        if stopped_at > sent:
                            yield TurnEvent(text=full[sent:stopped_at])
                        break
                    upto = len(full) - hold
                    if upto > sent:
                        yield TurnEvent(text=full[sent:upto])
                        sent = upto
                if stopped_at is not None:
                    # What follows the stop sequence is not the reply: the stored reply is cut there
                    # too (as a barge-in would cut it).
                    result = await turn.interrupt(heard=full[:stopped_at])
                    yield TurnEvent(result=result, stopped=True)
                    return
                result = await turn.result()
                if len(result.response) > sent:
                    yield TurnEvent(text=result.response[sent:])
                yield TurnEvent(result=result)


async def finish(events: AsyncGenerator[TurnEvent, None]) -> None:
    """Let ``run_turn`` end by itself after its result: closing it instead would raise inside
    the session's hold, which then treats the request as failed and closes the session (its
    warm KV state with it)."""
    with contextlib.suppress(StopAsyncIteration):
        await events.__anext__()


async def collect(events: AsyncGenerator[TurnEvent, None]) -> tuple[str, ChatResult, bool]:
    """A whole turn (non-streaming answers)."""
    text = ""
    async for ev in events:
        text += ev.text
        if ev.result is not None:
            await finish(events)
            return text, ev.result, ev.stopped
    raise SessionError("internal: the turn ended without a result")


def durations(result: ChatResult) -> dict[str, int]:
    """Ollama's figures (nanoseconds; counts: ``prompt_eval_count`` is what was computed, the
    cached prefix left out, as Ollama reports it)."""
    total = int(result.total_s * 1e9)
    first = int((result.ttft_s or result.total_s) * 1e9)
    prompt = result.prompt_tokens or 0
    return {"total_duration": total, "load_duration": 0,
            "prompt_eval_count": max(prompt - (result.cached_tokens or 0), 0), "prompt_eval_duration": first,
            "eval_count": result.completion_tokens or 0, "eval_duration": max(total - first, 0)}


def now_rfc3339() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"



async def first_event(events: AsyncGenerator[TurnEvent, None], receive: Any) -> TurnEvent:
    """The turn's first event, while watching the client (headers go out only once the turn
    has started, so errors before it get a real status).  The generator is closed on failure."""
    try:
        ev: TurnEvent = await run_watched(events.__anext__(), receive)
        return ev
    except BaseException:
        with contextlib.suppress(BaseException):
            await events.aclose()
        raise


async def whole_turn(events: AsyncGenerator[TurnEvent, None], receive: Any) -> tuple[str, ChatResult, bool]:
    """The whole turn, cancelled (nothing kept) if the client goes away first."""
    try:
        out: tuple[str, ChatResult, bool] = await run_watched(collect(events), receive)
        return out
    finally:
        with contextlib.suppress(BaseException):
            await events.aclose()


class PathToken:
    """``/t/TOKEN/api/chat`` is ``/api/chat`` with ``Authorization: Bearer TOKEN``: for clients
    that take only a URL (Home Assistant's Ollama integration before it had an API-key field).
    The outermost layer, so nothing after it (the request log included) sees the token; a
    header the client sent wins over the path."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] in ("http", "websocket") else ""
        if path.startswith("/t/"):
            token, slash, rest = path[3:].partition("/")
            if token and slash:
                headers = list(scope.get("headers", []))
                if not any(k == b"authorization" for k, _ in headers):
                    # ``path`` is already percent-decoded once by the server: use the segment as is.
                    headers.append((b"authorization", b"Bearer " + token.encode("latin-1", "replace")))
                new_path = "/" + rest
                scope = {**scope, "path": new_path, "raw_path": new_path.encode(), "headers": headers}
        await self.app(scope, receive, send)
