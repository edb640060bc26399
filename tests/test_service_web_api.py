"""What the web page relies on, over real HTTP against a real ``serve`` process (the fake
backend, word by word): the page and its headers, detached turns that survive their client,
following and stopping them, undo, retry, rename, search, stats, Markdown export, and the
WebSocket token offered as a subprotocol instead of in the URL."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from test_service import TOKEN_A, ServiceProcess, assert_json_error, auth, service, sse_events, wait_for

WORDS = " ".join(f"w{i}" for i in range(60))  # a reply of ~62 pieces: 3 s at 50 ms a piece


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    base = tmp_path_factory.mktemp("web-api")
    with service(base / "sessions", "--token", TOKEN_A, "--fake-delay", "0.05", "--rate", "1000",
                 "--burst", "1000") as proc:
        yield proc


@pytest.fixture
def client(server: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=auth(TOKEN_A), timeout=30) as c:
        yield c


def new_session(client: httpx.Client) -> str:
    resp = client.post("/v1/sessions", json={})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["session_id"])


def history(client: httpx.Client, sid: str) -> list[dict[str, object]]:
    data = client.get(f"/v1/sessions/{sid}").json()
    return list(data["history"])


def test_the_page_is_served_with_a_strict_policy(server: ServiceProcess) -> None:
    resp = httpx.get(server.url + "/")  # no token needed for the page itself: it holds no data
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    csp = resp.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    html = resp.text
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts and all('src="/web/' in s for s in scripts), scripts  # nothing inline
    assert "<style" not in html and " style=" not in html and "http://" not in html and "https://" not in html
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
        asset = httpx.get(f"{server.url}/web/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in asset.text, sink  # content reaches the page as text only
        assert "http://" not in asset.text and "https://" not in asset.text  # nothing fetched from elsewhere
    assert_json_error(httpx.get(server.url + "/web/secret.py"), 404, "not_found")


def test_a_detached_reply_survives_its_client(server: ServiceProcess, client: httpx.Client) -> None:
    sid = new_session(client)
    with client.stream("POST", f"/v1/sessions/{sid}/messages",
                       json={"text": WORDS, "stream": True, "detach": True}) as resp:
        assert resp.status_code == 200
        events = sse_events(resp.iter_lines())
        assert next(events)[0] == "start"
        assert next(events) == ("piece", {"text": "Reply "})  # then the client goes away mid-reply
    # Someone else follows it: what was written so far, then the rest.
    with client.stream("GET", f"/v1/sessions/{sid}/live") as resp:
        seen = list(sse_events(resp.iter_lines()))
    assert seen[0] == ("start", {"session_id": sid, "text": WORDS, "retry": False})
    assert seen[-1][0] == "done"
    reply = "".join(str(d["text"]) for e, d in seen if e == "piece")
    assert reply.endswith(WORDS) and reply == seen[-1][1]["response"]
    assert history(client, sid)[-1] == {"role": "assistant", "content": reply}
    with client.stream("GET", f"/v1/sessions/{sid}/live") as resp:
        assert list(sse_events(resp.iter_lines())) == [("idle", {"session_id": sid, "turns": 1})]


def test_a_detached_reply_is_completed_before_shutdown(tmp_path: Path) -> None:
    """SIGTERM while a detached reply is being written and nobody follows it: the service gives
    it the shutdown grace, saves it whole, then exits cleanly."""
    with service(tmp_path / "sessions", "--token", TOKEN_A, "--fake-delay", "0.05") as proc:
        with httpx.Client(base_url=proc.url, headers=auth(TOKEN_A), timeout=30) as client:
            sid = new_session(client)
            with client.stream("POST", f"/v1/sessions/{sid}/messages",
                               json={"text": WORDS, "stream": True, "detach": True}) as resp:
                assert next(sse_events(resp.iter_lines()))[0] == "start"
        assert proc.stop() == 0
    with service(tmp_path / "sessions", "--token", TOKEN_A) as proc, \
            httpx.Client(base_url=proc.url, headers=auth(TOKEN_A), timeout=30) as client:
        last = history(client, sid)[-1]
        assert last["role"] == "assistant" and str(last["content"]).endswith(WORDS) and "interrupted" not in last


def test_without_detach_a_vanished_client_still_cancels(server: ServiceProcess, client: httpx.Client) -> None:
    sid = new_session(client)
    with client.stream("POST", f"/v1/sessions/{sid}/messages", json={"text": WORDS, "stream": True}) as resp:
        assert next(sse_events(resp.iter_lines()))[0] == "piece"
    wait_for(lambda: client.post(f"/v1/sessions/{sid}/messages", json={"text": "next"}).status_code == 200,
             what="the session free again")
    contents = [m["content"] for m in history(client, sid)]
    assert contents[0] == "next" and len(contents) == 2  # the cancelled turn left nothing


def test_a_detached_turn_without_stream_answers_json(client: httpx.Client) -> None:
    sid = new_session(client)
    resp = client.post(f"/v1/sessions/{sid}/messages", json={"text": "hi there", "detach": True})
    assert resp.status_code == 200 and resp.json()["response"].endswith("hi there")
    assert_json_error(client.post(f"/v1/sessions/{sid}/messages", json={"text": "x", "detach": "yes"}), 400)


def test_stop_keeps_what_was_written_marked_interrupted(client: httpx.Client) -> None:
    sid = new_session(client)
    with client.stream("POST", f"/v1/sessions/{sid}/messages",
                       json={"text": WORDS, "stream": True, "detach": True}) as resp:
        events = sse_events(resp.iter_lines())
        written = ""
        for event, data in events:
            if event == "piece":
                written += str(data["text"])
                if written.count(" ") >= 4:
                    break
        # A second detached turn while this one runs is refused, not queued.
        assert_json_error(client.post(f"/v1/sessions/{sid}/messages", json={"text": "x", "detach": True}), 409)
        assert client.post(f"/v1/sessions/{sid}/stop", json={}).json() == {"session_id": sid, "stopped": True}
        rest = list(events)
    assert rest[-1][0] == "interrupted" and rest[-1][1]["interrupted"] is True and rest[-1][1]["kept"] is True
    last = history(client, sid)[-1]
    assert last["interrupted"] is True and str(last["content"]).startswith(written.rstrip())
    assert len(str(last["content"])) < len("Reply 1: " + WORDS)
    assert client.post(f"/v1/sessions/{sid}/stop", json={}).json()["stopped"] is False  # nothing runs now


def test_undo_retry_rename_search_stats_export(client: httpx.Client) -> None:
    sid = new_session(client)
    assert_json_error(client.patch(f"/v1/sessions/{sid}", json={"title": "early"}), 409, "empty_session")
    for text in ("first zebra-question", "second question"):
        assert client.post(f"/v1/sessions/{sid}/messages", json={"text": text}).status_code == 200
    before = history(client, sid)[-1]["content"]
    resp = client.post(f"/v1/sessions/{sid}/retry", json={})
    assert resp.status_code == 200, resp.text
    after = history(client, sid)
    assert len(after) == 4 and after[-1]["content"] == resp.json()["response"] != before
    assert client.post(f"/v1/sessions/{sid}/undo", json={}).json() == {"session_id": sid, "undone": True, "turns": 1}
    assert [m["content"] for m in history(client, sid)][:1] == ["first zebra-question"]

    resp = client.patch(f"/v1/sessions/{sid}", json={"title": "  Zoo   <b>notes</b> "})
    assert resp.json() == {"session_id": sid, "title": "Zoo <b>notes</b>"}
    listed = {s["session_id"]: s for s in client.get("/v1/sessions").json()["sessions"]}
    assert listed[sid]["title"] == "Zoo <b>notes</b>" and client.get(f"/v1/sessions/{sid}").json()["title"]
    assert_json_error(client.patch(f"/v1/sessions/{sid}", json={"title": 5}), 400)

    hits = client.get("/v1/search", params={"q": "ZEBRA-question"}).json()["hits"]
    assert {h["session_id"] for h in hits} == {sid} and {h["role"] for h in hits} == {"user", "assistant"}
    assert client.get("/v1/search", params={"q": "no-such-word-anywhere"}).json()["hits"] == []
    assert_json_error(client.get("/v1/search", params={"q": " "}), 400)
    # Another token's sessions are not searched.
    with httpx.Client(base_url=str(client.base_url), headers=auth("someone-else")) as other:
        assert other.get("/v1/search", params={"q": "zebra"}).status_code == 401

    stats = client.get(f"/v1/sessions/{sid}/stats").json()["stats"]
    assert stats["backend"] == "fake" and stats["tokens_in_cache"] > 0

    md = client.get(f"/v1/sessions/{sid}/export", params={"format": "md"})
    assert md.headers["content-type"].startswith("text/markdown")
    assert md.headers["content-disposition"] == f'attachment; filename="{sid}.md"'
    assert md.text.startswith("# Zoo <b>notes</b>") and "first zebra-question" in md.text
    assert "withdrawn turns" in md.text  # the undo and the retry stay on record
    saved = json.loads(client.get(f"/v1/sessions/{sid}/export").content)
    assert saved["conversation_history"][0]["content"] == "first zebra-question"
    assert_json_error(client.get(f"/v1/sessions/{sid}/export", params={"format": "pdf"}), 400)


def test_cut_keeps_the_saved_reply_as_far_as_heard(client: httpx.Client) -> None:
    sid = new_session(client)
    reply = client.post(f"/v1/sessions/{sid}/messages", json={"text": "One. Two. Three."}).json()["response"]
    assert_json_error(client.post(f"/v1/sessions/{sid}/cut", json={"heard": "nonsense", "turn": 1}), 400)
    assert_json_error(client.post(f"/v1/sessions/{sid}/cut", json={"heard": reply[:5], "turn": 2}), 409, "moved_on")
    assert_json_error(client.post(f"/v1/sessions/{sid}/cut", json={"heard": 3, "turn": 1}), 400)
    heard = reply[:reply.index("Two.") + 4]
    resp = client.post(f"/v1/sessions/{sid}/cut", json={"heard": heard, "turn": 1})
    assert resp.json() == {"session_id": sid, "cut": True, "kept": True, "turn": 1, "response": heard}
    assert history(client, sid)[-1] == {"role": "assistant", "content": heard, "interrupted": True}


def test_websocket_token_as_subprotocol(server: ServiceProcess, client: httpx.Client) -> None:
    sid = new_session(client)
    url = server.url.replace("http://", "ws://") + f"/v1/sessions/{sid}/ws"
    with connect(url, subprotocols=["conversation-session", f"bearer.{TOKEN_A}"],  # type: ignore[list-item]
                 open_timeout=10) as ws:
        assert ws.subprotocol == "conversation-session"  # the token is never echoed back
        assert json.loads(ws.recv(timeout=10))["type"] == "ready"
    with pytest.raises(InvalidStatus):
        connect(url, subprotocols=["conversation-session", "bearer.wrong"], open_timeout=10)  # type: ignore[list-item]


def test_a_foreign_origin_cannot_drive_the_new_routes(server: ServiceProcess, client: httpx.Client) -> None:
    sid = new_session(client)
    evil = {"Origin": "http://evil.example"}
    assert_json_error(client.post(f"/v1/sessions/{sid}/undo", json={}, headers=evil), 403)
    assert_json_error(client.patch(f"/v1/sessions/{sid}", json={"title": "x"}, headers=evil), 403)
    own = {"Origin": server.url}
    assert client.post(f"/v1/sessions/{sid}/undo", json={}, headers=own).status_code == 200


def test_the_api_document_describes_the_new_routes(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    for path in ("/v1/search", "/v1/sessions/{sid}/undo", "/v1/sessions/{sid}/retry", "/v1/sessions/{sid}/stats",
                 "/v1/sessions/{sid}/live", "/v1/sessions/{sid}/stop", "/v1/sessions/{sid}/cut"):
        assert path in paths, path
    assert "patch" in paths["/v1/sessions/{sid}"]
    body = paths["/v1/sessions/{sid}/messages"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "cancels" in body["properties"]["detach"]["description"]


def test_page_assets_are_in_the_package() -> None:
    root = Path(__file__).resolve().parent.parent
    pyproject = (root / "pyproject.toml").read_text()
    for name in ("index.html", "app.js", "app.css"):
        assert (root / "src/conversation_session/service/web" / name).is_file()
    assert "service/web/*.js" in pyproject and "service/web/*.html" in pyproject


def test_search_finds_the_callers_hit_behind_many_in_sessions_that_are_not_theirs(
        server: ServiceProcess, client: httpx.Client) -> None:
    """The store is searched within the caller's own sessions: hits in others' sessions (here a
    newer session with 600 matching messages, made by the chat app in the same folder) never
    crowd the caller's out."""
    from conversation_session.testing import seed_session

    sid = new_session(client)
    resp = client.post(f"/v1/sessions/{sid}/messages", json={"text": "OKAPI-mine"})
    assert resp.status_code == 200, resp.text
    seed_session(server.sessions_dir, [{"role": "user" if i % 2 == 0 else "assistant", "content": f"okapi-{i}"}
                                       for i in range(600)])
    hits = client.get("/v1/search", params={"q": "okapi"}).json()["hits"]
    assert {h["session_id"] for h in hits} == {sid} and 0 in [h["index"] for h in hits]
