"""Ollama's API on the service, driven by the official ``ollama`` client against a real
``serve`` process on loopback (the fake backend: "Reply N: <message>", one token per word,
a modelled prompt cache), and Home Assistant's request sequence replayed across a rollover and
a restart.  The durable history is read back through the native API (/v1/sessions)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from pg_server import pg_server, pg_url  # noqa: F401
from test_service import TOKEN_A, TOKEN_B, ServiceProcess, auth, service

SYSTEM = "You are a voice assistant for Home Assistant. Current time is 08:00."


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    base = tmp_path_factory.mktemp("ollama")
    with service(base / "s", "--token", TOKEN_A, "--token", TOKEN_B, "--rate", "1000", "--burst", "1000",
                 "--assistant", "kitchen",
                 "--assistant", "office") as srv:
        yield srv


def client(srv: ServiceProcess, token: str = TOKEN_A, **headers: str) -> ollama.Client:
    return ollama.Client(host=srv.url, headers={**auth(token), **headers})


def native(srv: ServiceProcess, token: str = TOKEN_A) -> httpx.Client:
    return httpx.Client(base_url=srv.url, headers=auth(token) if token else {}, timeout=30)


def sessions(srv: ServiceProcess, token: str = TOKEN_A) -> dict[str, dict[str, Any]]:
    with native(srv, token) as c:
        return {s["session_id"]: s for s in c.get("/v1/sessions").json()["sessions"]}


def history(srv: ServiceProcess, sid: str, token: str = TOKEN_A) -> list[dict[str, Any]]:
    with native(srv, token) as c:
        resp = c.get(f"/v1/sessions/{sid}")
        assert resp.status_code == 200, resp.text
        return list(resp.json()["history"])


def chat_sid(srv: ServiceProcess, body: dict[str, Any], token: str = TOKEN_A, **headers: str
             ) -> tuple[str, dict[str, Any]]:
    """One non-streaming /api/chat over raw HTTP: (the session it reached, the answer)."""
    with native(srv, token) as c:
        resp = c.post("/api/chat", json={"stream": False, **body}, headers=headers)
        assert resp.status_code == 200, resp.text
        return resp.headers["x-session-id"], resp.json()


def no_duplicates(messages: list[dict[str, Any]]) -> None:
    """Every turn once: the fake numbers its replies, so a repeated message is a duplicate."""
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(replies) == len(set(replies)), replies
    roles = [m["role"] for m in messages]
    assert roles == ["user", "assistant"] * (len(roles) // 2), roles


def test_model_endpoints(server: ServiceProcess) -> None:
    c = client(server)
    with native(server) as h:
        assert h.get("/api/version").json()["version"]
    names = [m.model for m in c.list().models]
    assert names == ["fake-model:latest", "kitchen:latest", "office:latest"]
    shown = c.show("kitchen")
    assert shown.details is not None and shown.details.family == "conversation-session"
    assert [m.model for m in c.ps().models] == names
    with pytest.raises(ollama.ResponseError) as err:
        c.show("llama3.2")
    assert err.value.status_code == 404
    assert [p.status for p in c.pull("kitchen", stream=True)][-1] == "success"
    assert c.pull("office:latest").status == "success"
    with pytest.raises(ollama.ResponseError) as err:
        c.pull("llama3.2")
    assert err.value.status_code == 404 and "not served here" in err.value.error and "kitchen" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client(server, "wrong-token").list()
    assert err.value.status_code == 401


def test_chat_streaming_and_not(server: ServiceProcess) -> None:
    c = client(server, **{"X-Session-Id": "stream-and-not"})
    whole = c.chat(model="kitchen", messages=[{"role": "user", "content": "hello there"}], stream=False,
                   options={"temperature": 0.2, "seed": 7, "num_ctx": 4096}, keep_alive="5m", think=False,
                   format="json")
    assert whole.done is True and whole.done_reason == "stop" and whole.message.role == "assistant"
    assert whole.message.content.endswith("hello there") and whole.created_at
    assert whole.eval_count == len(whole.message.content.split())
    assert whole.prompt_eval_count and whole.prompt_eval_count > 0
    assert whole.total_duration and whole.total_duration > 0 and whole.load_duration == 0
    assert whole.eval_duration is not None and whole.prompt_eval_duration is not None
    parts = list(c.chat(model="kitchen", stream=True, keep_alive=-1, messages=[
        {"role": "user", "content": "hello there"}, {"role": "assistant", "content": whole.message.content},
        {"role": "user", "content": "and again"}]))
    assert len(parts) > 2 and all(not p.done for p in parts[:-1]) and parts[-1].done
    final = parts[-1]
    text = "".join(p.message.content for p in parts)
    assert final.done_reason == "stop" and final.eval_count == len(text.split())
    assert text.endswith("and again")
    # The second request continued the warm session: only the new message was computed.
    assert final.prompt_eval_count is not None and 0 < final.prompt_eval_count < 10
    found = [s for s in sessions(server).values() if s["first_user_line"] == "hello there" and s["turns"] == 2]
    assert len(found) == 1
    stored = history(server, found[0]["session_id"])
    assert [m["content"] for m in stored] == ["hello there", whole.message.content, "and again", text]
    assert "stream-and-not" not in sessions(server)  # a client's own id names a session with an id of ours


def test_num_predict_and_stop(server: ServiceProcess) -> None:
    sid, body = chat_sid(server, {"model": "stops", "messages": [{"role": "user", "content": "one two three four"}],
                                  "options": {"num_predict": 2}})
    assert body["done_reason"] == "length" and body["eval_count"] == 2
    _, body = chat_sid(server, {"model": "stops", "messages": [{"role": "user", "content": "alpha beta STOP gamma"}],
                                "options": {"stop": ["STOP"]}})
    assert body["message"]["content"].endswith("alpha beta ") and "STOP" not in body["message"]["content"]
    assert history(server, sid)[-1]["content"] == body["message"]["content"]  # the stored reply is cut there too


def test_generate_is_not_stored(server: ServiceProcess) -> None:
    before = sessions(server)
    c = client(server)
    out = c.generate(model="kitchen", prompt="complete this", stream=False)
    assert out.done and "complete this" in out.response and out.eval_count
    streamed = list(c.generate(model="kitchen", prompt="and this", stream=True))
    assert streamed[-1].done and "".join(p.response for p in streamed).endswith("and this")
    assert c.generate(model="kitchen", prompt="").done_reason == "load"
    assert sessions(server) == before


def test_session_choice(server: ServiceProcess) -> None:
    kitchen, _ = chat_sid(server, {"model": "kitchen",
                                   "messages": [{"role": "user", "content": "I am in the kitchen"}]})
    office, _ = chat_sid(server, {"model": "office:latest", "messages": [{"role": "user", "content": "I am at work"}]})
    again, _ = chat_sid(server, {"model": "kitchen:latest", "messages": [{"role": "user", "content": "still here"}]})
    assert kitchen != office and again == kitchen
    assert [m["content"] for m in history(server, kitchen)][::2][-2:] == ["I am in the kitchen", "still here"]
    assert [m["content"] for m in history(server, office)][::2] == ["I am at work"]
    # Another token's "kitchen" is another memory.
    other, _ = chat_sid(server, {"model": "kitchen", "messages": [{"role": "user", "content": "hi"}]}, TOKEN_B)
    assert other != kitchen and other not in sessions(server) and other in sessions(server, TOKEN_B)
    # An explicit id wins over the model; Open WebUI's header works as well.
    by_id, _ = chat_sid(server, {"model": "kitchen", "messages": [{"role": "user", "content": "x"}]},
                        **{"X-Session-Id": "my-conversation"})
    by_webui, _ = chat_sid(server, {"model": "kitchen", "messages": [{"role": "user", "content": "y"}]},
                           **{"X-OpenWebUI-Chat-Id": "my-conversation"})
    assert by_id == by_webui and by_id not in (kitchen, office)
    # A native session's id reaches that session (the same session whichever surface).
    with native(server) as h:
        sid = h.post("/v1/sessions").json()["session_id"]
        assert h.post(f"/v1/sessions/{sid}/messages", json={"text": "native first"}).status_code == 200
    reached, _ = chat_sid(server, {"model": "kitchen", "messages": [{"role": "user", "content": "ollama second"}]},
                          **{"X-Session-Id": sid})
    assert reached == sid
    assert [m["content"] for m in history(server, sid)][::2] == ["native first", "ollama second"]
    # ...but not another token's session: the id then names a new one of this token's.
    stolen, _ = chat_sid(server, {"model": "kitchen", "messages": [{"role": "user", "content": "hi"}]}, TOKEN_B,
                         **{"X-Session-Id": sid})
    assert stolen != sid and len(history(server, sid)) == 4
    assert {kitchen, office, by_id, sid} <= set(sessions(server))


def test_window_reconciliation_without_an_id(server: ServiceProcess) -> None:
    """Home Assistant's shape: no id, the history trimmed, then a rollover to only the system
    prompt and the new message; a repeated short answer is a new message each time."""
    model = "window"
    sent: list[dict[str, str]] = []

    def say(text: str, window: int | None = None) -> tuple[str, dict[str, Any]]:
        sent.append({"role": "user", "content": text})
        shown = sent if window is None else sent[-window:]
        sid, body = chat_sid(server, {"model": model, "messages": [{"role": "system", "content": SYSTEM}, *shown]})
        sent.append(body["message"])
        return sid, body

    sid, _ = say("my name is Ada")
    say("I like tea")
    say("yes")
    say("yes", window=3)                 # trimmed tail (max_history)
    sent.clear()
    _, last = say("what is my name?")    # rollover: system prompt and the new message only
    stored = history(server, sid)
    assert [m["content"] for m in stored][::2] == ["my name is Ada", "I like tea", "yes", "yes", "what is my name?"]
    no_duplicates(stored)
    assert last["message"]["content"].endswith("what is my name?")
    # The model's prompt was the durable history: the OpenAI surface reaches the same session
    # (same model name, same token) and reports the whole prompt's size.
    with native(server) as h:
        usage = h.post("/v1/chat/completions", json={"model": model, "messages": [
            {"role": "user", "content": "one more"}]}).json()["usage"]
    words = sum(len(m["content"].split()) + 1 for m in stored)
    assert usage["prompt_tokens"] > words
    assert len(history(server, sid)) == 12


def _export(srv: ServiceProcess, sid: str) -> dict[str, Any]:
    with native(srv) as h:
        data: dict[str, Any] = h.get(f"/v1/sessions/{sid}/export").json()
        return data


def test_explicit_id_reconciliation(server: ServiceProcess) -> None:
    """Open WebUI's shape: the whole conversation each time, with regenerate and edit."""
    headers = {"X-OpenWebUI-Chat-Id": "webui-chat-1"}
    convo: list[dict[str, str]] = [{"role": "system", "content": "Be brief."}]

    def send(messages: list[dict[str, str]]) -> tuple[str, str]:
        sid, body = chat_sid(server, {"model": "kitchen", "messages": messages}, **headers)
        return sid, str(body["message"]["content"])

    convo.append({"role": "user", "content": "first question"})
    sid, a1 = send(convo)
    convo.append({"role": "assistant", "content": a1})
    convo.append({"role": "user", "content": "second question"})
    _, a2 = send(convo)
    assert [m["content"] for m in history(server, sid)] == ["first question", a1, "second question", a2]
    # Regenerate: the same messages again, without the last reply.
    _, a2b = send(convo)
    assert a2b != a2
    assert [m["content"] for m in history(server, sid)] == ["first question", a1, "second question", a2b]
    assert a2 in json.dumps(_export(server, sid)["undone"])  # withdrawn through the undo record, not lost
    # Edit the first question: everything after it is withdrawn, then the new turn.
    _, e1 = send([convo[0], {"role": "user", "content": "first question, edited"}])
    assert [m["content"] for m in history(server, sid)] == ["first question, edited", e1]
    # An edited reply the client holds becomes the stored one, then the new turn follows.
    _, n2 = send([convo[0], {"role": "user", "content": "first question, edited"},
                  {"role": "assistant", "content": "my own better answer"}, {"role": "user", "content": "next"}])
    stored = history(server, sid)
    assert [m["content"] for m in stored] == ["first question, edited", "my own better answer", "next", n2]
    # A client that trims (only the last turn and the new message) continues: nothing withdrawn.
    undone = len(_export(server, sid)["undone"])
    _, n3 = send([{"role": "user", "content": "next"}, {"role": "assistant", "content": n2},
                  {"role": "user", "content": "third"}])
    stored = history(server, sid)
    assert [m["content"] for m in stored][-2:] == ["third", n3] and len(stored) == 6
    assert len(_export(server, sid)["undone"]) == undone
    no_duplicates(stored)


def test_bad_requests_say_what_is_wrong(server: ServiceProcess) -> None:
    with native(server) as h:
        resp = h.post("/api/chat", json={"model": "kitchen", "stream": False,
                                         "messages": [{"role": "assistant", "content": "hi"}]})
        assert resp.status_code == 400 and "last message must be the user's" in resp.json()["error"]
        resp = h.post("/api/chat", json={"messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 400 and '"model"' in resp.json()["error"]
        resp = h.post("/api/chat", json={"model": "kitchen", "messages": [], "stream": False})
        assert resp.status_code == 200 and resp.json()["done_reason"] == "load"
        resp = h.post("/api/chat", content=b'{"model": "x"}', headers={"Content-Type": "text/plain"})
        assert resp.status_code == 415  # the guard still stands in front of every route
        nan = (b'{"model": "kitchen", "stream": false, "options": {"num_predict": Infinity},'
               b' "messages": [{"role": "user", "content": "hi"}]}')
        resp = h.post("/api/chat", content=nan, headers={"Content-Type": "application/json"})
        assert resp.status_code == 400 and "not JSON" in resp.json()["error"]  # not a 500
        resp = h.post("/api/generate", json={"model": "kitchen", "prompt": "hi", "stream": False,
                                             "options": {"temperature": None}})
        assert resp.status_code == 200 and resp.json()["done"] is True  # null: the default


def test_token_in_the_path(server: ServiceProcess) -> None:
    c = ollama.Client(host=f"{server.url}/t/{TOKEN_B}")
    assert "kitchen:latest" in [m.model for m in c.list().models]
    reply = c.chat(model="path-token", messages=[{"role": "user", "content": "via the path"}], stream=False)
    assert reply.message.content.endswith("via the path")
    assert any(s["first_user_line"] == "via the path" for s in sessions(server, TOKEN_B).values())
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=f"{server.url}/t/not-a-token").list()
    assert err.value.status_code == 401
    log = server.log_path.read_text()
    assert TOKEN_B not in log and "not-a-token" not in log and "/api/tags" in log


def test_a_request_waits_for_the_model_to_load(tmp_path: Path) -> None:
    srv = ServiceProcess(tmp_path / "s", "--fake-load-delay", "4", wait=False)
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as h:
            for _ in range(200):
                try:
                    h.get("/healthz")
                    break
                except httpx.HTTPError:
                    time.sleep(0.05)
            assert h.get("/readyz").status_code == 503  # still loading
            sid = h.post("/v1/sessions").json()["session_id"]
        reply = ollama.Client(host=srv.url).chat(model="m", messages=[{"role": "user", "content": "early"}])
        assert reply.message.content.endswith("early")
        with httpx.Client(base_url=srv.url, timeout=30) as h:
            assert h.post(f"/v1/sessions/{sid}/messages", json={"text": "native"}).status_code == 200
    finally:
        srv.stop()


def test_kill_9_between_requests(tmp_path: Path) -> None:
    first = ServiceProcess(tmp_path / "s")
    try:
        c = ollama.Client(host=first.url)
        a1 = c.chat(model="durable", messages=[{"role": "user", "content": "remember 42"}]).message.content
        c.chat(model="durable", messages=[{"role": "user", "content": "remember 42"},
                                          {"role": "assistant", "content": a1}, {"role": "user", "content": "ok"}])
    finally:
        first.kill9()
        first.stop()
    with service(tmp_path / "s") as second:
        reply = ollama.Client(host=second.url).chat(model="durable", messages=[
            {"role": "user", "content": "what number?"}])
        sid = next(iter(sessions(second, "")))
        stored = history(second, sid, "")
        assert [m["content"] for m in stored][::2] == ["remember 42", "ok", "what number?"]
        assert stored[-1]["content"] == reply.message.content
        # The whole durable history went into the prompt (no cache after a restart: all computed).
        assert reply.prompt_eval_count is not None and reply.prompt_eval_count > sum(
            len(m["content"].split()) for m in stored[:-1])


HA_TOOLS = [{"type": "function", "function": {
    "name": "HassTurnOn", "description": "Turns on/opens a device or entity",
    "parameters": {"type": "object", "properties": {"name": {"type": "string"}, "area": {"type": "string"}}}}}]


async def _ha_request(host: str, messages: list[dict[str, Any]]) -> tuple[str, Any]:
    """What Home Assistant's Ollama entity sends (entity.py ``_async_handle_chat_log``): the
    system prompt first, the history trimmed to ``max_history`` rounds, ``tools``, streaming,
    ``keep_alive`` (-1: forever), ``options.num_ctx``, ``think``/``format`` None."""
    client = ollama.AsyncClient(host=host)
    stream = await client.chat(model="kitchen:latest", messages=messages, tools=HA_TOOLS, stream=True, keep_alive=-1,
                               options={"num_ctx": 8192}, think=None, format=None)
    text, last = "", None
    async for part in stream:
        text += part.message.content or ""
        last = part
    return text, last


def _ha_messages(time_of_day: str, rounds: list[tuple[str, str]], new: str, max_history: int = 2) -> list[Any]:
    msgs: list[dict[str, str]] = [{"role": "system", "content": f"You are a voice assistant. Time: {time_of_day}."}]
    for user, assistant in rounds[-max_history:] if max_history else rounds:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return [*msgs, {"role": "user", "content": new}]


def test_home_assistant_sequence_across_a_rollover_and_a_restart(tmp_path: Path) -> None:
    rounds: list[tuple[str, str]] = []
    with service(tmp_path / "s", "--assistant", "kitchen") as srv:
        # Setting up the integration: the models, then a pull of the chosen one.
        c = ollama.Client(host=srv.url)
        assert "kitchen:latest" in [m.model for m in c.list().models]
        assert [p.status for p in c.pull("kitchen:latest", stream=True)][-1] == "success"
        for i, said in enumerate(["my name is Ada", "turn on the kitchen light", "I like green tea"]):
            reply, last = asyncio.run(_ha_request(srv.url, _ha_messages(f"08:0{i}", rounds, said)))
            assert last.done and last.done_reason == "stop" and reply.endswith(said)
            rounds.append((said, reply))
        # Five minutes later Home Assistant starts a new conversation: only the system prompt.
        rounds.clear()
        reply, _ = asyncio.run(_ha_request(srv.url, _ha_messages("08:10", rounds, "what is my name?")))
        rounds.append(("what is my name?", reply))
        sid = next(iter(sessions(srv, "")))
    with service(tmp_path / "s", "--assistant", "kitchen") as srv:
        reply, last = asyncio.run(_ha_request(srv.url, _ha_messages("09:00", rounds, "and what do I drink?")))
        stored = history(srv, sid, "")
        assert [m["content"] for m in stored][::2] == ["my name is Ada", "turn on the kitchen light",
                                                       "I like green tea", "what is my name?",
                                                       "and what do I drink?"]
        no_duplicates(stored)
        # The assistant still has what was said before: every earlier word was in the prompt.
        assert last.prompt_eval_count > sum(len(m["content"].split()) for m in stored[:-1])
        assert len(sessions(srv, "")) == 1


# -- the rule itself (no server) ------------------------------------------------------------------
class _Counted(list):  # type: ignore[type-arg]
    """A stored history that counts how many of its messages are read."""

    reads = 0

    def __getitem__(self, index: Any) -> Any:
        type(self).reads += 1
        return super().__getitem__(index)


def _turns(n: int) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        out += [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}]
    return out


def test_reconciliation_reads_only_as_many_messages_as_the_client_sent() -> None:
    from conversation_session.service._compat import reconcile

    stored = _Counted(_turns(5000))
    window = _turns(5000)[-4:]
    for explicit in (False, True):
        _Counted.reads = 0
        assert reconcile(stored, window, "new", explicit).rewind_to is None
        assert _Counted.reads <= 2 * len(window) + 2
    _Counted.reads = 0
    assert reconcile(stored, _turns(5000)[-4:-2], "u4999", True).retry  # a regenerate, found from the end
    assert _Counted.reads <= 2 * 2 + 2 + 4


def test_reconciliation_rule_cases() -> None:
    from conversation_session.service._compat import CompatError, reconcile

    stored = _turns(3)  # u0 a0 u1 a1 u2 a2
    # No explicit id: never rewinds, whatever the window holds.
    assert reconcile(stored, _turns(1), "x", explicit=False) == reconcile(stored, [], "x", explicit=False)
    assert reconcile(stored, [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}], "x",
                     explicit=False).rewind_to is None
    # Explicit: the whole conversation, a trimmed tail, only the new message: continuations.
    for prior in (stored, stored[-2:], []):
        plan = reconcile(stored, prior, "next", explicit=True)
        assert plan.rewind_to is None and not plan.retry and not plan.imports
    # Regenerate: without the last reply, the same question (also from a trimmed client).
    assert reconcile(stored, stored[:4], "u2", explicit=True).retry
    assert reconcile(stored, stored[2:4], "u2", explicit=True).retry
    # Edit of the last question, of an earlier one, of a reply.
    assert reconcile(stored, stored[:4], "u2 edited", explicit=True).rewind_to == 4
    assert reconcile(stored, stored[:2], "u1 edited", explicit=True).rewind_to == 2
    edited_reply = [*stored[:3], {"role": "assistant", "content": "a1 better"}]
    plan = reconcile(stored, edited_reply, "u2", explicit=True)
    assert plan.rewind_to == 2 and [m["content"] for m in plan.imports] == ["u1", "a1 better"]
    # Open WebUI always sends everything: a lone message is an edit of the first one.
    assert reconcile(stored, [], "u0 edited", explicit=True, whole=True).rewind_to == 0
    assert reconcile(stored[:2], [], "u0", explicit=True, whole=True).retry
    # A client holding turns the session lacks: they are added before the turn.
    plan = reconcile(stored[:2], stored, "u3", explicit=True)
    assert plan.rewind_to is None and plan.imports == tuple(stored[2:])
    with pytest.raises(CompatError):
        reconcile(stored, [*stored[:2], {"role": "user", "content": "dangling"}], "u9", explicit=True)


def test_two_workers_on_postgresql(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    """Both workers derive the same session from the model name (the first to create it wins
    the row); the conversation is one, whichever worker answers."""
    with service(tmp_path / "s", "--store", pg_url, "--workers", "2", "--keep-open", "0") as srv:
        said: list[str] = []
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two first requests at once
            list(pool.map(lambda t: chat_sid(srv, {"model": "shared", "messages": [
                {"role": "user", "content": t}]}, ""), ["first a", "first b"]))
        said += ["first a", "first b"]
        for i in range(4):
            said.append(f"then {i}")
            chat_sid(srv, {"model": "shared:latest", "messages": [{"role": "user", "content": said[-1]}]}, "")
        listed = sessions(srv, "")
        assert len(listed) == 1
        stored = history(srv, next(iter(listed)), "")
        assert sorted(m["content"] for m in stored[::2]) == sorted(said) and stored[4::2] == [
            {"role": "user", "content": f"then {i}"} for i in range(4)]
        no_duplicates(stored)
