"""Tool calls passing through the Ollama and OpenAI surfaces (docs/compat.md): the client's
tools are offered, a call the model makes comes back in the API's own shape and is stored as a
pending call, the client's result on the next request completes it, and the model continues.

Driven by the official ``ollama`` and ``openai`` clients against a real ``serve --backend fake``
process, whose testing convention makes the model !call  a user message of lines
``!call NAME {json-args}`` asks for those calls of offered tools; after results it answers
``Done: NAME → RESULT.``.  The durable history is read back through the native API."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from conversation_session import AsyncConversationSession, ConversationSession, FakeBackend, ToolCalls
from conversation_session.tools import NO_CLIENT_RESULT, UNKNOWN_OUTCOME
from pg_server import pg_server, pg_url  # noqa: F401
from test_service import TOKEN_A, ServiceProcess, auth, service

LIGHT = {"type": "function", "function": {
    "name": "HassTurnOn", "description": "Turns on/opens a device or entity",
    "parameters": {"type": "object", "properties": {"name": {"type": "string"}, "area": {"type": "string"}}}}}
TIMER = {"type": "function", "function": {
    "name": "HassStartTimer", "description": "Starts a timer",
    "parameters": {"type": "object", "properties": {"minutes": {"type": "integer"}}}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    base = tmp_path_factory.mktemp("tools")
    with service(base / "s", "--token", TOKEN_A, "--rate", "1000", "--burst", "1000") as srv:
        yield srv


def history(srv: ServiceProcess, sid: str, token: str | None = TOKEN_A) -> list[dict[str, Any]]:
    with httpx.Client(base_url=srv.url, headers=auth(token) if token else {}, timeout=30) as c:
        resp = c.get(f"/v1/sessions/{sid}")
        assert resp.status_code == 200, resp.text
        return list(resp.json()["history"])


def one_call_one_result(stored: list[dict[str, Any]]) -> None:
    """Every call of the history answered exactly once, and no result without its call."""
    calls = [c["id"] for m in stored if m["role"] == "assistant" for c in m.get("tool_calls", [])]
    results = [m["tool_call_id"] for m in stored if m["role"] == "tool"]
    assert len(calls) == len(set(calls)) and sorted(calls) == sorted(results), stored


# -- Ollama ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_ollama_call_round_trip(server: ServiceProcess, stream: bool) -> None:
    c = ollama.Client(host=server.url, headers={**auth(TOKEN_A), "X-Session-Id": f"ollama-tools-{stream}"})
    ask = '!call HassTurnOn {"name": "kitchen light"}'
    messages: list[dict[str, Any]] = [{"role": "user", "content": ask}]
    if stream:
        parts = list(c.chat(model="fake-model", messages=messages, tools=[LIGHT], stream=True))
        calls = [tc for p in parts for tc in (p.message.tool_calls or [])]
        last = parts[-1]
    else:
        last = c.chat(model="fake-model", messages=messages, tools=[LIGHT])
        calls = list(last.message.tool_calls or [])
    assert last.done and last.done_reason == "stop"
    assert [(tc.function.name, dict(tc.function.arguments)) for tc in calls] == [
        ("HassTurnOn", {"name": "kitchen light"})]
    # What the client sends back: its call request, then the result (the Ollama API has no ids).
    messages += [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}}]},
        {"role": "tool", "content": "the kitchen light is on"}]
    if stream:
        reply = "".join(p.message.content or "" for p in c.chat(model="fake-model", messages=messages,
                                                                 tools=[LIGHT], stream=True))
    else:
        reply = c.chat(model="fake-model", messages=messages, tools=[LIGHT]).message.content or ""
    assert reply.endswith("HassTurnOn → the kitchen light is on.")
    with httpx.Client(base_url=server.url, headers=auth(TOKEN_A), timeout=30) as h:
        sid = h.post("/api/chat", json={"model": "fake-model", "stream": False, "messages": [
            *messages, {"role": "assistant", "content": reply}, {"role": "user", "content": "thanks"}]},
            headers={"X-Session-Id": f"ollama-tools-{stream}"}).headers["x-session-id"]
    stored = history(server, sid)
    assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant", "user", "assistant"]
    assert stored[1]["tool_calls"][0]["function"] == {"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}
    assert stored[1]["tool_calls"][0]["client"] is True
    assert stored[2]["content"] == "the kitchen light is on" and stored[3]["content"] == reply
    one_call_one_result(stored)


def test_home_assistant_results_without_ids_are_matched_in_order(server: ServiceProcess) -> None:
    """Home Assistant's Ollama integration: no session id (one memory per model), a system
    prompt rebuilt each time, two calls in one round, results sent without ids."""
    async def run() -> tuple[Any, Any, str]:
        c = ollama.AsyncClient(host=server.url, headers=auth(TOKEN_A))
        ask = '!call HassTurnOn {"name": "hall"}\n!call HassStartTimer {"minutes": 5}'
        msgs: list[dict[str, Any]] = [{"role": "system", "content": "You are a voice assistant. Time: 08:00."},
                                      {"role": "user", "content": ask}]
        first = [p async for p in await c.chat(model="ha-tools", messages=msgs, tools=[LIGHT, TIMER],
                                               stream=True, keep_alive=-1, options={"num_ctx": 8192})]
        calls = [tc for p in first for tc in (p.message.tool_calls or [])]
        msgs[0] = {"role": "system", "content": "You are a voice assistant. Time: 08:01."}
        msgs += [{"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": tc.function.name, "arguments": dict(tc.function.arguments)}} for tc in calls]},
            {"role": "tool", "content": "hall light on"}, {"role": "tool", "content": "timer set for 5 minutes"}]
        second = [p async for p in await c.chat(model="ha-tools", messages=msgs, tools=[LIGHT, TIMER],
                                                stream=True, keep_alive=-1, options={"num_ctx": 8192})]
        return calls, second[-1], "".join(p.message.content or "" for p in second)

    calls, last, reply = asyncio.run(run())
    assert [tc.function.name for tc in calls] == ["HassTurnOn", "HassStartTimer"]
    assert last.done and last.done_reason == "stop"
    assert reply.endswith("HassTurnOn → hall light on; HassStartTimer → timer set for 5 minutes.")
    with httpx.Client(base_url=server.url, headers=auth(TOKEN_A), timeout=30) as h:
        sid = h.post("/api/chat", json={"model": "ha-tools", "stream": False,
                                         "messages": [{"role": "user", "content": "hi"}]}).headers["x-session-id"]
    stored = history(server, sid)
    assert [m["role"] for m in stored[:4]] == ["user", "assistant", "tool", "tool"]
    ids = [c["id"] for c in stored[1]["tool_calls"]]
    assert [(m["tool_call_id"], m["content"]) for m in stored[2:4]] == [
        (ids[0], "hall light on"), (ids[1], "timer set for 5 minutes")]
    one_call_one_result(stored)


# -- OpenAI ---------------------------------------------------------------------------------------
def _openai(srv: ServiceProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=TOKEN_A)


def test_openai_call_round_trip(server: ServiceProcess) -> None:
    c = _openai(server)
    messages: list[Any] = [{"role": "user", "content": '!call HassStartTimer {"minutes": 3}'}]
    first = c.chat.completions.create(model="fake-model", messages=messages, tools=[TIMER], user="oa-plain")
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "HassStartTimer"
    assert json.loads(call.function.arguments) == {"minutes": 3}
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "timer started"}]
    second = c.chat.completions.create(model="fake-model", messages=messages, tools=[TIMER], user="oa-plain")
    assert second.choices[0].finish_reason == "stop"
    assert (second.choices[0].message.content or "").endswith("HassStartTimer → timer started.")
    raw = c.chat.completions.with_raw_response.create(
        model="fake-model", user="oa-plain",
        messages=[*messages, {"role": "assistant", "content": second.choices[0].message.content},
                  {"role": "user", "content": "and now?"}])
    stored = history(server, raw.headers["x-session-id"])
    assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant", "user", "assistant"]
    assert stored[1]["tool_calls"][0]["id"] == call.id and stored[2]["tool_call_id"] == call.id
    one_call_one_result(stored)


def test_openai_streamed_tool_call_deltas(server: ServiceProcess) -> None:
    c = _openai(server)
    messages: list[Any] = [{"role": "user", "content": '!call HassTurnOn {"area": "office"}'}]
    ids: dict[int, str] = {}
    names: dict[int, str] = {}
    args: dict[int, str] = {}
    finish = None
    for chunk in c.chat.completions.create(model="fake-model", messages=messages, tools=[LIGHT],
                                           user="oa-stream", stream=True):
        for ch in chunk.choices:
            for d in ch.delta.tool_calls or []:
                if d.id:
                    ids[d.index] = d.id
                if d.function and d.function.name:
                    names[d.index] = d.function.name
                args[d.index] = args.get(d.index, "") + (d.function.arguments or "" if d.function else "")
            finish = ch.finish_reason or finish
    assert finish == "tool_calls" and names == {0: "HassTurnOn"} and json.loads(args[0]) == {"area": "office"}
    messages += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": ids[0], "type": "function", "function": {"name": "HassTurnOn", "arguments": args[0]}}]},
        {"role": "tool", "tool_call_id": ids[0], "content": "office light on"}]
    text = ""
    for chunk in c.chat.completions.create(model="fake-model", messages=messages, tools=[LIGHT],
                                           user="oa-stream", stream=True):
        for ch in chunk.choices:
            text += ch.delta.content or ""
    assert text.endswith("HassTurnOn → office light on.")


def test_a_result_for_no_pending_call_is_refused(server: ServiceProcess) -> None:
    c = _openai(server)
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="fake-model", user="oa-none", messages=[
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_x", "type": "function", "function": {"name": "HassTurnOn", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_x", "content": "done"}])
    assert "call_x" in str(err.value)


def test_tool_choice_none_offers_nothing(server: ServiceProcess) -> None:
    out = _openai(server).chat.completions.create(
        model="fake-model", user="oa-choice", tools=[LIGHT], tool_choice="none",
        messages=[{"role": "user", "content": "!call HassTurnOn {}"}])
    assert out.choices[0].finish_reason == "stop" and not out.choices[0].message.tool_calls


# -- across a kill -9 -------------------------------------------------------------------------------
def test_kill_9_between_the_call_and_its_result(tmp_path: Path) -> None:
    first = ServiceProcess(tmp_path / "s")
    messages: list[dict[str, Any]] = [{"role": "user", "content": '!call HassTurnOn {"name": "porch"}'}]
    try:
        out = ollama.Client(host=first.url).chat(model="porch", messages=messages, tools=[LIGHT])
        assert [tc.function.name for tc in out.message.tool_calls or []] == ["HassTurnOn"]
    finally:
        first.kill9()
        first.stop()
    with service(tmp_path / "s") as second:
        messages += [{"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "HassTurnOn", "arguments": {"name": "porch"}}}]},
            {"role": "tool", "content": "porch light on"}]
        reply = ollama.Client(host=second.url).chat(model="porch", messages=messages, tools=[LIGHT])
        assert (reply.message.content or "").endswith("HassTurnOn → porch light on.")
        with httpx.Client(base_url=second.url, timeout=30) as h:
            [sid] = [s["session_id"] for s in h.get("/v1/sessions").json()["sessions"]]
        stored = history(second, sid, None)
    # The pending call survived the restart as the client's (not repaired as of unknown outcome).
    assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant"]
    assert stored[2]["content"] == "porch light on" and UNKNOWN_OUTCOME not in json.dumps(stored)
    one_call_one_result(stored)


# -- the library entry points ---------------------------------------------------------------------
def test_library_client_tools_pending_then_results_or_a_new_message(tmp_path: Path) -> None:
    async def run() -> None:
        fake = FakeBackend()
        fake.enqueue(ToolCalls([("HassTurnOn", {"name": "a"}), ("HassTurnOn", {"name": "b"})]))
        fake.enqueue("both on")
        fake.enqueue(ToolCalls([("HassTurnOn", {"name": "c"})]))
        async with AsyncConversationSession(backend=fake, sessions_dir=tmp_path) as s:
            async with s.stream("lights", client_tools=[LIGHT]) as turn:
                assert [p async for p in turn] == []
                r = await turn.result()
            assert r.finish_reason == "tool_calls" and [c["client"] for c in r.tool_calls] == [True, True]
            assert fake.requests[0].tools == [LIGHT]
            sid = s.session_id
        # A restart: the client's calls are pending, not repaired.
        async with AsyncConversationSession(backend=fake, sessions_dir=tmp_path) as s:
            await s.load_history(sid)
            assert [m["role"] for m in s.history] == ["user", "assistant"]
            with pytest.raises(ValueError, match="more results than calls"):
                async with s.stream_tool_results([{"content": "1"}, {"content": "2"}, {"content": "3"}]):
                    pass
            assert [m["role"] for m in s.history] == ["user", "assistant"]  # nothing recorded
            ids = [c["id"] for c in s.history[1]["tool_calls"]]
            # By id, out of order: each result goes to its call.
            async with s.stream_tool_results([{"content": "B", "tool_call_id": ids[1]},
                                              {"content": "A", "tool_call_id": ids[0]}]) as turn:
                assert "".join([p async for p in turn]) == "both on"
            assert [(m["tool_call_id"], m["content"]) for m in s.history[2:4]] == [(ids[0], "A"), (ids[1], "B")]
            # A new message instead of the result: the pending call gets NO_CLIENT_RESULT first.
            async with s.stream("lights again", client_tools=[LIGHT]) as turn:
                await turn.result()
            assert s.history[-1]["tool_calls"][0]["client"] is True
            await s.chat("never mind")
            assert [m["role"] for m in s.history[-5:]] == ["user", "assistant", "tool", "user", "assistant"]
            assert s.history[-3]["content"] == NO_CLIENT_RESULT
            one_call_one_result(s.history)  # type: ignore[arg-type]
    asyncio.run(run())


@pytest.mark.parametrize("where", ["file", "postgresql"])
def test_sync_session_pending_call_survives_reopening(tmp_path: Path, where: str,
                                                     request: pytest.FixtureRequest) -> None:
    """The ``"client": true`` mark is part of the stored call on both stores: reopened, the
    call is still pending (not repaired), and the client's result completes it."""
    store: Any = {"sessions_dir": tmp_path} if where == "file" else {"store": request.getfixturevalue("pg_url")}
    fake = FakeBackend()
    fake.enqueue(ToolCalls([("HassStartTimer", {"minutes": 1})], text="Starting it."))
    fake.enqueue("Timer running.")
    with ConversationSession(backend=fake, **store) as s:
        with s.stream("a timer", client_tools=[TIMER]) as turn:
            assert "".join(turn) == "Starting it."
            r = turn.result()
        assert r.response == "Starting it." and r.finish_reason == "tool_calls"
        sid = s.session_id
    with ConversationSession(backend=fake, **store) as s:
        s.load_history(sid)
        assert s.history[-1]["tool_calls"][0]["client"] is True  # still pending after reopening
        with s.stream_tool_results([{"content": "started"}], client_tools=[TIMER]) as turn:
            assert "".join(turn) == "Timer running."
    with ConversationSession(backend=fake, **store) as s:
        s.load_history(sid)
        assert [(m["role"], m["content"]) for m in s.history] == [
            ("user", "a timer"), ("assistant", "Starting it."), ("tool", "started"), ("assistant", "Timer running.")]
        assert s.turns == 1
        one_call_one_result(s.history)  # type: ignore[arg-type]


def test_the_continuation_may_call_the_clients_tools_again(tmp_path: Path) -> None:
    fake = FakeBackend()
    fake.enqueue(ToolCalls([("HassTurnOn", {"name": "a"})]))
    fake.enqueue(ToolCalls([("HassStartTimer", {"minutes": 2})]))
    fake.enqueue("All set.")
    with ConversationSession(backend=fake, sessions_dir=tmp_path) as s:
        with s.stream("light then timer", client_tools=[LIGHT, TIMER]) as turn:
            assert turn.result().finish_reason == "tool_calls"
        with s.stream_tool_results([{"content": "on"}], client_tools=[LIGHT, TIMER]) as turn:
            r = turn.result()
        assert r.finish_reason == "tool_calls" and [c["name"] for c in r.tool_calls] == ["HassStartTimer"]
        # The second request to the model had the first call and its result in its prompt.
        assert [m["role"] for m in fake.requests[1].messages] == ["user", "assistant", "tool"]
        with s.stream_tool_results([{"content": "timer set"}], client_tools=[LIGHT, TIMER]) as turn:
            assert turn.result().response == "All set."
        assert [m["role"] for m in s.history] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
        assert s.turns == 1
        one_call_one_result(s.history)  # type: ignore[arg-type]


def test_an_edit_after_a_tool_turn_rewinds_to_the_right_stored_message(server: ServiceProcess) -> None:
    """With an explicit id the client's messages are the whole conversation; the stored call and
    result are not in the client's comparison, so the rewind point is mapped past them."""
    c = _openai(server)
    msgs: list[Any] = [{"role": "user", "content": "!call HassTurnOn {}"}]
    first = c.chat.completions.create(model="fake-model", user="oa-edit", messages=msgs, tools=[LIGHT])
    [call] = first.choices[0].message.tool_calls or []
    msgs += [first.choices[0].message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": "on"}]
    a1 = c.chat.completions.create(model="fake-model", user="oa-edit", messages=msgs, tools=[LIGHT])
    msgs += [{"role": "assistant", "content": a1.choices[0].message.content}]
    c.chat.completions.create(model="fake-model", user="oa-edit",
                              messages=[*msgs, {"role": "user", "content": "hello"}])
    raw = c.chat.completions.with_raw_response.create(
        model="fake-model", user="oa-edit", messages=[*msgs, {"role": "user", "content": "hi instead"}])
    stored = history(server, raw.headers["x-session-id"])
    assert [(m["role"], m["content"]) for m in stored][2:] == [
        ("tool", "on"), ("assistant", a1.choices[0].message.content), ("user", "hi instead"),
        ("assistant", raw.parse().choices[0].message.content)]
    one_call_one_result(stored)
