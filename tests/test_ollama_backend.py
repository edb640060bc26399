"""The Ollama backend against a local server that speaks Ollama's REST API (see ollama_api_server)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conversation_session import (
    BackendError,
    ConversationSession,
    HistoryStore,
    ModelNotFoundError,
    SessionTimeoutError,
)
from ollama_api_server import OllamaAPIServer


@pytest.fixture
def server():
    srv = OllamaAPIServer().start()
    yield srv
    srv.stop()


def test_streams_the_whole_history_and_saves(server, sessions_dir):
    pieces = []
    with ConversationSession(backend="ollama", base_url=server.url, max_tokens=64) as s:
        assert s.llm_model == "qwen2.5:3b"  # the seed's model is the default
        r1 = s.chat("我叫小明", on_token=pieces.append)
        r2 = s.chat("我叫什么名字？")
    assert r1.response == "You said: 我叫小明. I remember 1 messages."
    assert len(pieces) > 3 and "".join(pieces) == r1.response
    assert r2.response.endswith("I remember 3 messages.")
    sent = server.chats[-1].body
    assert sent["model"] == "qwen2.5:3b" and sent["stream"] is True
    assert [m["content"] for m in sent["messages"]] == ["我叫小明", r1.response, "我叫什么名字？"]
    assert sent["options"]["num_ctx"] == 4096 and sent["options"]["num_predict"] == 64
    # Figures from Ollama's final chunk; the server's prompt cache served the first turn.
    assert r2.prompt_tokens == server.chats[-1].prompt_eval_count
    assert r2.completion_tokens == len(r2.response.split(" "))
    assert not any(c.truncated for c in server.chats)
    assert HistoryStore(sessions_dir).load(s.session_id).turns == 2


def test_timeout_closes_the_stream_and_the_server_stops(server, sessions_dir):
    server.token_delay = 0.02
    with ConversationSession(backend="ollama", base_url=server.url, timeout=0.5) as s:
        s.chat("hello")
        t0 = time.monotonic()
        with pytest.raises(SessionTimeoutError) as info:
            s.chat("tell me something long")
        assert time.monotonic() - t0 < 1.5
        assert info.value.partial_response.startswith("word0")
        record = server.wait_for_chat_end()
        assert record.disconnected and not record.finished
        assert record.words_sent < 300  # it stopped generating, it did not run to the end
        assert record.done_at - t0 < 1.5
        assert s.chat("and now?").turn == 2  # the session goes on with its history
        assert next(m["content"] for m in server.chats[-1].body["messages"]) == "hello"
    assert HistoryStore(sessions_dir).load(s.session_id).turns == 2


def test_server_down_fails_fast_with_the_url_and_what_to_do(sessions_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with ConversationSession(backend="ollama", base_url=url, timeout=60) as s:
        t0 = time.monotonic()
        with pytest.raises(BackendError, match=r"cannot connect to Ollama at .*ollama serve") as info:
            s.chat("hi")
        assert url in str(info.value)
        assert time.monotonic() - t0 < 6
        assert s.turns == 0


def test_unknown_model_says_ollama_pull(server):
    with ConversationSession("llama9:70b", backend="ollama", base_url=server.url) as s:
        with pytest.raises(ModelNotFoundError, match="ollama pull llama9:70b"):
            s.chat("hi")


def test_ollama_host_environment_variable(server, monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", server.url.removeprefix("http://"))
    with ConversationSession(backend="ollama") as s:
        assert s.chat("hi").response.startswith("You said: hi")


def test_context_window_from_api_show_and_trimming(server, sessions_dir):
    server.context_length = 300  # the model supports less than the num_ctx we ask for
    with ConversationSession(backend="ollama", base_url=server.url, max_tokens=40) as s:
        for i in range(40):
            s.chat(f"message {i} " + "padding " * 10)
        assert s.get_cache_stats()["trimmed_turns"] > 0
    assert not any(c.truncated for c in server.chats)
    assert all(c.prompt_tokens <= 300 for c in server.chats)
    assert HistoryStore(sessions_dir).load(s.session_id).turns == 40


def _two_turns(url: str) -> tuple[str, list[dict[str, str]]]:
    with ConversationSession(backend="ollama", base_url=url, system_prompt="Be brief.") as s:
        s.chat("我叫小明")
        s.chat("I like tea")
        return s.session_id, s.history


def test_warm_resume_sends_the_restored_history_without_blocking(server, sessions_dir):
    session_id, history = _two_turns(server.url)
    server.token_delay = 0.5  # the warm-up's single token takes half a second
    with ConversationSession(backend="ollama", base_url=server.url, system_prompt="Be brief.") as s:
        t0 = time.monotonic()
        assert s.load_history(session_id)
        assert time.monotonic() - t0 < 0.25  # load_history does not wait for the server
        warm = server.wait_for_chat(3)
        server.token_delay = 0.0
        assert warm.body["options"]["num_predict"] == 1
        assert warm.body["keep_alive"] == "30m"
        assert warm.body["messages"] == [{"role": "system", "content": "Be brief."}, *history]
        result = s.chat("What do I like?")  # waits for the warm-up, then finds the history cached
        assert result.response.endswith("I remember 6 messages.")
        assert server.chats[-1].prompt_eval_count < 10  # only the new message was computed
        stats = s.get_cache_stats()
    assert stats["warmup"] == "done"
    assert stats["warmup_prompt_tokens"] == warm.prompt_eval_count > 0
    assert len(server.chats) == 4


def test_warm_up_stops_at_once_when_the_session_closes(server):
    session_id, _ = _two_turns(server.url)
    server.prompt_delay = 5.0  # loading the model: no headers, no bytes for five seconds
    s = ConversationSession(backend="ollama", base_url=server.url, system_prompt="Be brief.")
    assert s.load_history(session_id)
    warm = server.wait_for_chat(3)
    t0 = time.monotonic()
    s.close()
    assert time.monotonic() - t0 < 1.0
    assert server.wait_for_chat_end().disconnected  # the server saw the client go and gave up
    assert warm.done_at - t0 < 1.0


def test_keep_alive_is_sent_and_configurable(server):
    with ConversationSession(backend="ollama", base_url=server.url) as s:
        s.chat("hi")
    assert server.chats[-1].body["keep_alive"] == "30m"
    with ConversationSession(backend="ollama", base_url=server.url, backend_options={"keep_alive": -1}) as s:
        s.chat("hi")
    assert server.chats[-1].body["keep_alive"] == -1
    with ConversationSession(backend="ollama", base_url=server.url, backend_options={"keep_alive": None}) as s:
        s.chat("hi")
    assert "keep_alive" not in server.chats[-1].body  # the server's own default


def test_server_figures_in_results_and_cache_stats(server):
    with ConversationSession(backend="ollama", base_url=server.url) as s:
        s.chat("hello there")
        r = s.chat("and again")
        stats = s.get_cache_stats()
        assert r.prompt_tokens == server.chats[-1].prompt_eval_count and r.cached_tokens is None
        assert stats["model_load_s"] == 0.001  # load_duration, 1 ms on this server
        assert stats["prompt_eval_tokens"] == r.prompt_tokens
        assert stats["server_tokens_per_s"] > 0 and stats["prompt_tokens_per_s"] > 0
        assert stats["n_ctx"] == 4096 and stats["keep_alive"] == "30m"


@pytest.mark.parametrize(("fault", "message"), [
    ("http500", r"HTTP 500 to /api/chat: llama runner process has terminated: signal: killed"),
    ("malformed", r"malformed stream: Expecting property name"),
    ("error", r"failed mid-reply: an error was encountered while running the model: out of memory"),
])
def test_server_failures_are_backend_errors_and_keep_the_history(server, sessions_dir, fault, message):
    with ConversationSession(backend="ollama", base_url=server.url, timeout=30) as s:
        s.chat("hello")
        server.fault = fault
        t0 = time.monotonic()
        with pytest.raises(BackendError, match=message) as info:
            s.chat("this one fails")
        assert time.monotonic() - t0 < 2
        assert server.url in str(info.value)
        assert s.turns == 1
        server.fault = None
        assert s.chat("and now?").turn == 2
    assert [m["content"] for m in HistoryStore(sessions_dir).load(s.session_id).messages][::2] == ["hello", "and now?"]


def test_the_terminal_app_on_ollama(server, sessions_dir):
    """`--backend ollama` in the app: streamed replies, commands, resume, errors as one line
    (replies on stdout, notices and errors on stderr)."""
    main = Path(__file__).resolve().parent.parent / "main.py"
    args = [sys.executable, str(main), "--backend", "ollama", "--base-url", server.url]
    first = subprocess.run(args, input="我叫小明\nhistory\nstats\n", capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    out = first.stdout + first.stderr
    assert "You said: 我叫小明. I remember 1 messages." in first.stdout
    assert "1 turn(s), 2 message(s)" in out and "ollama / qwen2.5:3b" in out
    again = subprocess.run([*args, "--resume"], input="我叫什么名字？\n", capture_output=True, text=True, timeout=60)
    assert "resumed session_" in again.stdout + again.stderr and "I remember 3 messages." in again.stdout
    missing = subprocess.run([*args, "--model", "llama9:70b"], input="hi\nquit\n", capture_output=True, text=True,
                             timeout=60)
    assert "ollama pull llama9:70b" in missing.stdout + missing.stderr
    assert (missing.stdout + missing.stderr).count("❌") == 1


def test_tool_calls_get_ids_and_go_back_to_ollama(server, sessions_dir):
    runs: list[str] = []

    def current_time() -> str:
        """The local date and time."""
        runs.append("t")
        return "2026-01-01T12:00:00+08:00"

    server.tool_script = [[("current_time", {})]]
    with ConversationSession(backend="ollama", base_url=server.url, tools=[current_time]) as s:
        result = s.chat("现在几点？")
        assert runs == ["t"] and result.tool_calls[0]["result"] == "2026-01-01T12:00:00+08:00"
        assert result.tool_calls[0]["id"].startswith("call_")  # Ollama gives none: made here
        first, second = server.chats[-2].body, server.chats[-1].body
        assert first["tools"][0]["function"]["name"] == "current_time"
        assert second["messages"][1] == {"role": "assistant", "content": "",
                                         "tool_calls": [{"function": {"name": "current_time", "arguments": {}}}]}
        assert second["messages"][2] == {"role": "tool", "content": "2026-01-01T12:00:00+08:00",
                                         "tool_name": "current_time"}
        assert result.response.startswith("You said:")
    assert HistoryStore(sessions_dir).load(s.session_id).messages[1]["tool_calls"][0]["id"] == \
        result.tool_calls[0]["id"]
