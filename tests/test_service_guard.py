"""A web page the user visits must not read or drive the loopback service (issue 27).

The attacks are replayed as a browser would send them -- a rebound ``Host`` (DNS rebinding), a
cross-origin ``text/plain`` POST (request forgery), a WebSocket with a foreign ``Origin``
(cross-site WebSocket hijacking) -- against real ``serve`` processes on loopback, on every
surface; the same requests with an allowed origin or host, the service's own origin, or no
``Origin`` at all (curl, SDKs, Home Assistant) are served.  The rule tables run in-process
(Starlette's TestClient on ``create_app``), which is fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from conversation_session.service import ServiceConfig, create_app
from conversation_session.service._config import build_parser, config_from_args, host_name, origin_of
from test_service import ROOT, ServiceProcess, assert_json_error, service, sse_events, wait_for

EVIL = "http://evil.example"
APP = "http://app.example:3000"          # allowed by --allow-origin
ENV_APP = "https://console.example"       # allowed by $CONVERSATION_SESSION_ORIGINS
NAMED = "myhost.example"                  # allowed by --allowed-host


# -- helpers -------------------------------------------------------------------------------------------
def folder_state(path: Path) -> dict[str, str]:
    """Every file under the sessions folder and a hash of its bytes (what "nothing saved" means)."""
    out = {}
    for f in sorted(path.rglob("*")):
        if f.is_file() and not f.name.endswith(".lock") and f.name != ".service-rate":
            out[str(f.relative_to(path))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def raw_handshake(port: int, host: str, path: str, origin: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """A WebSocket opening handshake written by hand (so ``Host`` can be anything): the status,
    the headers and the body of the answer."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]
    if origin:
        lines.append(f"Origin: {origin}")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        if status_line.split()[1] != "101":
            want = int(headers.get("content-length", "0"))
            while len(body) < want:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                body += chunk
    return int(status_line.split()[1]), headers, body


def ws_connect(port: int, sid: str, *, origin: str | None = None, host: str = "127.0.0.1") -> Any:
    """The real ``websockets`` client; ``host`` is the name it puts in ``Host`` (the socket always
    goes to loopback, as a rebound name would)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return connect(f"ws://{host}:{port}/v1/sessions/{sid}/ws", sock=sock, open_timeout=10,
                   origin=origin)  # type: ignore[arg-type]


def ws_turn(ws: Any, text: str) -> dict[str, Any]:
    assert json.loads(ws.recv(timeout=10))["type"] == "ready"
    ws.send(json.dumps({"type": "message", "text": text}))
    while True:
        event: dict[str, Any] = json.loads(ws.recv(timeout=10))
        if event["type"] in ("done", "error"):
            return event


def turns(srv: ServiceProcess, sid: str) -> int:
    got: int = httpx.get(f"{srv.url}/v1/sessions/{sid}", timeout=10).json()["turns"]
    return got


def new_sid(srv: ServiceProcess) -> str:
    resp = httpx.post(f"{srv.url}/v1/sessions", timeout=10)
    assert resp.status_code == 201, resp.text
    sid: str = resp.json()["session_id"]
    return sid


# -- real processes -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """``python main.py serve`` as a user starts it: loopback, no token, nothing allowed."""
    base = tmp_path_factory.mktemp("guard")
    with service(base / "sessions", "--rate", "1000", "--burst", "1000", entry=("main.py", "serve"),
                 env={"CONVERSATION_SESSION_ORIGINS": ""}) as proc:
        yield proc


@pytest.fixture(scope="module")
def opened(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One trusted web app origin by flag, one by the environment, one extra host name."""
    base = tmp_path_factory.mktemp("guard-open")
    with service(base / "sessions", "--allow-origin", APP, "--allowed-host", NAMED, "--rate", "1000",
                 "--burst", "1000", env={"CONVERSATION_SESSION_ORIGINS": f" {ENV_APP}/ , "}) as proc:
        yield proc


def test_a_rebound_host_name_is_refused_on_every_surface(default: ServiceProcess) -> None:
    """DNS rebinding: the attacker's name resolves to 127.0.0.1, so the request reaches the
    service with ``Host: evil.example:PORT``; nothing is answered, nothing is run."""
    srv = default
    sid = new_sid(srv)
    before = folder_state(srv.sessions_dir)
    forged = {"Host": f"evil.example:{srv.port}"}
    with httpx.Client(base_url=srv.url, headers=forged, timeout=10) as evil:
        answers = [
            evil.get("/v1/sessions"),
            evil.get(f"/v1/sessions/{sid}"),
            evil.get(f"/v1/sessions/{sid}/export"),
            evil.post("/v1/sessions"),
            evil.post(f"/v1/sessions/{sid}/messages", json={"text": "my secret is 1234"}),
            evil.post("/api/conversation/process", json={"text": "my secret is 1234", "conversation_id": sid}),
            evil.delete(f"/v1/sessions/{sid}"),
            evil.get("/openapi.json"),
            evil.get("/healthz"),
            evil.get("/"),
            evil.get("/api/tags"),                                  # routes to come answer the same
            evil.post("/v1/chat/completions", json={"messages": []}),
        ]
        with evil.stream("POST", f"/v1/sessions/{sid}/messages", json={"text": "secret", "stream": True}) as sse:
            sse.read()
            answers.append(sse)
            assert not sse.headers["content-type"].startswith("text/event-stream")
    for resp in answers:
        body = assert_json_error(resp, 421, "unknown_host")
        assert "--allowed-host evil.example" in body["error"]["message"]  # type: ignore[index]
        assert resp.headers["x-request-id"] and "access-control-allow-origin" not in resp.headers
    status, headers, body = raw_handshake(srv.port, f"evil.example:{srv.port}", f"/v1/sessions/{sid}/ws")
    assert status == 421 and json.loads(body)["error"]["code"] == "unknown_host"
    assert "upgrade" not in {k.lower() for k in headers}
    # The session is untouched and nothing was written.
    assert turns(srv, sid) == 0
    assert folder_state(srv.sessions_dir) == before
    # Each refusal is in the log (the WebSocket's included; /healthz is never logged).
    wait_for(lambda: sum(line.get("status") == 421 for line in srv.log_lines()) >= len(answers), what="log lines")


def test_a_cross_origin_text_plain_post_is_refused_and_nothing_is_saved(default: ServiceProcess) -> None:
    """Request forgery: the "simple" requests a page sends anywhere without asking."""
    srv = default
    sid = new_sid(srv)
    before = folder_state(srv.sessions_dir)
    listed = httpx.get(f"{srv.url}/v1/sessions", timeout=10).json()["sessions"]
    secret = b'{"text": "my secret is 1234"}'
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        for kind in ("text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "multipart/form-data; b=x"):
            page = {"Origin": EVIL, "Content-Type": kind, "Sec-Fetch-Site": "cross-site"}
            for resp in (c.post("/v1/sessions", content=b"{}", headers=page),
                         c.post(f"/v1/sessions/{sid}/messages", content=secret, headers=page),
                         c.post("/api/conversation/process", content=secret, headers=page),
                         c.delete(f"/v1/sessions/{sid}", headers={"Origin": EVIL})):
                body = assert_json_error(resp, 403, "cross_origin")
                assert f"--allow-origin {EVIL}" in body["error"]["message"]  # type: ignore[index]
        # A JSON body does not help a foreign page, nor does its origin being "null" (sandboxed, file://).
        for origin in (EVIL, "null", f"http://127.0.0.1:{srv.port + 1}", f"https://127.0.0.1:{srv.port}"):
            assert_json_error(c.post(f"/v1/sessions/{sid}/messages", json={"text": "x"}, headers={"Origin": origin}),
                              403, "cross_origin")
        # Without Origin, a browser's cross-site mark alone is enough to refuse.
        assert_json_error(c.post(f"/v1/sessions/{sid}/messages", json={"text": "x"},
                                 headers={"Sec-Fetch-Site": "cross-site"}), 403, "cross_origin")
        # Without Origin (not a browser) a body must still say it is JSON.
        for headers in ({"Content-Type": "text/plain"}, {}):
            body = assert_json_error(c.post(f"/v1/sessions/{sid}/messages", content=secret, headers=headers),
                                     415, "unsupported_media_type")
            assert "application/json" in body["error"]["message"]  # type: ignore[index]
        # A foreign page may still not read: no CORS grant on what it can fetch.
        read = c.get(f"/v1/sessions/{sid}", headers={"Origin": EVIL})
        assert read.status_code == 200 and "access-control-allow-origin" not in read.headers
        preflight = c.options(f"/v1/sessions/{sid}/messages", headers={
            "Origin": EVIL, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
        assert_json_error(preflight, 403, "cross_origin")
        assert not any(k.startswith("access-control-") for k in preflight.headers)
    assert turns(srv, sid) == 0
    assert httpx.get(f"{srv.url}/v1/sessions", timeout=10).json()["sessions"] == listed
    assert folder_state(srv.sessions_dir) == before


def test_a_websocket_from_a_foreign_page_never_opens(default: ServiceProcess) -> None:
    """Cross-site WebSocket hijacking: browsers apply no CORS to WebSockets, so the handshake
    itself is refused; the page gets no socket to send on or read from."""
    srv = default
    sid = new_sid(srv)
    before = folder_state(srv.sessions_dir)
    for origin in (EVIL, "null", f"http://localhost:{srv.port + 1}"):
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(srv.port, sid, origin=origin)
        assert refused.value.response.status_code == 403
        assert json.loads(refused.value.response.body)["error"]["code"] == "cross_origin"
    status, headers, body = raw_handshake(srv.port, f"127.0.0.1:{srv.port}", f"/v1/sessions/{sid}/ws", EVIL)
    assert status == 403 and json.loads(body)["error"]["code"] == "cross_origin"
    assert "sec-websocket-accept" not in headers
    assert turns(srv, sid) == 0
    assert folder_state(srv.sessions_dir) == before


def test_own_origin_and_clients_without_origin_are_served(default: ServiceProcess) -> None:
    """The page the service serves itself, and every client that is not a browser."""
    srv = default
    own = f"http://127.0.0.1:{srv.port}"
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        made = c.post("/v1/sessions", headers={"Origin": own, "Sec-Fetch-Site": "same-origin"})
        assert made.status_code == 201, made.text
        sid = made.json()["session_id"]
        reply = c.post(f"/v1/sessions/{sid}/messages", json={"text": "same origin"}, headers={"Origin": own})
        assert reply.status_code == 200 and reply.json()["turn"] == 1
        assert "access-control-allow-origin" not in reply.headers  # same-origin needs no grant
        # A page at http://localhost:PORT is the service's own too (the name the user typed).
        loc = c.post(f"/v1/sessions/{sid}/messages", json={"text": "by name"},
                     headers={"Host": f"localhost:{srv.port}", "Origin": f"http://localhost:{srv.port}"})
        assert loc.status_code == 200 and loc.json()["turn"] == 2
        with c.stream("POST", f"/v1/sessions/{sid}/messages", json={"text": "stream", "stream": True},
                      headers={"Origin": own}) as resp:
            events = list(sse_events(resp.iter_lines()))
        assert events[-1][0] == "done" and events[-1][1]["turn"] == 3
        ha = c.post("/api/conversation/process", json={"text": "hi", "conversation_id": sid},
                    headers={"Content-Type": "application/json; charset=utf-8"})
        assert ha.status_code == 200 and ha.json()["turn"] == 4
    with ws_connect(srv.port, sid, origin=own) as ws:
        assert ws_turn(ws, "over the socket")["turn"] == 5
    with ws_connect(srv.port, sid) as ws:  # a voice device: no Origin
        assert ws_turn(ws, "device")["turn"] == 6
    with ws_connect(srv.port, sid, host="localhost", origin=f"http://localhost:{srv.port}") as ws:
        assert ws_turn(ws, "by name")["turn"] == 7
    assert turns(srv, sid) == 7


def test_an_allowed_origin_and_host_are_served_with_cors(opened: ServiceProcess) -> None:
    srv = opened
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        for origin in (APP, ENV_APP):
            pre = c.options("/v1/sessions", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                     "Access-Control-Request-Headers": "content-type,authorization"})
            assert pre.status_code == 204, pre.text
            assert pre.headers["access-control-allow-origin"] == origin
            assert "POST" in pre.headers["access-control-allow-methods"]
            allowed = {h.strip().lower() for h in pre.headers["access-control-allow-headers"].split(",")}
            assert {"authorization", "content-type", "x-request-id"} <= allowed
            assert "origin" in pre.headers["vary"].lower()
            assert "access-control-allow-credentials" not in pre.headers
            made = c.post("/v1/sessions", json={}, headers={"Origin": origin})
            assert made.status_code == 201, made.text
            assert made.headers["access-control-allow-origin"] == origin and made.headers["vary"] == "Origin"
            assert "x-request-id" in made.headers["access-control-expose-headers"].lower()
            sid = made.json()["session_id"]
            reply = c.post(f"/v1/sessions/{sid}/messages", json={"text": "from my app"}, headers={"Origin": origin})
            assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == origin
            # An allowed page must still send JSON as JSON.
            assert_json_error(c.post(f"/v1/sessions/{sid}/messages", content=b'{"text": "x"}',
                                     headers={"Origin": origin, "Content-Type": "text/plain"}), 415)
        # Another origin is still refused, and gets no CORS grant.
        refused = c.post(f"/v1/sessions/{sid}/messages", json={"text": "x"}, headers={"Origin": EVIL})
        assert_json_error(refused, 403, "cross_origin")
        assert "access-control-allow-origin" not in refused.headers
        assert c.get("/v1/sessions", headers={"Origin": EVIL}).headers.get("access-control-allow-origin") is None
        # The extra host name is answered; others still are not.
        named = c.post(f"/v1/sessions/{sid}/messages", json={"text": "by name"},
                       headers={"Host": f"{NAMED}:{srv.port}"})
        assert named.status_code == 200 and named.json()["turn"] == 2
        assert_json_error(c.get("/v1/sessions", headers={"Host": f"other.example:{srv.port}"}), 421)
    with ws_connect(srv.port, sid, origin=APP) as ws:
        assert ws_turn(ws, "app socket")["turn"] == 3
    with ws_connect(srv.port, sid, host=NAMED, origin=f"http://{NAMED}:{srv.port}") as ws:
        assert ws_turn(ws, "named socket")["turn"] == 4
    with pytest.raises(InvalidStatus) as refused_ws:
        ws_connect(srv.port, sid, origin=EVIL)
    assert refused_ws.value.response.status_code == 403
    assert turns(srv, sid) == 4


def test_bad_allow_origin_or_host_stops_the_command(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "conversation_session.service", "--backend", "fake", "--sessions-dir",
           str(tmp_path / "s"), "--port", "1"]
    for extra, env, needle in ((["--allow-origin", "evil.example"], {}, "not an origin"),
                               (["--allow-origin", "*"], {}, "not an origin"),
                               (["--allowed-host", "evil.example:80"], {}, "not a host name"),
                               ([], {"CONVERSATION_SESSION_ORIGINS": "http://ok.example,null"},
                                "CONVERSATION_SESSION_ORIGINS")):
        proc = subprocess.run([*cmd, *extra], capture_output=True, text=True, cwd=ROOT, timeout=60,
                              env={**os.environ, "CONVERSATION_SESSION_ORIGINS": "", **env})
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


# -- in-process: the rule tables --------------------------------------------------------------------
@contextlib.contextmanager
def in_process(tmp_path: Path, **options: Any) -> Iterator[TestClient]:
    cfg = ServiceConfig(backend="fake", sessions_dir=str(tmp_path / "inproc"), port=8765, **options)
    with TestClient(create_app(cfg), base_url="http://127.0.0.1:8765") as client:
        end = time.monotonic() + 30
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < end, "not ready"
            time.sleep(0.01)
        yield client


ANSWERED = ["localhost", "localhost:8765", "LocalHost:8765", "localhost.:8765", "app.localhost:8765",
            "127.0.0.1", "127.0.0.1:8765", "127.9.9.9:1", "[::1]:8765", "[::1]", "192.168.1.20:8765", "10.0.0.5"]
REFUSED = ["evil.example", "evil.example:8765", "localhost.evil.example:8765", "127.0.0.1.nip.io:8765",
           "localhost:99999", "localhost:abc", "[::1", "::1:8765", "a b", "evil.example:8765:1", "localhostx"]


def test_which_host_names_are_answered(tmp_path: Path) -> None:
    with in_process(tmp_path) as c:
        for host in ANSWERED:
            assert c.get("/v1/sessions", headers={"Host": host}).status_code == 200, host
        for host in REFUSED:
            assert_json_error(c.get("/v1/sessions", headers={"Host": host}), 421, "unknown_host")  # type: ignore[arg-type]
    with in_process(tmp_path, allowed_hosts=("Chat.Example.", "[fd00::1]"), host="box.lan") as c:
        for host in ("chat.example:8765", "CHAT.example", "box.lan:8765", "[fd00::1]:8765", "localhost"):
            assert c.get("/v1/sessions", headers={"Host": host}).status_code == 200, host
        assert_json_error(c.get("/v1/sessions", headers={"Host": "evil.example"}), 421)  # type: ignore[arg-type]
    with in_process(tmp_path, allowed_hosts=("*",)) as c:  # a reverse proxy checks names itself
        assert c.get("/v1/sessions", headers={"Host": "evil.example:8765"}).status_code == 200
        # ... but a foreign page still cannot change anything.
        assert_json_error(c.post("/v1/sessions", headers={"Origin": EVIL}), 403)  # type: ignore[arg-type]


def test_origin_rules_in_process(tmp_path: Path) -> None:
    with in_process(tmp_path, allow_origins=("HTTP://App.Example:3000",)) as c:
        cases: list[tuple[dict[str, str], int]] = [
            ({}, 201),
            ({"Origin": "http://127.0.0.1:8765"}, 201),
            ({"Origin": "http://127.0.0.1:8765", "Sec-Fetch-Site": "same-origin"}, 201),
            ({"Origin": "http://app.example:3000"}, 201),
            ({"Origin": "http://app.example:3000", "Sec-Fetch-Site": "cross-site"}, 201),
            ({"Sec-Fetch-Site": "same-site"}, 201),
            ({"Sec-Fetch-Site": "none"}, 201),
            ({"Origin": "http://app.example"}, 403),         # another port is another origin
            ({"Origin": "https://app.example:3000"}, 403),   # and another scheme
            ({"Origin": "http://127.0.0.1:8766"}, 403),
            ({"Origin": "http://127.0.0.1"}, 403),
            ({"Origin": "null"}, 403),
            ({"Origin": "http://app.example:3000/path"}, 403),
            ({"Sec-Fetch-Site": "cross-site"}, 403),
        ]
        for headers, want in cases:
            resp = c.post("/v1/sessions", headers=headers)
            assert resp.status_code == want, (headers, resp.text)
        # Two Origin headers are not one allowed origin.
        two = c.post("/v1/sessions", headers=[("Origin", "http://app.example:3000"), ("Origin", EVIL)])
        assert two.status_code == 403
        # Reads are not refused (the browser keeps them from a foreign page: no CORS grant) ...
        read = c.get("/v1/sessions", headers={"Origin": EVIL})
        assert read.status_code == 200 and "access-control-allow-origin" not in read.headers
        assert read.headers["vary"] == "Origin"  # answers depend on Origin: caches must know
        # ... the allowed origin gets its exact origin back, never "*".
        mine = c.get("/v1/sessions", headers={"Origin": "http://app.example:3000"})
        assert mine.headers["access-control-allow-origin"] == "http://app.example:3000"
        pna = c.options("/v1/sessions", headers={"Origin": "http://app.example:3000",
                                                 "Access-Control-Request-Method": "DELETE",
                                                 "Access-Control-Request-Private-Network": "true"})
        assert pna.status_code == 204 and pna.headers["access-control-allow-private-network"] == "true"
        assert "DELETE" in pna.headers["access-control-allow-methods"] and pna.content == b""


def test_bodies_must_say_they_are_json(tmp_path: Path) -> None:
    with in_process(tmp_path) as c:
        sid = c.post("/v1/sessions").json()["session_id"]  # no body: no type needed
        url = f"/v1/sessions/{sid}/messages"
        body = b'{"text": "hello"}'
        for kind in ("application/json", "application/json; charset=utf-8", "Application/JSON",
                     "application/vnd.example+json"):
            assert c.post(url, content=body, headers={"Content-Type": kind}).status_code == 200, kind
        for kind in ("text/plain", "text/json", "application/x-www-form-urlencoded", "multipart/form-data",
                     "application/jsonp", "application/json-seq", ""):
            assert_json_error(c.post(url, content=body, headers={"Content-Type": kind}), 415,  # type: ignore[arg-type]
                              "unsupported_media_type")
        assert_json_error(c.post(url, content=body), 415)  # type: ignore[arg-type]
        assert_json_error(c.post(url, content=iter([body])), 415)  # type: ignore[arg-type]  # chunked, no type
        assert_json_error(c.post(url, content=body, headers=[("Content-Type", "application/json"),  # type: ignore[arg-type]
                                                              ("Content-Type", "text/plain")]), 415)
        assert c.post("/v1/sessions", content=b"", headers={"Content-Type": "text/plain"}).status_code == 201
        assert c.get(f"/v1/sessions/{sid}").json()["turns"] == 4


def test_websocket_rules_in_process(tmp_path: Path) -> None:
    from starlette.testclient import WebSocketDenialResponse

    with in_process(tmp_path, allow_origins=(APP,)) as c:
        sid = c.post("/v1/sessions").json()["session_id"]
        for headers, status in (({"Origin": EVIL}, 403), ({"Sec-Fetch-Site": "cross-site"}, 403),
                                ({"Host": "evil.example"}, 421)):
            with pytest.raises(WebSocketDenialResponse) as denied, \
                    c.websocket_connect(f"ws://127.0.0.1:8765/v1/sessions/{sid}/ws", headers=headers):
                pass
            assert_json_error(denied.value, status)  # type: ignore[arg-type]  # an httpx.Response
        for headers in ({}, {"Origin": APP}, {"Origin": "http://127.0.0.1:8765"}):
            with c.websocket_connect(f"ws://127.0.0.1:8765/v1/sessions/{sid}/ws", headers=headers) as ws:
                assert ws.receive_json()["type"] == "ready"


def test_origin_and_host_values_are_checked() -> None:
    assert origin_of("HTTP://App.Example:3000/") == "http://app.example:3000"
    assert origin_of("https://x.example:443") == "https://x.example"
    assert origin_of("http://[::1]:8080") == "http://[::1]:8080"
    assert origin_of("chrome-extension://abcdef") == "chrome-extension://abcdef"
    for bad in ("evil.example", "null", "*", "http://", "http://x.example/path", "http://x.example?q",
                "http://user@x.example", "http://x.example:99999", "http://x.example:", "http://*.example",
                "http://a b"):
        with pytest.raises(ValueError):
            origin_of(bad)
    assert host_name("Box.LAN.") == "box.lan" and host_name("[::1]") == "::1" and host_name("*") == "*"
    for bad in ("box:80", "a b", "", "-x.example", "x..example", "évil.example"):
        with pytest.raises(ValueError):
            host_name(bad)
    with pytest.raises(ValueError):
        ServiceConfig(allow_origins=("evil.example",))
    with pytest.raises(TypeError):
        ServiceConfig(allowed_hosts="box.lan")  # type: ignore[arg-type]
    args = build_parser().parse_args(["--allow-origin", "http://a.example:3000", "--allowed-host", "Box.Lan",
                                      "--allow-origin", "http://a.example:3000"])
    cfg = config_from_args(args, {"CONVERSATION_SESSION_ORIGINS": "https://b.example, ,http://a.example:3000"})
    assert cfg.allow_origins == ("http://a.example:3000", "https://b.example") and cfg.allowed_hosts == ("box.lan",)
    assert ServiceConfig.from_env(cfg.to_env()) == cfg  # what --workers N hands each worker
    with pytest.raises(ValueError, match="CONVERSATION_SESSION_ORIGINS"):
        config_from_args(args, {"CONVERSATION_SESSION_ORIGINS": "evil.example"})
