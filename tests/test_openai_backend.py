"""The OpenAI-compatible backend against real servers on loopback.

Most tests run against llama-cpp-python's own server (``python -m llama_cpp.server``) with the
bundled SmolLM2, started once for the module.  A small recording server written here, which
speaks the same API, covers what that server cannot show: exactly what a warm-up sends,
usage with cached tokens and llama.cpp ``timings``, and failures (unknown model, HTTP 500, a
malformed or failing stream).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conversation_session import (
    BackendError,
    ConversationSession,
    HistoryStore,
    ModelNotFoundError,
    SessionError,
    SessionTimeoutError,
)
from conversation_session.backends import CancelToken
from conversation_session.backends._llama_cpp import bundled_model_path
from conversation_session.backends._openai import OpenAIBackend, normalize_base_url
from loopback_server import JSONHandler, LoopbackServer

LONG_PROMPT = "Write a long, detailed essay about the history of the Roman Empire."


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer(str):
    """The server's base URL (no /v1), and its log."""

    def __new__(cls, url: str, log: Any) -> LlamaServer:
        obj = super().__new__(cls, url)
        obj.log = log
        return obj

    def log_text(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


@pytest.fixture(scope="module")
def llama_server():
    """``python -m llama_cpp.server`` with the bundled model, n_ctx 2048 (a ``LlamaServer``)."""
    if importlib.util.find_spec("llama_cpp.server") is None or importlib.util.find_spec("uvicorn") is None:
        pytest.skip("llama-cpp-python[server] is not installed")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(bundled_model_path()), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "2048",
         # One thread: on a shared two-core machine llama.cpp's spinning worker threads make a
         # prompt evaluation 20-40 times slower as soon as another process wants a core.
         "--n_threads", "1", "--n_threads_batch", "1"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                log.seek(0)
                tail = log.read()[-3000:].decode(errors="replace")
                pytest.fail(f"llama_cpp.server exited ({proc.returncode}):\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail("llama_cpp.server did not answer /v1/models within 90 s")
            time.sleep(0.1)
        yield LlamaServer(url, log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# -- a recording OpenAI-compatible server ------------------------------------------------

class Recorder(LoopbackServer[dict[str, Any]]):
    """Streams ``Hello from the recorder.`` word by word; records every chat request.

    ``delay``: seconds before answering (no headers meanwhile; gives up if the client goes).
    ``fault``: ``http500``, ``not_found``, ``malformed`` or ``error`` (mid-stream).
    ``old_server``: rejects ``stream_options``, reports no usage, and does not stream.
    ``tool_script``: replies to requests that offer ``tools``: each a list of ``(name, arguments)``
    streamed as ``tool_calls`` deltas (the arguments' JSON text in two pieces), as OpenAI does.
    Usage counts words; ``cached_tokens`` is the common prefix with the previous request.
    """

    def __init__(self) -> None:
        super().__init__(_RecorderHandler)
        self.models = [{"id": "tiny-model", "object": "model", "meta": {"n_ctx_train": 8192}},
                       {"id": "other-model", "object": "model"}]
        self.props_n_ctx: int | None = 3000
        self.delay = 0.0
        self.fault: str | None = None
        self.old_server = False  # rejects stream_options, sends no usage, ignores stream=true
        self.tool_script: list[list[tuple[str, dict[str, Any]]]] = []
        self._cache: list[str] = []


class _RecorderHandler(JSONHandler):
    server: Recorder

    def _event(self, data: str) -> None:
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def _client_gone(self) -> bool:
        if not select.select([self.connection], [], [], 0)[0]:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": self.server.models})
        elif self.path == "/props" and self.server.props_n_ctx:
            self.send_json(200, {"default_generation_settings": {"n_ctx": self.server.props_n_ctx}, "total_slots": 1})
        else:
            self.send_json(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})

    def do_POST(self) -> None:
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        record: dict[str, Any] = {"body": body, "authorization": self.headers.get("Authorization"),
                                  "disconnected": False, "done_at": None}
        words = [w for m in body["messages"] for w in [f"<{m['role']}>", *(m.get("content") or "").split()]]
        with srv.lock:
            srv.chats.append(record)
            cached = 0
            while cached < min(len(words) - 1, len(srv._cache)) and srv._cache[cached] == words[cached]:
                cached += 1
            srv._cache = words
        try:
            deadline = time.monotonic() + srv.delay
            while time.monotonic() < deadline:
                if self._client_gone():
                    record["disconnected"] = True
                    self.close_connection = True
                    return
                time.sleep(0.005)
            if srv.fault == "http500":
                self.send_json(500, {"error": {"code": 500, "message": "slot unavailable: KV cache is full",
                                           "type": "server_error"}})
                return
            if srv.fault == "not_found":
                self.send_json(404, {"error": {"message": f"The model `{body['model']}` does not exist",
                                           "type": "invalid_request_error", "code": "model_not_found"}})
                return
            if srv.old_server and "stream_options" in body:
                self.send_json(400, {"error": {"message": "Unrecognized request argument supplied: stream_options",
                                           "type": "invalid_request_error"}})
                return
            reply = "Hello from the recorder.".split(" ")[: body.get("max_tokens") or None]
            usage = {"prompt_tokens": len(words), "completion_tokens": len(reply),
                     "total_tokens": len(words) + len(reply), "prompt_tokens_details": {"cached_tokens": cached}}
            timings = {"cache_n": cached, "prompt_n": len(words) - cached, "prompt_ms": 20.0,
                       "predicted_n": len(reply), "predicted_ms": 40.0}
            if not body.get("stream") or srv.old_server:
                answer = {"object": "chat.completion", "model": body["model"],
                          "choices": [{"index": 0, "finish_reason": "length",
                                       "message": {"role": "assistant", "content": " ".join(reply)}}]}
                if not srv.old_server:
                    answer.update(usage=usage, timings=timings)
                self.send_json(200, answer)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            self.wfile.write(b": ping\n\n")
            if body.get("tools") and srv.tool_script:
                for index, (name, args) in enumerate(srv.tool_script.pop(0)):
                    text = json.dumps(args)
                    first = {"index": index, "id": f"call_srv{index}", "type": "function",
                             "function": {"name": name, "arguments": ""}}
                    for d in (first, {"index": index, "function": {"arguments": text[:len(text) // 2]}},
                              {"index": index, "function": {"arguments": text[len(text) // 2:]}}):
                        self._event(json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [d]}}]}))
                self._event(json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}))
                self._event("[DONE]")
                return
            for i, word in enumerate(reply):
                delta = {"content": word if i == 0 else " " + word}
                self._event(json.dumps({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}))
                if i == 1 and srv.fault == "malformed":
                    self._event("{not json")
                    return
                if i == 1 and srv.fault == "error":
                    self._event(json.dumps({"error": {"message": "the model crashed", "type": "server_error"}}))
                    return
            self._event(json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                                    "timings": timings}))
            if (body.get("stream_options") or {}).get("include_usage"):
                self._event(json.dumps({"choices": [], "usage": usage}))
            self._event("[DONE]")
        except OSError:
            record["disconnected"] = True
        finally:
            record["done_at"] = time.monotonic()


@pytest.fixture
def recorder():
    srv = Recorder().start()
    yield srv
    srv.stop()


# -- against llama_cpp.server ------------------------------------------------------------

def test_multi_turn_conversation_with_usage_figures(llama_server, sessions_dir):
    pieces: list[str] = []
    # The base URL is accepted without /v1; no model: the one /v1/models lists.
    with ConversationSession(backend="openai", base_url=llama_server, max_tokens=12, temperature=0) as s:
        assert s.llm_model.endswith(".gguf")
        r1 = s.chat("Hello, my name is Bob.", on_token=pieces.append)
        r2 = s.chat("What is my name?")
        stats = s.get_cache_stats()
    assert r1.response and "".join(pieces) == r1.response and r2.response
    for r in (r1, r2):
        # llama-cpp-python streams one token a chunk and no usage: the chunks are counted.
        assert 0 < r.completion_tokens <= 12
        assert r.finish_reason in ("stop", "length")
        assert r.ttft_s is not None and r.ttft_s < r.total_s
    assert stats["backend"] == "openai" and stats["base_url"] == llama_server + "/v1"
    assert stats["n_ctx"] == 4096 and stats["n_ctx_source"] == "default"  # this server does not say
    assert HistoryStore(sessions_dir).load(s.session_id).turns == 2


def test_timeout_mid_reply_stops_the_server(llama_server, sessions_dir):
    with ConversationSession(backend="openai", base_url=llama_server + "/v1", max_tokens=1500, temperature=0,
                             timeout=1.0, backend_options={"context_length": 2048}) as s:
        # The prompt into the server's cache first, so the reply is well under way at the deadline
        # even on a busy machine.
        s.backend.warm([{"role": "user", "content": LONG_PROMPT}], CancelToken())
        disconnects = llama_server.log_text().count("Disconnected from client")
        t0 = time.monotonic()
        with pytest.raises(SessionTimeoutError) as info:
            s.chat(LONG_PROMPT)  # 1,500 tokens: 20 s or more if the server went on
        assert time.monotonic() - t0 < 2.5
        assert info.value.partial_response
        assert s.turns == 0
        s.max_tokens, s.timeout = 4, 30
        result = s.chat("Hi")
    # Served at once (a loose bound: the machine may be busy), not after the abandoned reply;
    # and the server's own log says it saw the client go.
    assert result.ttft_s < 3.0, result.ttft_s
    assert llama_server.log_text().count("Disconnected from client") > disconnects
    assert HistoryStore(sessions_dir).load(s.session_id).turns == 1


def test_trimming_to_a_small_context_length(llama_server, sessions_dir):
    with ConversationSession(backend="openai", base_url=llama_server, max_tokens=2, temperature=0,
                             backend_options={"context_length": 200}) as s:
        assert s.backend.context_length() == 200
        for i in range(6):
            s.chat(f"Note {i}: " + "the quick brown fox jumps over the lazy dog " * 3)
        assert s.get_cache_stats()["trimmed_turns"] > 0
        assert s.get_cache_stats()["n_ctx_source"] == "setting"
    assert HistoryStore(sessions_dir).load(s.session_id).turns == 6


def test_a_prompt_over_the_servers_window_is_an_error_that_teaches_the_window(llama_server, sessions_dir):
    # The server does not say its window (2048); the backend assumes 4096 until told.
    with ConversationSession(backend="openai", base_url=llama_server, max_tokens=8, temperature=0) as s:
        s.chat("Hi")
        huge = "word " * 2100  # about 2,100 tokens; our estimate says 3,500
        with pytest.raises(BackendError, match=r"HTTP 400 .*maximum context length is 2048") as info:
            s.chat(huge)
        assert "send the message again" in str(info.value)
        assert s.backend.context_length() == 2048 and s.turns == 1
        with pytest.raises(SessionError, match="too long"):  # now caught before it is sent
            s.chat(huge)
        assert s.chat("Still there?").turn == 2


def test_warm_resume_loads_the_history_into_the_server(llama_server, sessions_dir):
    opts = {"backend": "openai", "base_url": llama_server, "max_tokens": 8, "temperature": 0}
    with ConversationSession(**opts) as s:
        s.chat("My favourite colour is green. " * 10)
        s.chat("And my favourite animal is the otter. " * 10)
        session_id = s.session_id
    with ConversationSession(**opts) as s:
        s.chat("Something else entirely, to push the history out of the server's cache.")
        t0 = time.monotonic()
        assert s.load_history(session_id)
        assert time.monotonic() - t0 < 0.2  # the warm-up runs in the background
        result = s.chat("What is my favourite colour?")  # waits for the warm-up first
        stats = s.get_cache_stats()
    assert stats["warmup"] == "done"
    assert stats["warmup_prompt_tokens"] > 150  # the server computed the restored history
    assert result.response


# -- failures ----------------------------------------------------------------------------

def test_server_down_fails_fast_and_names_the_url(sessions_dir):
    url = f"http://127.0.0.1:{_free_port()}/v1"
    t0 = time.monotonic()
    with pytest.raises(BackendError, match=r"cannot connect .*llama_cpp.server") as info:
        ConversationSession(backend="openai", base_url=url)  # no model: /v1/models is asked now
    assert url in str(info.value)
    with ConversationSession("some-model", backend="openai", base_url=url, timeout=60) as s:
        with pytest.raises(BackendError, match="cannot connect") as info:
            s.chat("hi")
        assert url in str(info.value) and s.turns == 0
    assert time.monotonic() - t0 < 3


def test_base_url_is_required():
    with pytest.raises(BackendError, match=r"--base-url .*http://127.0.0.1:8080/v1"):
        ConversationSession(backend="openai")


def test_base_url_forms():
    assert normalize_base_url("http://h:8080") == "http://h:8080/v1"
    assert normalize_base_url("http://h:8080/v1/") == "http://h:8080/v1"
    assert normalize_base_url("127.0.0.1:8080") == "http://127.0.0.1:8080/v1"
    assert normalize_base_url("https://api.example.com/openai") == "https://api.example.com/openai/v1"
    assert normalize_base_url("https://g.example.com/v1beta/openai/") == "https://g.example.com/v1beta/openai"


def test_unknown_model_names_it_and_what_the_server_serves(recorder):
    recorder.fault = "not_found"
    with ConversationSession("gpt-9", backend="openai", base_url=recorder.url) as s:
        with pytest.raises(ModelNotFoundError, match=r"'gpt-9'.*does not exist.*tiny-model, other-model") as info:
            s.chat("hi")
    assert info.value.model == "gpt-9"


@pytest.mark.parametrize(("fault", "message"), [
    ("http500", r"HTTP 500 to /v1/chat/completions: slot unavailable: KV cache is full"),
    ("malformed", r"malformed stream: '\{not json' is not JSON"),
    ("error", r"failed mid-reply: the model crashed"),
])
def test_server_failures_are_backend_errors_and_keep_the_history(recorder, sessions_dir, fault, message):
    with ConversationSession(backend="openai", base_url=recorder.url, timeout=30) as s:
        s.chat("hello")
        recorder.fault = fault
        t0 = time.monotonic()
        with pytest.raises(BackendError, match=message) as info:
            s.chat("this one fails")
        assert time.monotonic() - t0 < 2
        assert recorder.url in str(info.value)
        recorder.fault = None
        assert s.chat("and now?").turn == 2
    assert HistoryStore(sessions_dir).load(s.session_id).turns == 2


# -- what is sent and read (recording server) -------------------------------------------

def test_request_usage_timings_context_window_and_api_key(recorder, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local-test")
    with ConversationSession(backend="openai", base_url=recorder.url, max_tokens=3, temperature=0.2) as s:
        assert s.llm_model == "tiny-model"
        r1 = s.chat("one two three")
        r2 = s.chat("four")
        stats = s.get_cache_stats()
    body = recorder.chats[-1]["body"]
    assert recorder.chats[-1]["authorization"] == "Bearer sk-local-test"
    assert body["model"] == "tiny-model" and body["stream"] is True and body["max_tokens"] == 3
    assert body["temperature"] == 0.2 and body["stream_options"] == {"include_usage": True}
    assert r1.response == "Hello from the"
    assert (r1.prompt_tokens, r1.cached_tokens, r1.completion_tokens) == (4, 0, 3)
    # The recorder caches the previous prompt (4 words), not the reply it generated.
    assert r2.prompt_tokens == 10 and r2.cached_tokens == 4 and r2.finish_reason == "stop"
    # /props says 3000 (what is allocated), /v1/models 8192 (trained): the smaller one counts.
    assert stats["n_ctx"] == 3000 and stats["n_ctx_source"] == "server"
    assert stats["prompt_eval_tokens"] == 6 and stats["prompt_tokens_per_s"] == 300.0
    assert stats["server_tokens_per_s"] == 75.0
    assert stats["total_cached_tokens"] == 4
    backend = OpenAIBackend("tiny-model", base_url=recorder.url + "/v1", context_length=1000, api_key="")
    assert backend.context_length() == 1000 and backend.context_length_source == "setting"
    backend.close()


def test_warm_resume_sends_the_history_with_max_tokens_1_without_blocking(recorder, sessions_dir):
    with ConversationSession(backend="openai", base_url=recorder.url, system_prompt="Be brief.") as s:
        s.chat("my name is Ana")
        s.chat("I live in Lisbon")
        session_id, history = s.session_id, s.history
    recorder.delay = 1.0  # a slow prompt computation
    with ConversationSession(backend="openai", base_url=recorder.url, system_prompt="Be brief.") as s:
        t0 = time.monotonic()
        assert s.load_history(session_id)
        assert time.monotonic() - t0 < 0.25
        warm = recorder.wait_for_chat(3)
        recorder.delay = 0.0
        assert warm["body"]["max_tokens"] == 1 and warm["body"]["stream"] is False
        assert warm["body"]["messages"] == [{"role": "system", "content": "Be brief."}, *history]
        result = s.chat("where do I live?")  # waits for the warm-up
        stats = s.get_cache_stats()
    assert stats["warmup"] == "done"
    # 23 words of history, of which the last turn's prompt (18) was still in the server's cache.
    assert stats["warmup_prompt_tokens"] == 23 and stats["warmup_cached_tokens"] == 18
    assert result.cached_tokens == 23  # the whole restored history came from the server's cache


def test_warm_up_stops_at_once_when_the_session_closes(recorder, sessions_dir):
    with ConversationSession(backend="openai", base_url=recorder.url) as s:
        s.chat("hello")
        session_id = s.session_id
    recorder.delay = 5.0
    s = ConversationSession(backend="openai", base_url=recorder.url)
    assert s.load_history(session_id)
    warm = recorder.wait_for_chat(2)
    t0 = time.monotonic()
    s.close()
    assert time.monotonic() - t0 < 1.0
    deadline = time.monotonic() + 2
    while warm["done_at"] is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert warm["disconnected"]  # the server saw the client leave before it had answered



def test_an_older_server_without_stream_options_or_streaming(recorder):
    recorder.old_server = True
    with ConversationSession(backend="openai", base_url=recorder.url, max_tokens=3) as s:
        r1 = s.chat("hi")
        r2 = s.chat("again")
    bodies = [c["body"] for c in recorder.chats]
    assert "stream_options" in bodies[0] and "stream_options" not in bodies[1]  # retried without it
    assert "stream_options" not in bodies[-1] and len(bodies) == 3  # and remembered
    assert r1.response == r2.response == "Hello from the"  # the whole answer, as one piece
    assert r2.prompt_tokens is None and r2.cached_tokens is None and r2.completion_tokens is None


def test_the_terminal_app_on_a_real_openai_compatible_server(llama_server, sessions_dir):
    """`--backend openai --base-url ...` in the app: chat, commands, resume, as on the embedded model."""
    main = Path(__file__).resolve().parent.parent / "main.py"
    args = [sys.executable, str(main), "--backend", "openai", "--base-url", llama_server + "/v1",
            "--max-tokens", "8", "--temperature", "0"]
    first = subprocess.run(args, input="My name is Xiaoming.\nhistory\nstats\n", capture_output=True, text=True,
                           timeout=120)
    assert first.returncode == 0, first.stderr
    out = first.stdout + first.stderr  # replies on stdout, notices on stderr
    assert "1 turn(s), 2 message(s)" in out and "backend / model" in out
    assert "openai /" in out
    again = subprocess.run([*args, "--resume"], input="And my name?\nhistory\n", capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr
    assert "resumed session_" in again.stdout + again.stderr and "2 turn(s), 4 message(s)" in again.stdout


# -- on an event loop ------------------------------------------------------------------------

def test_async_cancel_mid_reply_stops_the_server_and_the_next_request_is_served(llama_server):
    """Native async streaming against llama_cpp.server: cancelling the task closes the stream,
    the server's log says it saw the client go, and the same backend serves the next request."""
    import asyncio

    from conversation_session.backends import GenerationRequest

    backend = OpenAIBackend(base_url=llama_server, context_length=2048)
    backend.warm([{"role": "user", "content": LONG_PROMPT}], CancelToken())  # the prompt cached first
    disconnects = llama_server.log_text().count("Disconnected from client")

    async def main() -> tuple[GenerationRequest, str]:
        request = GenerationRequest(messages=[{"role": "user", "content": LONG_PROMPT}], max_tokens=1500,
                                    temperature=0)
        pieces: list[str] = []

        async def consume() -> None:
            async for piece in backend.agenerate(request):
                pieces.append(piece)

        task = asyncio.create_task(consume())
        while len(pieces) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        after = GenerationRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
        t0 = time.monotonic()
        text = "".join([p async for p in backend.agenerate(after)])
        assert time.monotonic() - t0 < 3.0  # served at once, not after the abandoned reply
        return after, text

    after, text = asyncio.run(main())
    assert text and 0 < after.usage.completion_tokens <= 4
    deadline = time.monotonic() + 5
    while llama_server.log_text().count("Disconnected from client") <= disconnects and time.monotonic() < deadline:
        time.sleep(0.05)
    assert llama_server.log_text().count("Disconnected from client") > disconnects
    backend.close()


def test_async_prompt_over_the_servers_window_is_the_error_that_teaches_the_window(llama_server):
    """The async face of the empty-stream diagnosis (``_adiagnose``, the implementation the sync
    ``_diagnose`` is generated from): llama-cpp-python streams nothing for a prompt over its
    window; asked again unstreamed it names the window, which the backend learns."""
    import asyncio

    from conversation_session.backends import GenerationRequest

    backend = OpenAIBackend(base_url=llama_server)
    assert backend.context_length() == 4096  # the server does not say its window (2048), as a session asks first
    request = GenerationRequest(messages=[{"role": "user", "content": "word " * 2100}], max_tokens=8, temperature=0)

    async def main() -> list[str]:
        return [p async for p in backend.agenerate(request)]

    with pytest.raises(BackendError, match=r"HTTP 400 .*maximum context length is 2048"):
        asyncio.run(main())
    assert backend.context_length() == 2048
    backend.close()


def test_a_window_learnt_before_it_was_ever_asked_is_the_servers_own(llama_server):
    """A fresh backend (its window never asked) told "2048" by the server keeps 2048, not 90 %
    of it: the margin is for a window it already trimmed to and still overflowed."""
    from conversation_session.backends import GenerationRequest

    backend = OpenAIBackend(base_url=llama_server)
    request = GenerationRequest(messages=[{"role": "user", "content": "word " * 2100}], max_tokens=8, temperature=0)
    with pytest.raises(BackendError, match=r"HTTP 400 .*maximum context length is 2048"):
        list(backend.generate(request))
    assert backend.context_length() == 2048
    backend.close()


def test_async_cancel_before_the_first_byte_and_check(recorder):
    import asyncio

    from conversation_session.backends import GenerationRequest

    backend = OpenAIBackend("tiny-model", base_url=recorder.url)
    backend.check()
    asyncio.run(backend.acheck())
    recorder.delay = 5.0  # computing a long prompt: no headers yet

    async def main() -> None:
        request = GenerationRequest(messages=[{"role": "user", "content": "hi"}])
        task = asyncio.create_task(_acollect(backend, request))
        while not recorder.chats:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    t0 = time.monotonic()
    asyncio.run(main())
    record = recorder.chats[-1]
    while record["done_at"] is None and time.monotonic() - t0 < 2:
        time.sleep(0.01)
    assert record["disconnected"] and record["done_at"] - t0 < 1.0
    recorder.delay = 0.0
    request = GenerationRequest(messages=[{"role": "user", "content": "one two"}], max_tokens=3, cache_key="s1")
    assert asyncio.run(_acollect(backend, request)) == "Hello from the"
    assert (request.usage.prompt_tokens, request.usage.completion_tokens) == (3, 3)
    assert backend.cache_stats(cache_key="s1")["prompt_eval_tokens"] == 3 - request.usage.cached_tokens
    backend.close()


async def _acollect(backend: OpenAIBackend, request: Any) -> str:
    return "".join([p async for p in backend.agenerate(request)])


def test_sampling_options_are_sent(recorder):
    backend = OpenAIBackend("tiny-model", base_url=recorder.url, seed=3, top_k=10)
    from conversation_session.backends import GenerationRequest

    request = GenerationRequest(messages=[{"role": "user", "content": "hi"}], options={"top_p": 0.9})
    assert "".join(backend.generate(request)) == "Hello from the recorder."
    body = recorder.chats[-1]["body"]
    assert (body["seed"], body["top_k"], body["top_p"]) == (3, 10, 0.9)
    backend.close()


def test_tool_calls_streamed_as_deltas_are_assembled_and_sent_back(recorder, tmp_path):
    runs: list[dict] = []

    def set_light(room: str, on: bool) -> str:
        """Switch a room's light."""
        runs.append({"room": room, "on": on})
        return "ok"

    recorder.tool_script = [[("set_light", {"room": "厨房", "on": True}), ("set_light", {"room": "hall", "on": False})]]
    with ConversationSession("tiny-model", backend="openai", base_url=recorder.url, tools=[set_light]) as s:
        result = s.chat("lights")
        assert runs == [{"room": "厨房", "on": True}, {"room": "hall", "on": False}]
        assert [c["id"] for c in result.tool_calls] == ["call_srv0", "call_srv1"]
        assert result.response == "Hello from the recorder."
        first, second = recorder.chats[-2]["body"], recorder.chats[-1]["body"]
        assert first["tools"][0]["function"]["name"] == "set_light"
        sent = second["messages"]
        assert sent[1]["tool_calls"][0] == {"id": "call_srv0", "type": "function", "function": {
            "name": "set_light", "arguments": json.dumps({"room": "厨房", "on": True}, ensure_ascii=False)}}
        assert sent[2] == {"role": "tool", "tool_call_id": "call_srv0", "content": "ok"}
        assert [m["role"] for m in s.history] == ["user", "assistant", "tool", "tool", "assistant"]


@pytest.mark.parametrize(("choice", "sent"), [
    (None, None), ("auto", None), ("required", "required"),
    ("set_light", {"type": "function", "function": {"name": "set_light"}}), ("none", "no tools")])
def test_tool_choice_reaches_the_server_as_openai_spells_it(recorder, choice, sent):
    """``chat(tool_choice=...)`` is sent on (a forced call is the server's to enforce); "none"
    offers no tools at all, "auto" is the API's default and is not sent."""

    def set_light(room: str) -> str:
        """Switch a room's light."""
        return "ok"

    with ConversationSession("tiny-model", backend="openai", base_url=recorder.url, tools=[set_light]) as s:
        s.chat("lights", tool_choice=choice)
        body = recorder.chats[-1]["body"]
    if sent == "no tools":
        assert "tools" not in body and "tool_choice" not in body
    else:
        assert body["tools"][0]["function"]["name"] == "set_light"
        assert body.get("tool_choice") == sent

