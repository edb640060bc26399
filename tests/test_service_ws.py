"""The session WebSocket over a real connection: a real uvicorn server process (fake backend
streaming word by word) and the real ``websockets`` client."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from conversation_session import AsyncTurn
from test_service import LONG, TOKEN_A, TOKEN_B, ServiceProcess, auth, service, wait_for


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    base = tmp_path_factory.mktemp("ws")
    with service(base / "sessions", "--token", TOKEN_A, "--token", TOKEN_B, "--fake-delay", "0.02",
                 "--rate", "1000", "--burst", "1000") as proc:
        yield proc


@pytest.fixture
def client(server: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=auth(TOKEN_A), timeout=30) as c:
        yield c


def ws_url(server: ServiceProcess, sid: str) -> str:
    return server.url.replace("http://", "ws://") + f"/v1/sessions/{sid}/ws"


@contextlib.contextmanager
def open_ws(server: ServiceProcess, sid: str, token: str = TOKEN_A) -> Iterator[ClientConnection]:
    with connect(ws_url(server, sid), additional_headers=auth(token), open_timeout=10) as ws:
        ready = recv(ws)
        assert ready == {"type": "ready", "session_id": sid}
        yield ws


def recv(ws: ClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ws.recv(timeout=timeout))
    return data


def until(ws: ClientConnection, kinds: set[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Events up to the first of ``kinds`` (returned separately)."""
    seen = []
    while True:
        event = recv(ws)
        if event["type"] in kinds:
            return seen, event
        seen.append(event)


def new_session(client: httpx.Client) -> str:
    sid: str = client.post("/v1/sessions").json()["session_id"]
    return sid


def test_ws_streams_pieces_sentences_then_done(server: ServiceProcess, client: httpx.Client) -> None:
    sid = new_session(client)
    with open_ws(server, sid) as ws:
        ws.send(json.dumps({"type": "message", "text": "It works. Does it stream? Yes!"}))
        events, done = until(ws, {"done", "error"})
        assert done["type"] == "done", done
        pieces = [e["text"] for e in events if e["type"] == "piece"]
        sentences = [e["text"] for e in events if e["type"] == "sentence"]
        assert "".join(pieces) == done["response"] == "Reply 1: It works. Does it stream? Yes!"
        assert sentences == ["Reply 1: It works.", "Does it stream?", "Yes!"]
        assert done["turn"] == 1 and done["figures"]["saved"] is True
        ws.send(json.dumps({"type": "ping"}))
        assert recv(ws) == {"type": "pong"}
        ws.send(json.dumps({"type": "message", "text": "again"}))
        assert until(ws, {"done"})[1]["turn"] == 2
    got = client.get(f"/v1/sessions/{sid}").json()
    assert got["turns"] == 2 and got["history"][2]["content"] == "again"


def test_ws_interrupt_stops_the_reply_at_once(server: ServiceProcess, client: httpx.Client) -> None:
    sid = new_session(client)
    client.post(f"/v1/sessions/{sid}/messages", json={"text": "before"}).raise_for_status()
    before = server.health()
    with open_ws(server, sid) as ws:
        ws.send(json.dumps({"type": "message", "text": LONG}))
        pieces: list[str] = []
        while len(pieces) < 3:
            event = recv(ws)
            if event["type"] == "piece":
                pieces.append(event["text"])
        heard = "".join(pieces).rstrip()  # "Reply N: word0."
        t0 = time.monotonic()
        ws.send(json.dumps({"type": "interrupt", "heard": heard}))
        _, stopped = until(ws, {"interrupted", "done", "error"})
        assert time.monotonic() - t0 < 1.0  # the reply had 200 more pieces at 20 ms each
        assert stopped["type"] == "interrupted", stopped
        got = client.get(f"/v1/sessions/{sid}").json()
        if hasattr(AsyncTurn, "interrupt"):
            # Barge-in (issue 14): what was heard is kept, marked interrupted.
            assert stopped["kept"] is True and got["turns"] == 2
            assert got["history"][-1]["content"] == heard and got["history"][-1].get("interrupted")
            assert stopped["interrupted"] is True and stopped["response"] == heard and heard.endswith("word0.")
        else:
            # turn.cancel(): nothing of the turn is kept.
            assert stopped["kept"] is False and got["turns"] == 1
            assert all("word1." not in m["content"] for m in got["history"])
        ws.send(json.dumps({"type": "message", "text": "next"}))
        assert until(ws, {"done"})[1]["turn"] == got["turns"] + 1
    assert server.health()["backend_cancelled"] > before["backend_cancelled"]  # type: ignore[operator]


def test_ws_disconnect_mid_reply_cancels_the_generation(server: ServiceProcess, client: httpx.Client) -> None:
    sid = new_session(client)
    before = server.health()
    with open_ws(server, sid) as ws:
        ws.send(json.dumps({"type": "message", "text": LONG}))
        pieces = 0
        while pieces < 3:
            pieces += recv(ws)["type"] == "piece"
    wait_for(lambda: server.health()["backend_cancelled"] > before["backend_cancelled"],  # type: ignore[operator]
             what="the backend to see the cancellation")
    wait_for(lambda: server.health()["turns_cancelled"] > before["turns_cancelled"],  # type: ignore[operator]
             what="the turn to be cancelled")
    assert client.get(f"/v1/sessions/{sid}").json()["turns"] == 0
    assert client.post(f"/v1/sessions/{sid}/messages", json={"text": "still usable"}).json()["turn"] == 1


def test_ws_rejects_missing_or_foreign_tokens(server: ServiceProcess, client: httpx.Client) -> None:
    sid = new_session(client)
    for headers in ({}, auth("wrong-token"), auth(TOKEN_B)):
        with pytest.raises(InvalidStatus) as info, connect(ws_url(server, sid), additional_headers=headers,
                                                           open_timeout=10):
            pass
        assert info.value.response.status_code == 403
    with pytest.raises(InvalidStatus), connect(ws_url(server, "no-such-session"), additional_headers=auth(TOKEN_A),
                                               open_timeout=10):
        pass
    # Browsers cannot set headers: ?token= works too.
    with connect(ws_url(server, sid) + f"?token={TOKEN_A}", open_timeout=10) as ws:
        assert recv(ws)["type"] == "ready"


def test_a_token_in_the_url_is_refused_on_plain_http(server: ServiceProcess, client: httpx.Client) -> None:
    """Only a WebSocket takes ``?token=`` (old clients cannot set its headers); on HTTP a URL's
    token would end up in logs, history and Referer headers, so it is refused, saying why."""
    sid = new_session(client)
    before = client.get("/v1/sessions").json()
    with httpx.Client(base_url=server.url, timeout=30) as bare:
        for method, path in (("GET", "/v1/sessions"), ("POST", "/v1/sessions"),
                             ("GET", f"/v1/sessions/{sid}/export?format=json"),
                             ("POST", f"/v1/sessions/{sid}/messages"), ("GET", "/api/tags")):
            join = "&" if "?" in path else "?"
            resp = bare.request(method, f"{path}{join}token={TOKEN_A}", json={"text": "via the URL"})
            assert resp.status_code == 401, (path, resp.text)
            error = resp.json()["error"]
            message = error if isinstance(error, str) else error["message"]  # the Ollama API's shape: a string
            assert "only on WebSocket" in message and "Authorization: Bearer" in message, message
            assert resp.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/sessions").json() == before       # nothing was created
    assert client.get(f"/v1/sessions/{sid}").json()["turns"] == 0
    # The header is what counts; a stray ?token= beside it changes nothing.
    assert client.get(f"/v1/sessions?token={TOKEN_B}").json() == before
    # The WebSocket still takes it.
    with connect(ws_url(server, sid) + f"?token={TOKEN_A}", open_timeout=10) as ws:
        assert recv(ws)["type"] == "ready"


def test_ws_bad_messages_get_error_events_and_the_socket_stays_usable(server: ServiceProcess,
                                                                      client: httpx.Client) -> None:
    sid = new_session(client)
    with open_ws(server, sid) as ws:
        ws.send("not json")
        assert recv(ws)["code"] == "bad_json"
        ws.send(json.dumps([1, 2]))
        assert recv(ws)["code"] == "bad_json"
        ws.send(json.dumps({"type": "dance"}))
        assert recv(ws)["code"] == "bad_request"
        ws.send(json.dumps({"type": "message", "text": ""}))
        assert recv(ws)["code"] == "invalid_text"
        ws.send(json.dumps({"type": "message", "text": "x" * 17_000}))
        assert recv(ws)["code"] == "too_large"
        ws.send(json.dumps({"type": "message", "text": "y" * 70_000}))
        assert recv(ws)["code"] == "too_large"
        ws.send(json.dumps({"type": "interrupt"}))  # nothing to interrupt: ignored
        ws.send(json.dumps({"type": "message", "text": LONG}))
        assert recv(ws)["type"] == "piece"
        ws.send(json.dumps({"type": "message", "text": "me too"}))
        _, busy = until(ws, {"error"})
        assert busy["code"] == "busy" and busy["status"] == 409
        ws.send(json.dumps({"type": "interrupt"}))
        until(ws, {"interrupted"})
        ws.send(json.dumps({"type": "message", "text": "fine"}))
        _, done = until(ws, {"done", "error"})
        assert done["type"] == "done" and done["response"] == f"Reply {done['response'].split()[1]} fine"


def test_ws_and_rest_share_the_session_between_turns(server: ServiceProcess, client: httpx.Client) -> None:
    sid = new_session(client)
    with open_ws(server, sid) as ws:
        ws.send(json.dumps({"type": "message", "text": "from the device"}))
        until(ws, {"done"})
        # The socket holds the session only during a turn: REST gets it at once in between.
        assert client.post(f"/v1/sessions/{sid}/messages", json={"text": "from REST"}).json()["turn"] == 2
        ws.send(json.dumps({"type": "message", "text": "device again"}))
        assert until(ws, {"done"})[1]["turn"] == 3


def test_ws_survives_binary_frames(server: ServiceProcess, client: httpx.Client, tmp_path: Path) -> None:
    sid = new_session(client)
    with open_ws(server, sid) as ws:
        ws.send(b"\xff\x00binary")
        assert recv(ws)["code"] == "bad_json"
        ws.send(json.dumps({"type": "message", "text": "text after binary"}).encode())
        assert until(ws, {"done"})[1]["turn"] == 1
