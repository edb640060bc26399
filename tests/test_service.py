"""The session service over real HTTP: a real uvicorn server process on loopback (the fake
backend, streaming word by word), real httpx clients.

``ServiceProcess`` and ``service`` are also used by test_service_ws.py and test_service_workers.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conversation_session import SessionRecord

ROOT = Path(__file__).resolve().parent.parent
TOKEN_A = "token-alpha-0123456789"
TOKEN_B = "token-bravo-9876543210"
LONG = " ".join(f"word{i}." for i in range(200))  # a reply of 202 pieces


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


JSON = {"Content-Type": "application/json"}  # raw bytes must say they are JSON (the service refuses others: 415)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class ServiceProcess:
    """``python -m conversation_session.service`` in a subprocess, on a free loopback port."""

    def __init__(self, sessions_dir: Path, *args: str, port: int | None = None, backend: str = "fake",
                 env: dict[str, str] | None = None, wait: bool = True,
                 entry: tuple[str, ...] = ("-m", "conversation_session.service")):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sessions_dir = sessions_dir
        self.log_path = sessions_dir.parent / f"service-{self.port}-{time.monotonic_ns()}.log"
        cmd = [sys.executable, *entry, "--backend", backend, "--port", str(self.port), *args]
        if not any(a.startswith("--store") for a in args):
            cmd += ["--sessions-dir", str(sessions_dir)]
        self._log = open(self.log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **(env or {})})
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"the service exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.05)
        raise AssertionError(f"the service did not get ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def log_lines(self) -> list[dict[str, object]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def health(self) -> dict[str, object]:
        data: dict[str, object] = httpx.get(self.url + "/healthz", timeout=5).json()
        return data

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@contextlib.contextmanager
def service(sessions_dir: Path, *args: str, **kwargs: object) -> Iterator[ServiceProcess]:
    proc = ServiceProcess(sessions_dir, *args, **kwargs)  # type: ignore[arg-type]
    try:
        yield proc
    finally:
        proc.stop()


def wait_for(predicate: object, timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def assert_json_error(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, object]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert set(body) == {"error", "request_id"}, body
    assert "Traceback" not in resp.text
    if code is not None:
        assert body["error"]["code"] == code, body
    return body  # type: ignore[no-any-return]


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, object]]]:
    event = None
    for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: ") and event is not None:
            yield event, json.loads(line[6:])
            event = None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One server for the module: two tokens, a slow-enough fake (10 ms per piece)."""
    base = tmp_path_factory.mktemp("svc")
    with service(base / "sessions", "--token", TOKEN_A, "--fake-delay", "0.01", "--rate", "1000",
                 "--burst", "1000", "--lock-wait", "5", env={"CONVERSATION_SESSION_TOKENS": TOKEN_B}) as proc:
        yield proc


@pytest.fixture
def client(server: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=auth(TOKEN_A), timeout=30) as c:
        yield c


def new_session(client: httpx.Client) -> str:
    resp = client.post("/v1/sessions")
    assert resp.status_code == 201, resp.text
    sid: str = resp.json()["session_id"]
    return sid


# -- every endpoint ----------------------------------------------------------------------------------
def test_rest_endpoints_round_trip(server: ServiceProcess, client: httpx.Client) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["backend"] == "fake"
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.") and "/v1/sessions/{sid}/messages" in doc["paths"]

    sid = new_session(client)
    assert client.get(f"/v1/sessions/{sid}").json()["turns"] == 0  # an empty session exists
    assert sid in [s["session_id"] for s in client.get("/v1/sessions").json()["sessions"]]

    r1 = client.post(f"/v1/sessions/{sid}/messages", json={"text": "hello there"})
    assert r1.status_code == 200, r1.text
    body = r1.json()
    assert body["response"].endswith("hello there") and body["turn"] == 1 and body["session_id"] == sid
    assert body["figures"]["saved"] is True and body["figures"]["finish_reason"] == "stop"
    assert set(body["figures"]) >= {"ttft_s", "total_s", "prompt_tokens", "cached_tokens", "completion_tokens"}
    r2 = client.post(f"/v1/sessions/{sid}/messages", json={"text": "second one", "stream": False}).json()
    assert r2["turn"] == 2 and r2["figures"]["cached_tokens"] > 0  # the same open session's cache

    got = client.get(f"/v1/sessions/{sid}").json()
    assert got["turns"] == 2 and got["total_messages"] == 4
    assert [m["content"] for m in got["history"]][::2] == ["hello there", "second one"]
    listed = {s["session_id"]: s for s in client.get("/v1/sessions").json()["sessions"]}
    assert listed[sid]["turns"] == 2 and listed[sid]["first_user_line"] == "hello there"

    exported = client.get(f"/v1/sessions/{sid}/export")
    assert exported.status_code == 200
    record = SessionRecord.from_dict(json.loads(exported.content))  # the library's own file format
    assert record.session_id == sid and record.turns == 2 and len(record.messages) == 4

    deleted = client.delete(f"/v1/sessions/{sid}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert_json_error(client.get(f"/v1/sessions/{sid}"), 404, "not_found")
    assert_json_error(client.post(f"/v1/sessions/{sid}/messages", json={"text": "x"}), 404)
    assert sid not in [s["session_id"] for s in client.get("/v1/sessions").json()["sessions"]]
    store_files = [p.name for p in server.sessions_dir.iterdir() if not p.name.startswith(".")]
    assert not any(record.session_id in n for n in store_files)


def test_sse_streams_pieces_then_the_result(client: httpx.Client) -> None:
    sid = new_session(client)
    text = "one two three four five six"
    with client.stream("POST", f"/v1/sessions/{sid}/messages", json={"text": text, "stream": True}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(resp.iter_lines()))
    pieces = [d["text"] for e, d in events if e == "piece"]
    assert len(pieces) >= 7  # word by word
    kind, done = events[-1]
    assert kind == "done" and done["response"] == "".join(pieces) and done["turn"] == 1
    assert done["figures"]["saved"] is True  # type: ignore[index]
    assert client.get(f"/v1/sessions/{sid}").json()["history"][-1]["content"] == "".join(pieces)


def test_disconnect_mid_stream_cancels_the_generation(server: ServiceProcess, client: httpx.Client) -> None:
    sid = new_session(client)
    client.post(f"/v1/sessions/{sid}/messages", json={"text": "first"}).raise_for_status()
    before = server.health()
    with client.stream("POST", f"/v1/sessions/{sid}/messages", json={"text": LONG, "stream": True}) as resp:
        seen = 0
        for line in resp.iter_lines():
            seen += line.startswith("event: piece")
            if seen == 3:
                break  # leaving the block closes the connection mid-reply
    wait_for(lambda: server.health()["backend_cancelled"] > before["backend_cancelled"],  # type: ignore[operator]
             what="the backend to see the cancellation")
    wait_for(lambda: server.health()["turns_cancelled"] > before["turns_cancelled"],  # type: ignore[operator]
             what="the turn to be counted as cancelled")
    got = client.get(f"/v1/sessions/{sid}").json()
    assert got["turns"] == 1 and all("word0." not in m["content"] for m in got["history"])
    # The session is free again at once, and continues from the completed turn.
    again = client.post(f"/v1/sessions/{sid}/messages", json={"text": "after"}).json()
    assert again["turn"] == 2


def test_disconnect_mid_json_turn_cancels_it(server: ServiceProcess, client: httpx.Client) -> None:
    sid = new_session(client)
    before = server.health()
    with pytest.raises(httpx.ReadTimeout):
        client.post(f"/v1/sessions/{sid}/messages", json={"text": LONG}, timeout=0.4)
    wait_for(lambda: server.health()["backend_cancelled"] > before["backend_cancelled"],  # type: ignore[operator]
             what="the backend to see the cancellation")
    assert client.get(f"/v1/sessions/{sid}").json()["turns"] == 0


def test_two_requests_on_one_session_take_turns(client: httpx.Client) -> None:
    sid = new_session(client)
    results: list[httpx.Response] = []

    def send(text: str) -> None:
        results.append(client.post(f"/v1/sessions/{sid}/messages", json={"text": text}))

    threads = [threading.Thread(target=send, args=(f"question {i} " + "pad " * 20,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.json()["turn"] for r in results) == [1, 2]
    history = client.get(f"/v1/sessions/{sid}").json()["history"]
    assert [m["role"] for m in history] == ["user", "assistant"] * 2
    for user, reply in zip(history[::2], history[1::2], strict=True):  # never interleaved
        assert reply["content"].strip().endswith(user["content"].strip())


def test_busy_session_answers_409_after_the_bound(tmp_path: Path) -> None:
    with service(tmp_path / "s", "--fake-delay", "0.05", "--lock-wait", "0.3") as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        sid = c.post("/v1/sessions").json()["session_id"]
        slow: list[httpx.Response] = []
        t = threading.Thread(target=lambda: slow.append(c.post(f"/v1/sessions/{sid}/messages", json={"text": LONG})))
        t.start()
        wait_for(lambda: srv.health()["busy_sessions"] == 1, what="the slow turn to start")
        busy = c.post(f"/v1/sessions/{sid}/messages", json={"text": "me too"})
        assert_json_error(busy, 409, "busy")
        assert busy.headers["retry-after"] == "1"
        t.join()
        assert slow[0].status_code == 200
        assert c.get(f"/v1/sessions/{sid}").json()["turns"] == 1


# -- security ---------------------------------------------------------------------------------------------
def test_tokens_are_required_and_each_sees_only_its_own(server: ServiceProcess, client: httpx.Client) -> None:
    sid = new_session(client)
    client.post(f"/v1/sessions/{sid}/messages", json={"text": "secret of A"}).raise_for_status()
    with httpx.Client(base_url=server.url, timeout=10) as anon:
        resp = assert_json_error(anon.get("/v1/sessions"), 401, "unauthorized")
        assert resp
        assert anon.get("/v1/sessions").headers["www-authenticate"] == "Bearer"
        assert_json_error(anon.get(f"/v1/sessions/{sid}", headers=auth("wrong")), 401)
        assert_json_error(anon.post("/api/conversation/process", json={"text": "hi"}), 401)
        assert anon.get("/healthz").status_code == 200  # probes need no token
    with httpx.Client(base_url=server.url, headers=auth(TOKEN_B), timeout=10) as b:
        assert sid not in [s["session_id"] for s in b.get("/v1/sessions").json()["sessions"]]
        assert_json_error(b.get(f"/v1/sessions/{sid}"), 404, "not_found")
        assert_json_error(b.get(f"/v1/sessions/{sid}/export"), 404)
        assert_json_error(b.post(f"/v1/sessions/{sid}/messages", json={"text": "steal"}), 404)
        assert_json_error(b.delete(f"/v1/sessions/{sid}"), 404)
        ha = b.post("/api/conversation/process", json={"text": "hi", "conversation_id": sid}).json()
        assert ha["conversation_id"] != sid  # someone else's id starts a new conversation of B's own
        mine = b.post("/v1/sessions").json()["session_id"]
        assert_json_error(client.get(f"/v1/sessions/{mine}"), 404)
    got = client.get(f"/v1/sessions/{sid}").json()
    assert got["turns"] == 1 and got["history"][0]["content"] == "secret of A"


def test_refuses_to_listen_beyond_loopback_without_a_token(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "conversation_session.service", "--backend", "fake",
                           "--host", "0.0.0.0", "--port", str(free_port()), "--sessions-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={k: v for k, v in os.environ.items() if k != "CONVERSATION_SESSION_TOKENS"})
    assert proc.returncode == 2
    assert "without a token" in proc.stderr and "--token" in proc.stderr


def test_bad_input_gets_a_4xx_json_error_never_a_500(server: ServiceProcess, client: httpx.Client) -> None:
    sid = new_session(client)
    url = f"/v1/sessions/{sid}/messages"
    assert_json_error(client.post(url, content=b'{"text": "x", ', headers=JSON), 400, "bad_json")
    assert_json_error(client.post(url, content=b"\xff\xfe not utf-8", headers=JSON), 400, "bad_json")
    assert_json_error(client.post(url, json=["text"]), 400, "bad_json")
    assert_json_error(client.post(url, content=b""), 400, "bad_json")
    assert_json_error(client.post(url, json={"txt": "x"}), 400, "invalid_text")
    assert_json_error(client.post(url, json={"text": 5}), 400, "invalid_text")
    assert_json_error(client.post(url, json={"text": "   "}), 400, "invalid_text")
    assert_json_error(client.post(url, content=b'{"text": "\\ud800"}', headers=JSON), 400, "invalid_text")
    assert_json_error(client.post(url, json={"text": "a\x00b"}), 400, "invalid_text")
    assert_json_error(client.post(url, json={"text": "x", "stream": "yes"}), 400)
    assert_json_error(client.post(url, content=b"[" * 100_000 + b"]" * 100, headers=JSON), 413, "too_large")
    assert_json_error(client.post(url, json={"text": "x" * 70_000}), 413, "too_large")
    assert_json_error(client.post(url, json={"text": "é" * 9000}), 413, "too_large")  # 18 KB of UTF-8
    assert_json_error(client.post(url, content=b"[" * 50_000, headers=JSON), 400, "bad_json")  # deep nesting
    # A body larger than announced, or sent without a length, is cut at the limit too.
    chunks = (b"x" * 16_384 for _ in range(8))
    assert_json_error(client.post(url, content=chunks, headers=JSON), 413, "too_large")
    for hostile in ("..", "a*b", "x" * 200, "%2e%2e%2fetc%2fpasswd", "session_1;rm", "%00"):
        resp = client.get(f"/v1/sessions/{hostile}")
        assert resp.status_code in (400, 404), (hostile, resp.status_code)
        assert_json_error(resp, resp.status_code)
    assert_json_error(client.get("/v1/sessions/../../etc/passwd"), 404)
    assert_json_error(client.put(f"/v1/sessions/{sid}"), 405, "method_not_allowed")
    assert_json_error(client.get("/nowhere"), 404)
    assert_json_error(client.post("/api/conversation/process", json={"text": "x", "conversation_id": "../x"}), 400)
    assert_json_error(client.post("/api/conversation/process", json={"text": "x", "language": 7}), 400)
    # None of that hurt the session or the server.
    assert client.post(url, json={"text": "fine"}).json()["turn"] == 1
    assert not any(line.get("status") == 500 for line in server.log_lines())


def test_rate_limit_per_token(tmp_path: Path) -> None:
    with service(tmp_path / "s", "--token", TOKEN_A, "--token", TOKEN_B, "--rate", "1", "--burst", "3") as srv:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            codes = [c.get("/v1/sessions", headers=auth(TOKEN_A)).status_code for _ in range(5)]
            assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
            limited = c.get("/v1/sessions", headers=auth(TOKEN_A))
            assert_json_error(limited, 429, "rate_limited")
            assert int(limited.headers["retry-after"]) >= 1
            assert c.get("/v1/sessions", headers=auth(TOKEN_B)).status_code == 200  # B has its own bucket
            time.sleep(1.1)
            assert c.get("/v1/sessions", headers=auth(TOKEN_A)).status_code == 200


def test_request_id_is_echoed_and_logged(server: ServiceProcess, client: httpx.Client) -> None:
    sid = new_session(client)
    resp = client.post(f"/v1/sessions/{sid}/messages", json={"text": "log me"}, headers={"X-Request-ID": "dev-42.a"})
    assert resp.headers["x-request-id"] == "dev-42.a"
    made = client.get("/v1/sessions", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"]
    assert made != "bad id\twith spaces" and len(made) == 16
    wait_for(lambda: any(line.get("request_id") == "dev-42.a" and line.get("session_id") == sid
                         and line.get("status") == 200 for line in server.log_lines()), what="the request's log line")


# -- Home Assistant ---------------------------------------------------------------------------------------
def test_home_assistant_endpoint_remembers_across_restarts(tmp_path: Path) -> None:
    sessions = tmp_path / "s"
    with service(sessions) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        first = c.post("/api/conversation/process", json={"text": "turn on the light", "language": "en"}).json()
        assert first["response"]["speech"]["plain"]["speech"].endswith("turn on the light")
        assert first["response"]["response_type"] == "action_done" and first["response"]["language"] == "en"
        assert first["continue_conversation"] is False
        cid = first["conversation_id"]
        second = c.post("/api/conversation/process", json={"text": "and the fan?", "conversation_id": cid}).json()
        assert second["conversation_id"] == cid and second["turn"] == 2
        assert second["continue_conversation"] is True  # the reply ends with a question
        kitchen = c.post("/api/conversation/process", json={"text": "hello", "conversation_id": "kitchen"}).json()
        assert kitchen["conversation_id"] == "kitchen"
        unknown = c.post("/api/conversation/process",
                         json={"text": "hi", "conversation_id": "01J0000000000000000000000A"}).json()
        assert unknown["conversation_id"] != "01J0000000000000000000000A" and unknown["turn"] == 1
    with service(sessions) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        third = c.post("/api/conversation/process", json={"text": "and now?", "conversation_id": cid}).json()
        assert third["conversation_id"] == cid and third["turn"] == 3
        again = c.post("/api/conversation/process", json={"text": "still me", "conversation_id": "kitchen"}).json()
        assert again["turn"] == 2
        history = c.get(f"/v1/sessions/{cid}").json()["history"]
        assert [m["content"] for m in history[::2]] == ["turn on the light", "and the fan?", "and now?"]


def test_home_assistant_timeout_speaks_one_short_sentence_in_the_requests_language(tmp_path: Path) -> None:
    """A satellite reads ``speech`` aloud: a short sentence in the request's language, never the
    library's technical message, which goes in ``data`` with the details."""
    from conversation_session.service._ha import ha_sorry

    assert ha_sorry("timeout", "zh-TW") == "抱歉，回答逾時了，請再說一遍。"
    assert ha_sorry("error", "zh_Hant_HK") == ha_sorry("error", "zh-TW") != ha_sorry("error", "zh")
    with service(tmp_path / "s", "--timeout", "0.3", "--fake-delay", "0.02") as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        spoken = {}
        for language in ("en", "zh-CN", "fr"):
            body = c.post("/api/conversation/process", json={"text": LONG, "language": language}).json()
            response = body["response"]
            assert response["response_type"] == "error" and response["language"] == language
            spoken[language] = response["speech"]["plain"]["speech"]
            data = response["data"]
            assert data["code"] == "failed_to_handle" and data["error"] == "timeout"
            assert data["timeout_s"] == 0.3 and "timeout=0.3" in data["message"]
            assert str(data["partial_response"]).startswith("Reply ")  # what was generated, not spoken
            assert body["continue_conversation"] is False
    assert spoken["en"] == "Sorry, that took too long. Please ask again."
    assert spoken["zh-CN"] == "抱歉，回答超时了，请再说一遍。"
    assert spoken["fr"] == spoken["en"]  # a language without its sentence: English
    assert all("timeout" not in text and len(text) < 60 for text in spoken.values())


# -- operations ---------------------------------------------------------------------------------------------
def test_graceful_shutdown_finishes_the_running_turn_and_flushes(tmp_path: Path) -> None:
    srv = ServiceProcess(tmp_path / "s", "--fake-delay", "0.01")
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            sid = c.post("/v1/sessions").json()["session_id"]
            c.post(f"/v1/sessions/{sid}/messages", json={"text": "one"}).raise_for_status()
            out: list[httpx.Response] = []
            t = threading.Thread(target=lambda: out.append(
                c.post(f"/v1/sessions/{sid}/messages", json={"text": "w " * 60})))
            t.start()
            wait_for(lambda: srv.health()["busy_sessions"] == 1, what="the turn to start")
            srv.proc.send_signal(signal.SIGTERM)
            t.join()
            assert out[0].status_code == 200 and out[0].json()["turn"] == 2  # finished within the grace
    finally:
        assert srv.stop() == 0
    # Closed cleanly: the journal was folded into the snapshot and removed.
    files = sorted(p.name for p in (tmp_path / "s").iterdir() if not p.name.startswith("."))
    assert len(files) == 1 and files[0].endswith(".json"), files
    data = json.loads((tmp_path / "s" / files[0]).read_text())
    assert data["turns"] == 2
    assert any(line.get("msg") == "stopped: sessions closed and flushed" for line in srv.log_lines())


@pytest.mark.parametrize("flag", [None, "json"])
def test_the_log_is_plain_lines_on_a_terminal_and_json_when_asked(tmp_path: Path, flag: str | None) -> None:
    """On an interactive terminal (a real pty) the service logs plain lines; ``--log-format json``
    keeps JSON lines there too (and elsewhere JSON is the default: the other tests read it)."""
    import pexpect

    port = free_port()
    args = ["-m", "conversation_session.service", "--backend", "fake", "--port", str(port),
            "--sessions-dir", str(tmp_path / "s"), *(["--log-format", flag] if flag else [])]
    child = pexpect.spawn(sys.executable, args, cwd=str(ROOT), env=dict(os.environ), encoding="utf-8", timeout=30)
    try:
        child.expect(r"serving on http://127\.0\.0\.1:\d+[^\r\n]*")
        line = child.before.rsplit("\n", 1)[-1] + child.after
        child.expect("ready: backend")
        httpx.get(f"http://127.0.0.1:{port}/v1/sessions", headers={"X-Request-ID": "tty-1"}, timeout=5)
        child.expect("GET /v1/sessions 200")
        request_line = child.before.rsplit("\n", 1)[-1] + child.after + child.readline()
    finally:
        child.kill(signal.SIGTERM)
        child.expect(pexpect.EOF)
        child.close()
    if flag == "json":
        assert json.loads(line.strip())["msg"].startswith("serving on")
        assert json.loads(request_line.strip())["request_id"] == "tty-1"
    else:
        assert not line.lstrip().startswith("{") and " INFO " in line, line
        assert "request tty-1" in request_line and not request_line.lstrip().startswith("{"), request_line


def test_not_ready_while_the_backend_is_missing(tmp_path: Path) -> None:
    srv = ServiceProcess(tmp_path / "s", "--model", str(tmp_path / "missing.gguf"), backend="llama-cpp", wait=False)
    try:
        wait_for(lambda: b"could not start" in srv.log_path.read_bytes(), timeout=60, what="the failed start")
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            assert c.get("/healthz").json()["ready"] is False
            body = assert_json_error(c.get("/readyz"), 503, "not_ready")
            assert "missing.gguf" in body["error"]["message"]  # type: ignore[index]
            sid = c.post("/v1/sessions").json()["session_id"]
            assert_json_error(c.post(f"/v1/sessions/{sid}/messages", json={"text": "hi"}), 503, "not_ready")
    finally:
        srv.stop()


@pytest.mark.model
def test_real_embedded_model_through_the_service(tmp_path: Path) -> None:
    with service(tmp_path / "s", "--max-tokens", "8", backend="llama-cpp") as srv, \
            httpx.Client(base_url=srv.url, timeout=120) as c:
        assert c.get("/readyz").json()["backend"] == "llama-cpp"
        sid = c.post("/v1/sessions").json()["session_id"]
        first = c.post(f"/v1/sessions/{sid}/messages", json={"text": "Say hello."}).json()
        assert first["response"].strip() and first["figures"]["saved"] is True
        assert 0 < first["figures"]["completion_tokens"] <= 8
        with c.stream("POST", f"/v1/sessions/{sid}/messages", json={"text": "Again.", "stream": True}) as resp:
            events = list(sse_events(resp.iter_lines()))
        assert events[-1][0] == "done" and events[-1][1]["turn"] == 2
        assert events[-1][1]["figures"]["cached_tokens"] > 0  # type: ignore[index,operator]
        assert c.get(f"/v1/sessions/{sid}").json()["turns"] == 2


@pytest.mark.model
def test_serve_kv_type_sets_the_embedded_models_kv_cells(tmp_path: Path) -> None:
    with service(tmp_path / "s", "--max-tokens", "4", "--kv-type", "q8_0", backend="llama-cpp") as srv, \
            httpx.Client(base_url=srv.url, timeout=120) as c:
        sid = c.post("/v1/sessions").json()["session_id"]
        assert c.post(f"/v1/sessions/{sid}/messages", json={"text": "Say hello."}).json()["figures"]["saved"]
        stats = c.get(f"/v1/sessions/{sid}/stats").json()["stats"]
        assert stats["kv_cache_type"] == "q8_0"


def test_serve_kv_type_is_refused_for_a_backend_without_embedded_cells(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "conversation_session.service", "--backend", "ollama",
                           "--kv-type", "q8_0", "--sessions-dir", str(tmp_path / "s")],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2
    assert "--kv-type sets the embedded model's KV cache (--backend llama-cpp), not ollama's" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "s").exists()


def test_turn_timeout_is_a_504_and_keeps_the_history(tmp_path: Path) -> None:
    with service(tmp_path / "s", "--timeout", "0.3", "--fake-delay", "0.02") as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        sid = c.post("/v1/sessions").json()["session_id"]
        assert c.post(f"/v1/sessions/{sid}/messages", json={"text": "short"}).json()["turn"] == 1
        body = assert_json_error(c.post(f"/v1/sessions/{sid}/messages", json={"text": LONG}), 504, "timeout")
        assert str(body["error"]["partial_response"]).startswith("Reply 2:")  # type: ignore[index]
        with c.stream("POST", f"/v1/sessions/{sid}/messages", json={"text": LONG, "stream": True}) as resp:
            events = list(sse_events(resp.iter_lines()))
        assert events[-1][0] == "error" and events[-1][1]["code"] == "timeout" and events[-1][1]["status"] == 504
        assert any(kind == "piece" for kind, _ in events)
        assert c.get(f"/v1/sessions/{sid}").json()["turns"] == 1  # timed-out turns are not kept
        assert c.post(f"/v1/sessions/{sid}/messages", json={"text": "after"}).json()["turn"] == 2


def test_the_chat_command_serves_too(tmp_path: Path) -> None:
    """``python main.py serve`` (the README's command) runs the same service."""
    with service(tmp_path / "s", entry=("main.py", "serve")) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        sid = c.post("/v1/sessions").json()["session_id"]
        assert c.post(f"/v1/sessions/{sid}/messages", json={"text": "via main.py"}).json()["turn"] == 1


def test_a_session_can_have_its_own_system_prompt(client: httpx.Client) -> None:
    resp = client.post("/v1/sessions", json={"system_prompt": "You are the kitchen speaker."})
    assert resp.status_code == 201
    sid = resp.json()["session_id"]
    plain = new_session(client)
    for s in (sid, plain):
        client.post(f"/v1/sessions/{s}/messages", json={"text": "who are you?"}).raise_for_status()
    assert client.get(f"/v1/sessions/{sid}").json()["system_prompt"] == "You are the kitchen speaker."
    assert client.get(f"/v1/sessions/{plain}").json()["system_prompt"] is None
    exported = json.loads(client.get(f"/v1/sessions/{sid}/export").content)
    assert exported["system_prompt"] == "You are the kitchen speaker."
    assert_json_error(client.post("/v1/sessions", json={"system_prompt": 3}), 400, "invalid_text")
    assert_json_error(client.post("/v1/sessions", json={"system_prompt": "x" * 20_000}), 413)


def test_summary_memory_through_the_service(tmp_path: Path) -> None:
    """--memory summary: a conversation that outgrows the (fake) window keeps a running summary,
    visible in the session and saved in its export; every turn stays in the history."""
    filler = " ".join(["and", "some", "more", "words"] * 10)
    with service(tmp_path / "s", "--memory", "summary", "--max-tokens", "20", "--fake-context", "1500",
                 "--rate", "1000", "--burst", "1000") as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        sid = c.post("/v1/sessions").json()["session_id"]
        summary = None
        for i in range(80):
            r = c.post(f"/v1/sessions/{sid}/messages", json={"text": f"fact {i} is {i * 7} {filler}"})
            assert r.status_code == 200, r.text
            body = c.get(f"/v1/sessions/{sid}").json()
            if body.get("summary"):
                summary = body["summary"]
                break
        assert summary and "fact 0 is 0" in summary, "no summary after 80 turns"
        assert body["turns"] == i + 1 and body["memory"] == "summary"
        c.post(f"/v1/sessions/{sid}/messages", json={"text": "one more"}).raise_for_status()
        exported = json.loads(c.get(f"/v1/sessions/{sid}/export").content)
        assert exported["summary"]["text"] and exported["turns"] == i + 2
