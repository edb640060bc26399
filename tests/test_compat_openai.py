"""OpenAI's chat completions API on the service, driven by the official ``openai`` client
against a real ``serve`` process on loopback (the fake backend: "Reply N: <message>", one token
per word, a modelled prompt cache), and once on the embedded model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from test_service import TOKEN_A, TOKEN_B, ServiceProcess, auth, service, wait_for


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    base = tmp_path_factory.mktemp("openai")
    with service(base / "s", "--token", TOKEN_A, "--token", TOKEN_B, "--rate", "1000", "--burst", "1000",
                 "--assistant", "kitchen") as srv:
        yield srv


def client(srv: ServiceProcess, token: str = TOKEN_A, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=token, default_headers=headers or None, max_retries=0)


def native(srv: ServiceProcess, token: str = TOKEN_A) -> httpx.Client:
    return httpx.Client(base_url=srv.url, headers=auth(token), timeout=30)


def history(srv: ServiceProcess, sid: str, token: str = TOKEN_A) -> list[dict[str, Any]]:
    with native(srv, token) as c:
        resp = c.get(f"/v1/sessions/{sid}")
        assert resp.status_code == 200, resp.text
        return list(resp.json()["history"])


def test_models(server: ServiceProcess) -> None:
    ids = [m.id for m in client(server).models.list()]
    assert ids == ["fake-model", "kitchen"]
    with pytest.raises(openai.AuthenticationError) as err:
        client(server, "wrong").models.list()
    assert err.value.status_code == 401
    body = err.value.body
    assert isinstance(body, dict) and body["type"] == "authentication_error" and "param" in body and "code" in body


def test_completion_not_streaming(server: ServiceProcess) -> None:
    c = client(server)
    raw = c.chat.completions.with_raw_response.create(
        model="kitchen", user="plain-user",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}],
        temperature=0.3, seed=11, max_tokens=50)
    sid = raw.headers["x-session-id"]
    first = raw.parse()
    choice = first.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == "Reply 1: hello there"
    assert choice.finish_reason == "stop" and first.object == "chat.completion" and first.model == "kitchen"
    assert first.usage is not None and first.usage.completion_tokens == 4
    assert first.usage.total_tokens == first.usage.prompt_tokens + 4
    second = c.chat.completions.create(model="kitchen", user="plain-user", messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "Reply 1: hello there"}, {"role": "user", "content": "more"}])
    usage = second.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    # Warm: everything but the new message came from the cache.
    assert usage.prompt_tokens - (usage.prompt_tokens_details.cached_tokens or 0) < 5
    assert [m["content"] for m in history(server, sid)] == ["hello there", "Reply 1: hello there", "more",
                                                             second.choices[0].message.content]


def test_completion_streaming(server: ServiceProcess) -> None:
    c = client(server)
    chunks = list(c.chat.completions.create(model="streamer", stream=True, stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "tell me a story"}]))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text.endswith("tell me a story")
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["stop"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None and usage.completion_tokens == len(text.split())
    # Without include_usage there is no usage; the stream ends with [DONE] on the wire.
    with native(server) as h, h.stream("POST", "/v1/chat/completions", json={
            "model": "streamer", "stream": True, "messages": [{"role": "user", "content": "again"}]}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all("usage" not in e for e in events) and events[-1]["choices"][0]["finish_reason"] == "stop"


def test_length_and_stop(server: ServiceProcess) -> None:
    c = client(server)
    cut = c.chat.completions.create(model="limits", max_completion_tokens=2,
                                    messages=[{"role": "user", "content": "one two three"}])
    assert cut.choices[0].finish_reason == "length" and cut.usage is not None and cut.usage.completion_tokens == 2
    raw = c.chat.completions.with_raw_response.create(model="limits", stop=["STOP"], messages=[
        {"role": "user", "content": "alpha STOP beta"}])
    stopped = raw.parse()
    content = stopped.choices[0].message.content
    assert content and content.endswith(": alpha ") and stopped.choices[0].finish_reason == "stop"
    assert history(server, raw.headers["x-session-id"])[-1]["content"] == content  # stored cut there too
    streamed = list(c.chat.completions.create(model="limits", stop="beta", stream=True, messages=[
        {"role": "user", "content": "alpha beta gamma"}]))
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices).endswith(": alpha ")


def test_errors_in_openai_shape(server: ServiceProcess) -> None:
    c = client(server)
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="kitchen", messages=[])
    assert isinstance(err.value.body, dict) and err.value.body["type"] == "invalid_request_error"
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="kitchen", n=2, messages=[{"role": "user", "content": "hi"}])
    assert isinstance(err.value.body, dict) and err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="kitchen", messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])


def test_user_field_and_headers_choose_the_session(server: ServiceProcess) -> None:
    c = client(server)

    def sid_of(**kw: Any) -> str:
        raw = c.chat.completions.with_raw_response.create(model="kitchen", **kw)
        return str(raw.headers["x-session-id"])

    alice = sid_of(user="alice", messages=[{"role": "user", "content": "I am Alice"}])
    bob = sid_of(user="bob", messages=[{"role": "user", "content": "I am Bob"}])
    model_one = sid_of(messages=[{"role": "user", "content": "no id"}])
    assert len({alice, bob, model_one}) == 3
    # A stateless client that sends only the new message keeps its memory by id.
    assert sid_of(user="alice", messages=[{"role": "user", "content": "who am I?"}]) == alice
    assert [m["content"] for m in history(server, alice)][::2] == ["I am Alice", "who am I?"]
    # The header wins over the user field.
    webui = client(server, **{"X-OpenWebUI-Chat-Id": "chat-77"})
    raw = webui.chat.completions.with_raw_response.create(model="kitchen", user="alice",
                                                          messages=[{"role": "user", "content": "from webui"}])
    assert raw.headers["x-session-id"] not in (alice, bob)
    # The Ollama surface reaches the same session for the same header.
    with native(server) as h:
        resp = h.post("/api/chat", headers={"X-OpenWebUI-Chat-Id": "chat-77"}, json={
            "model": "kitchen", "stream": False, "messages": [
                {"role": "user", "content": "from webui"},
                {"role": "assistant", "content": raw.parse().choices[0].message.content},
                {"role": "user", "content": "via ollama"}]})
    assert resp.headers["x-session-id"] == raw.headers["x-session-id"]
    listed = {s["session_id"] for s in native(server).get("/v1/sessions").json()["sessions"]}
    assert {alice, bob, model_one, raw.headers["x-session-id"]} <= listed


def test_regenerate_and_edit_with_the_user_field(server: ServiceProcess) -> None:
    c = client(server)
    msgs: list[Any] = [{"role": "user", "content": "q1"}]
    raw = c.chat.completions.with_raw_response.create(model="kitchen", user="editor", messages=msgs)
    sid = raw.headers["x-session-id"]
    a1 = raw.parse().choices[0].message.content
    # Only the new message again, with an id: a continuation (a stateless client keeps its memory).
    regenerated = c.chat.completions.create(model="kitchen", user="editor", messages=msgs)
    stored = history(server, sid)
    assert [m["content"] for m in stored] == ["q1", a1, "q1", regenerated.choices[0].message.content]
    # The whole conversation without its last reply: the last turn is regenerated in place.
    again = c.chat.completions.create(model="kitchen", user="editor", messages=[
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": a1}, {"role": "user", "content": "q1"}])
    stored = history(server, sid)
    assert [m["content"] for m in stored] == ["q1", a1, "q1", again.choices[0].message.content]
    # An edit of the first question: the rest is withdrawn (kept under "undone").
    edited = c.chat.completions.create(model="kitchen", user="editor", messages=[
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": a1},
        {"role": "user", "content": "q1 edited"}])
    assert [m["content"] for m in history(server, sid)] == ["q1", a1, "q1 edited", edited.choices[0].message.content]
    exported = native(server).get(f"/v1/sessions/{sid}/export").json()
    assert again.choices[0].message.content in json.dumps(exported["undone"])


def test_a_web_page_of_an_allowed_origin_may_choose_its_session(tmp_path: Path) -> None:
    app = "http://localhost:3000"
    with service(tmp_path / "s", "--allow-origin", app) as srv, httpx.Client(base_url=srv.url, timeout=10) as h:
        pre = h.options("/v1/chat/completions", headers={
            "Origin": app, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-session-id"})
        assert pre.status_code == 204
        assert "x-session-id" in pre.headers["access-control-allow-headers"].lower()
        made = h.post("/v1/chat/completions", headers={"Origin": app, "X-Session-Id": "page-1"},
                      json={"model": "m", "messages": [{"role": "user", "content": "from a page"}]})
        assert made.status_code == 200 and "x-session-id" in made.headers["access-control-expose-headers"].lower()


def test_native_routes_are_unaffected(server: ServiceProcess) -> None:
    with native(server) as h:
        sid = h.post("/v1/sessions").json()["session_id"]
        body = h.post(f"/v1/sessions/{sid}/messages", json={"text": "native"}).json()
        assert body["turn"] == 1 and body["response"].endswith("native")
        assert h.get(f"/v1/sessions/{sid}").json()["turns"] == 1
        assert h.get("/openapi.json").status_code == 200
        assert h.delete(f"/v1/sessions/{sid}").json()["deleted"] is True


@pytest.mark.model
def test_embedded_model_reports_the_cached_prefix(tmp_path: Path) -> None:
    with service(tmp_path / "s", "--max-tokens", "8", backend="llama-cpp") as srv:
        c = client(srv, "unused")
        first = c.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "Say hello."}])
        reply = first.choices[0].message.content
        assert reply and first.usage is not None and 0 < first.usage.completion_tokens <= 8
        second = c.chat.completions.create(model="assistant", messages=[
            {"role": "user", "content": "Say hello."}, {"role": "assistant", "content": reply},
            {"role": "user", "content": "Again."}])
        usage = second.usage
        assert usage is not None and usage.prompt_tokens_details is not None
        cached = usage.prompt_tokens_details.cached_tokens or 0
        # The second request computed only what is new (the new message and its framing).
        assert cached > 0 and usage.prompt_tokens - cached < first.usage.prompt_tokens


def test_a_client_gone_mid_stream_keeps_nothing(tmp_path: Path) -> None:
    with service(tmp_path / "s", "--fake-delay", "0.05") as srv:
        c = client(srv, "unused")
        raw = c.chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": "short"}])
        sid = raw.headers["x-session-id"]
        long_text = " ".join(f"w{i}" for i in range(200))
        stream = c.chat.completions.create(model="m", stream=True, messages=[{"role": "user", "content": long_text}])
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        stream.close()
        # Once the turn has ended (cancelled: well before its 10 s of reply), nothing of it is kept.
        wait_for(lambda: srv.health()["busy_sessions"] == 0, timeout=8, what="the turn to end")
        assert [m["content"] for m in history(srv, sid, "unused")][::2] == ["short"]
        # The same session goes on.
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "after"}])
        assert [m["content"] for m in history(srv, sid, "unused")][::2] == ["short", "after"]


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_the_api_document_lists_the_compat_routes(server: ServiceProcess) -> None:
    """/openapi.json describes every Ollama and OpenAI route the service serves (taken from the
    routing tables, so a route added later without its description fails here), the headers that
    choose the session, the token-in-path form and --assistant."""
    from conversation_session.service._ollama_api import ollama_routes
    from conversation_session.service._openai_api import openai_routes

    with native(server) as h:
        doc = h.get("/openapi.json").json()
        assert h.get(f"/t/{TOKEN_A}/openapi.json").json() == doc
    paths = doc["paths"]
    for route in [*ollama_routes(), *openai_routes()]:
        assert route.path in paths, route.path
        for method in route.methods - {"HEAD"}:
            assert method.lower() in paths[route.path], (route.path, method)
    for path, method in (("/api/chat", "post"), ("/v1/chat/completions", "post")):
        op = paths[path][method]
        assert {p["name"] for p in op["parameters"] if p["in"] == "header"} == {"X-Session-Id",
                                                                               "X-OpenWebUI-Chat-Id"}
        assert "X-Session-Id" in op["responses"]["200"]["headers"]
        assert "--assistant" in op["requestBody"]["content"]["application/json"]["schema"]["properties"][
            "model"]["description"]
        assert "/t/{token}" in [s["url"] for s in op["servers"]]
    assert "--assistant" in paths["/api/tags"]["get"]["summary"] and "--assistant" in paths["/v1/models"]["get"][
        "summary"]
    assert "/t/TOKEN/" in doc["info"]["description"]
    schemas = doc["components"]["schemas"]
    for ref in set(_refs(doc)):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref


def test_a_long_chat_fits_in_a_request(server: ServiceProcess) -> None:
    """Open WebUI sends the whole chat every time: 1,000 messages of ordinary length are ~150 KB,
    which the service's 64 KB body limit refused (413) until the chat endpoints got their own."""
    said = "please turn the kitchen lights to forty percent and tell me how warm it is outside today"
    chat = [{"role": r, "content": f"{r} {i}: {said}"} for i in range(500) for r in ("user", "assistant")]
    headers = {"X-OpenWebUI-Chat-Id": "long-chat"}
    with native(server) as h:
        for path, extra in (("/v1/chat/completions", {}), ("/api/chat", {"stream": False})):
            body = {"model": "kitchen", "messages": [*chat, {"role": "user", "content": f"first via {path}"}],
                    **extra}
            assert len(json.dumps(body)) > 128 * 1024
            first = h.post(path, json=body, headers=headers)
            assert first.status_code == 200, first.text[:300]
            sid = first.headers["x-session-id"]
            reply = (first.json()["choices"][0]["message"]["content"] if path.startswith("/v1")
                     else first.json()["message"]["content"])
            chat += [{"role": "user", "content": f"first via {path}"}, {"role": "assistant", "content": reply}]
        stored = history(server, sid)
        assert [(m["role"], m["content"]) for m in stored] == [(m["role"], m["content"]) for m in chat]
        huge = {"model": "kitchen", "messages": [{"role": "user", "content": "x" * (4 * 1024 * 1024)}]}
        refused = h.post("/v1/chat/completions", json=huge, headers=headers)
        assert refused.status_code == 413 and refused.json()["error"]["code"] == "too_large"
        assert len(history(server, sid)) == len(chat)
