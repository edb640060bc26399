"""Tools (issue 22): a counting tool that appends a line to a file on each run, driven by the
scripted backend; the crash rule checked with kill -9 of a real process at each boundary."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Literal

import pytest

import pg_server as _pg
from conversation_session import (
    AsyncConversationSession,
    ConversationSession,
    FakeBackend,
    SessionRecord,
    SessionTimeoutError,
    ToolCalls,
    tool,
)
from conversation_session.tools import UNKNOWN_OUTCOME

pg_server = _pg.pg_server
pg_url = _pg.pg_url


class Counter:
    """A tool with a side effect you can count: each run appends one line (fsynced) to a file."""

    def __init__(self, path: Path, sleep: float = 0.0, fail: BaseException | None = None):
        self.path, self.sleep, self.fail = path, sleep, fail

    def runs(self) -> list[str]:
        return self.path.read_text().splitlines() if self.path.exists() else []

    def as_tool(self, **how):
        def count(label: str, times: int = 1) -> str:
            """Count something once.

            Args:
                label: what is counted
                times: how many
            """
            with open(self.path, "a") as f:
                f.write(f"{label}\n")
                f.flush()
                os.fsync(f.fileno())
            if self.sleep:
                time.sleep(self.sleep)
            if self.fail is not None:
                raise self.fail
            return f"counted {label} x{times}"
        return tool(count, **how)


def _check_history(messages: list[dict]) -> tuple[list[str], dict[str, int]]:
    """Every call has exactly one result, placed after it and before the next user message;
    returns (the call ids, results per id)."""
    calls: list[str] = []
    results: dict[str, int] = {}
    open_calls: set[str] = set()
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            ids = [c["id"] for c in m["tool_calls"]]
            calls += ids
            open_calls |= set(ids)
        elif m["role"] == "tool":
            assert m["tool_call_id"] in open_calls or m["tool_call_id"] in results, m
            results[m["tool_call_id"]] = results.get(m["tool_call_id"], 0) + 1
            open_calls.discard(m["tool_call_id"])
        elif m["role"] == "user":
            assert not open_calls, f"orphan calls {open_calls} before a user message"
    assert not open_calls, f"orphan calls {open_calls}"
    assert all(results.get(c) == 1 for c in calls), results
    return calls, results


def test_the_schema_comes_from_the_hints_and_the_docstring():
    def set_light(room: str, on: bool, level: float | None = None, mode: Literal["warm", "cold"] = "warm",
                  tags: list[str] | None = None) -> str:
        """Switch a light.

        Args:
            room: the room's name
            on: on or off
            level: brightness from 0 to 1
        """
        return "ok"

    t = tool(set_light, idempotent=True, timeout_s=2)
    fn = t.schema()["function"]
    assert fn["name"] == "set_light" and fn["description"] == "Switch a light."
    props = fn["parameters"]["properties"]
    assert props["room"] == {"type": "string", "description": "the room's name"}
    assert props["on"]["type"] == "boolean" and props["level"]["type"] == "number"
    assert props["mode"] == {"enum": ["warm", "cold"], "type": "string"}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert fn["parameters"]["required"] == ["room", "on"]
    assert t.idempotent and t.timeout_s == 2.0 and t("k", True) == "ok"

    @tool(name="renamed")
    def f(x: int) -> int:
        return x

    assert f.name == "renamed" and f(3) == 3
    def star(*a: int) -> int:
        return 0

    with pytest.raises(TypeError):
        tool(star)
    with pytest.raises(ValueError):
        tool(set_light, name="has space")
    with pytest.raises(ValueError):
        tool(set_light, timeout_s=0)
    with pytest.raises(ValueError):
        ConversationSession(backend=FakeBackend(), tools=[set_light, set_light])
    with pytest.raises(ValueError):
        ConversationSession(backend=FakeBackend(), max_tool_rounds=-1)


def test_a_counting_tool_runs_once_per_call_and_the_turn_is_recorded(tmp_path, sessions_dir):
    counter = Counter(tmp_path / "runs.txt")
    fake = FakeBackend()
    fake.enqueue(ToolCalls([("count", {"label": "a"}), ("count", {"label": "b", "times": 2})], text="Let me count."))
    fake.enqueue(ToolCalls([("count", {"label": "c"})]))
    fake.enqueue(["All ", "counted."])
    with ConversationSession(backend=fake, tools=[counter.as_tool()]) as s:
        pieces: list[str] = []
        result = s.chat("count a, b and c", on_token=pieces.append)
        sid = s.session_id
        assert result.response == "All counted." and result.turn == 1 and s.turns == 1
        assert [c["name"] for c in result.tool_calls] == ["count"] * 3
        assert [c["result"] for c in result.tool_calls] == ["counted a x1", "counted b x2", "counted c x1"]
        assert all(c["duration_s"] >= 0 and c["id"].startswith("call_") for c in result.tool_calls)
        assert "".join(pieces) == "Let me count.All counted."  # text only: never a call's JSON
        assert counter.runs() == ["a", "b", "c"]
        # Each round's request carries the earlier calls and their results, and the tools.
        assert len(fake.requests) == 3 and all(r.tools for r in fake.requests)
        second = fake.requests[1].messages
        assert [m["role"] for m in second] == ["user", "assistant", "tool", "tool"]
        assert second[1]["content"] == "Let me count." and second[2]["content"] == "counted a x1"
        history = s.history
        _check_history(history)
        assert [m["role"] for m in history] == ["user", "assistant", "tool", "tool", "assistant", "tool", "assistant"]
        # The next turn sends the whole tool-using turn back.
        s.chat("thanks")
        assert [m["role"] for m in fake.requests[-1].messages][:7] == [m["role"] for m in history]
    record = SessionRecord.from_dict(json.loads((sessions_dir / f"{sid}.json").read_text()))
    assert record.turns == 2 and record.messages[:7] == history
    assert json.loads((sessions_dir / f"{sid}.json").read_text())["schema_version"] == 5


def test_tools_given_to_one_call_are_offered_for_that_call_only(tmp_path):
    counter = Counter(tmp_path / "runs.txt")

    def current_time() -> str:
        """The time."""
        return "12:00"

    fake = FakeBackend()
    fake.enqueue(ToolCalls([("current_time", {})]))
    fake.enqueue("noon")
    with ConversationSession(backend=fake, tools=[counter.as_tool()]) as s:
        assert s.chat("time?", tools=[current_time]).tool_calls[0]["result"] == "12:00"
        s.chat("again")
        offered = [sorted(t["function"]["name"] for t in r.tools or []) for r in fake.requests]
        assert offered == [["count", "current_time"], ["count", "current_time"], ["count"]]
        with pytest.raises(TypeError):
            s.chat("x", tools=current_time)  # a function, not a list: a clear error, nothing sent
        assert len(fake.requests) == 3


def test_tool_choice_forces_the_first_round_only_and_a_bad_one_sends_nothing(tmp_path):
    counter = Counter(tmp_path / "runs.txt")
    fake = FakeBackend()
    fake.enqueue(ToolCalls([("count", {"label": "a"})]))
    fake.enqueue("done")
    with ConversationSession(backend=fake, tools=[counter.as_tool()]) as s:
        assert s.chat("count a", tool_choice="count").response == "done"
        # Forcing every round would leave the model no way to answer: the second round is free.
        assert [r.tool_choice for r in fake.requests] == ["count", None]
        s.chat("hi", tool_choice="none")
        assert fake.requests[-1].tools is None and fake.requests[-1].tool_choice == "none"
        for bad in ("launch", "any", 3):
            with pytest.raises(ValueError, match="tool_choice"):
                s.chat("x", tool_choice=bad)
        assert len(fake.requests) == 3 and s.turns == 2
    with ConversationSession(backend=FakeBackend()) as s, pytest.raises(ValueError, match="none is offered"):
        s.chat("x", tool_choice="required")

    async def main() -> list:
        fake = FakeBackend()
        fake.enqueue(ToolCalls([("count", {"label": "b"})]))
        fake.enqueue("ok")
        async with AsyncConversationSession(backend=fake, tools=[counter.as_tool()]) as s:
            await s.chat("count b", tool_choice="required")
        return [r.tool_choice for r in fake.requests]

    assert asyncio.run(main()) == ["required", None]
    assert counter.runs() == ["a", "b"]


def test_a_tool_that_raises_or_outlives_its_limit_gives_the_model_an_error(tmp_path, caplog):
    slow = Counter(tmp_path / "slow.txt", sleep=1.0)
    bad = Counter(tmp_path / "bad.txt", fail=ValueError("the lamp is broken"))
    fake = FakeBackend()
    fake.enqueue(ToolCalls([("slow", {"label": "s"}), ("bad", {"label": "b"}), ("count", {"nope": 1})]))
    fake.enqueue("sorry")
    with ConversationSession(backend=fake, tools=[slow.as_tool(name="slow", timeout_s=0.2),
                                                   bad.as_tool(name="bad"), Counter(tmp_path / "c").as_tool()]) as s:
        caplog.set_level(logging.INFO, "conversation_session")
        result = s.chat("go")
        errors = [c.get("error") for c in result.tool_calls]
        assert errors[0] == "error: TimeoutError: slow did not finish within timeout_s=0.2"
        assert errors[1] == "error: ValueError: the lamp is broken"
        assert errors[2].startswith("error: TypeError:") and "nope" in errors[2]
        assert result.response == "sorry" and s.turns == 1
        sent = [m["content"] for m in fake.requests[1].messages if m["role"] == "tool"]
        assert sent == errors
        deadline = time.monotonic() + 10
        while "finished after its limit" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "not recorded: counted s x1" in caplog.text  # the late result: logged, never recorded
        _, results = _check_history(s.history)
        assert len(results) == 3
        assert slow.runs() == ["s"] and bad.runs() == ["b"]


def test_at_the_bound_the_model_is_asked_once_more_without_tools(tmp_path):
    counter = Counter(tmp_path / "runs.txt")
    fake = FakeBackend()
    for i in range(2):
        fake.enqueue(ToolCalls([("count", {"label": str(i)})]))
    fake.enqueue("enough")
    with ConversationSession(backend=fake, tools=[counter.as_tool()], max_tool_rounds=2) as s:
        result = s.chat("count for ever")
        assert [r.tools is not None for r in fake.requests] == [True, True, False]
        assert counter.runs() == ["0", "1"] and len(result.tool_calls) == 2 and result.response == "enough"
        # A model that asks for a call when none is offered: the call is ignored, its text is the reply.
        fake.enqueue(ToolCalls([("count", {"label": "x"})]))
        fake.enqueue(ToolCalls([("count", {"label": "y"})], text="I would count y."))
        result = s.chat("once", max_tool_rounds=1)
        assert [c["arguments"] for c in result.tool_calls] == [{"label": "x"}]
        assert result.response == "I would count y." and counter.runs() == ["0", "1", "x"]
        _check_history(s.history)


def test_async_tools_sync_tools_and_an_async_timeout(tmp_path):
    counter = Counter(tmp_path / "runs.txt")
    stopped: list[str] = []

    async def lookup(key: str) -> dict:
        """Look a key up."""
        await asyncio.sleep(0.01)
        return {"key": key, "value": 42}

    async def hang() -> str:
        """Never ends."""
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            stopped.append("hang")  # an async tool past its limit is cancelled, unlike a thread
            raise
        return "never"

    async def main() -> None:
        fake = FakeBackend()
        fake.enqueue(ToolCalls([("lookup", {"key": "k"}), ("count", {"label": "a"}), ("hang", {})]))
        fake.enqueue("async done")
        async with AsyncConversationSession(backend=fake, tools=[lookup, counter.as_tool(),
                                                                  tool(hang, timeout_s=0.2)]) as s:
            result = await s.chat("go")
            assert result.response == "async done"
            assert result.tool_calls[0]["result"] == '{"key": "k", "value": 42}'
            assert result.tool_calls[1]["result"] == "counted a x1"
            assert result.tool_calls[2]["error"].startswith("error: TimeoutError")
            _check_history(s.history)
            await asyncio.sleep(0.05)

    asyncio.run(main())
    assert counter.runs() == ["a"] and stopped == ["hang"]


def test_a_turn_timeout_during_a_tool_keeps_the_calls_and_drops_only_the_reply(tmp_path):
    counter = Counter(tmp_path / "runs.txt", sleep=2.0)
    fake = FakeBackend()
    fake.enqueue(ToolCalls([("count", {"label": "a"}), ("count", {"label": "b"})]))
    with ConversationSession(backend=fake, tools=[counter.as_tool()], timeout=0.5) as s:
        with pytest.raises(SessionTimeoutError, match="tool call"):
            s.chat("count")
        history = s.history
        assert [m["role"] for m in history] == ["user", "assistant", "tool", "tool"]
        assert "outcome is unknown" in history[2]["content"] and "not run" in history[3]["content"]
        _check_history(history)
        assert counter.runs() == ["a"]  # b never ran
        s.timeout = 5
        fake.enqueue("next")
        assert s.chat("and now?").response == "next"
        assert [m["role"] for m in fake.requests[-1].messages] == ["user", "assistant", "tool", "tool", "user"]
        assert s.turns == 2


def test_a_timeout_in_the_final_reply_keeps_calls_and_results(tmp_path):
    counter = Counter(tmp_path / "runs.txt")
    fake = FakeBackend(piece_delay=0.3)
    fake.enqueue(ToolCalls([("count", {"label": "a"})]))
    fake.enqueue(["slow ", "reply ", "never ", "ends"])
    with ConversationSession(backend=fake, tools=[counter.as_tool()], timeout=0.5) as s:
        with pytest.raises(SessionTimeoutError):
            s.chat("count")
        assert [m["role"] for m in s.history] == ["user", "assistant", "tool"]
        assert s.history[2]["content"] == "counted a x1" and counter.runs() == ["a"]


def test_cancel_and_interrupt_during_a_tool(tmp_path):
    counter = Counter(tmp_path / "runs.txt", sleep=1.5)
    fake = FakeBackend()
    with ConversationSession(backend=fake, tools=[counter.as_tool()]) as s:
        for how in ("cancel", "interrupt"):
            fake.enqueue(ToolCalls([("count", {"label": how})]))
            turn = s.stream(how)
            got: dict = {}

            def drive(turn=turn, got=got) -> None:
                try:
                    for _ in turn:
                        pass
                    got["result"] = turn.result()
                except Exception as exc:  # noqa: BLE001
                    got["error"] = exc

            t = threading.Thread(target=drive)
            t.start()
            while counter.runs().count(how) == 0:
                time.sleep(0.02)
            if how == "cancel":
                turn.cancel()
            else:
                result = turn.interrupt()
                assert result.interrupted and result.response == "" and len(result.tool_calls) == 1
            t.join(10)
            assert not t.is_alive()
        history = s.history
        assert [m["role"] for m in history] == ["user", "assistant", "tool"] * 2
        assert all("outcome is unknown" in m["content"] for m in history if m["role"] == "tool")
        _check_history(history)
        assert s.turns == 2


def test_a_call_without_a_result_gets_one_on_load(sessions_dir):
    sessions_dir.mkdir(parents=True, exist_ok=True)
    calls = [{"id": "call_1", "type": "function", "function": {"name": "count", "arguments": {"label": "x"}}}]
    data = {"schema_version": 5, "session_id": "session_orphan", "created_at": "2026-01-01T00:00:00",
            "updated_at": "2026-01-01T00:00:00", "llm_model": "fake-model", "turns": 1,
            "conversation_history": [{"role": "user", "content": "count x"},
                                     {"role": "assistant", "content": "", "tool_calls": calls}]}
    (sessions_dir / "session_orphan.json").write_text(json.dumps(data))
    fake = FakeBackend()
    with ConversationSession(backend=fake) as s:
        assert s.load_history("session_orphan")
        assert s.history[-1] == {"role": "tool", "tool_call_id": "call_1", "name": "count",
                                 "content": UNKNOWN_OUTCOME}
        s.chat("next")
        _check_history(fake.requests[-1].messages)
    with ConversationSession(backend=FakeBackend()) as s:  # the repair was recorded, once
        assert s.load_history("session_orphan")
        assert [m["role"] for m in s.history] == ["user", "assistant", "tool", "user", "assistant"]


def test_a_schema_4_file_loads_unchanged(sessions_dir):
    sessions_dir.mkdir(parents=True, exist_ok=True)
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！", "interrupted": True},
               {"role": "user", "content": "再见"}, {"role": "assistant", "content": "再见"}]
    data = {"schema_version": 4, "session_id": "session_v4", "created_at": "2025-10-24T12:00:00",
            "updated_at": "2025-10-24T12:03:10", "llm_model": "qwen2.5:3b", "turns": 2, "title": "old",
            "undone": [{"at": "2025-10-24T12:02:00", "start": 2, "messages": history[2:]}],
            "conversation_history": history}
    (sessions_dir / "session_v4.json").write_text(json.dumps(data, ensure_ascii=False))
    with ConversationSession(backend=FakeBackend()) as s:
        assert s.load_history("session_v4")
        assert s.history == history and s.turns == 2 and s.title == "old"


def test_the_window_never_separates_a_call_from_its_result(tmp_path):
    counter = Counter(tmp_path / "runs.txt")
    fake = FakeBackend(context_length=400)
    with ConversationSession(backend=fake, tools=[counter.as_tool()], max_tokens=20) as s:
        for i in range(12):
            fake.enqueue(ToolCalls([("count", {"label": f"l{i}"}), ("count", {"label": f"m{i}"})]))
            fake.enqueue(f"counted turn {i} " + "words " * 10)
            s.chat(f"turn {i} " + "padding " * 10)
        assert s.get_cache_stats()["trimmed_turns"] > 0
        for r in fake.requests:
            sent = [m for m in r.messages if m["role"] != "system"]
            assert sent[0]["role"] == "user"  # the window starts at a user turn
            _check_history(sent)


def test_a_failed_tool_round_backend_error_keeps_what_was_done(tmp_path):
    counter = Counter(tmp_path / "runs.txt")
    fake = FakeBackend()
    fake.enqueue(ToolCalls([("count", {"label": "a"})]))
    fake.enqueue(RuntimeError("server gone"))
    with ConversationSession(backend=fake, tools=[counter.as_tool()]) as s:
        with pytest.raises(Exception, match="server gone"):
            s.chat("go")
        assert [m["role"] for m in s.history] == ["user", "assistant", "tool"] and counter.runs() == ["a"]


# -- kill -9 at each boundary ----------------------------------------------------------------
CHILD = """
import os, sys, time
from conversation_session import ConversationSession, FakeBackend, ToolCalls, tool
from conversation_session.session import _core

stage, runs_path, sid_path = sys.argv[1], sys.argv[2], sys.argv[3]
appends = []
original = _core.SessionCore._append

def append(self, start, new):
    saved = original(self, start, new)
    for m in new:
        kind = "intent" if m.get("tool_calls") else "result" if m["role"] == "tool" else None
        if kind:
            print(kind, flush=True)
            if kind == stage:
                time.sleep(60)  # killed here
    return saved

_core.SessionCore._append = append

def count(label: str) -> str:
    "Count once."
    with open(runs_path, "a") as f:
        f.write(label + "\\n"); f.flush(); os.fsync(f.fileno())
    print("ran", flush=True)
    if stage == "during":
        time.sleep(60)  # killed while the tool runs
    return "counted " + label

class Staged(FakeBackend):
    def generate(self, request):
        if (stage == "before" and request.tools) or (stage == "final" and request.messages[-1]["role"] == "tool"):
            print("generating", flush=True)
            time.sleep(60)  # killed while the model writes
        yield from super().generate(request)

fake = Staged()
with ConversationSession(backend=fake, tools=[count], timeout=None) as s:
    s.chat("warm-up turn without tools", max_tool_rounds=0)
    fake.enqueue(ToolCalls([("count", {"label": "a"}), ("count", {"label": "b"})]))
    fake.enqueue("done")
    with open(sid_path, "w") as f:
        f.write(s.session_id)
    print("ready", flush=True)
    s.chat("count a and b")
print("finished", flush=True)
"""

MARK = {"before": "generating", "intent": "intent", "during": "ran", "result": "result", "final": "generating"}


@pytest.mark.parametrize("stage", ["before", "intent", "during", "result", "final"])
def test_kill_9_at_each_boundary_never_runs_a_call_twice_and_leaves_no_orphan(stage, tmp_path, sessions_dir):
    runs_path, sid_path = tmp_path / "runs.txt", tmp_path / "sid"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHILD), stage, str(runs_path), str(sid_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line.strip())
            if seen[-1] == MARK[stage] and "ready" in seen:
                break
        else:
            raise AssertionError(f"the child ended early: {seen} {proc.stderr.read() if proc.stderr else ''}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    runs = runs_path.read_text().splitlines() if runs_path.exists() else []
    sid = sid_path.read_text()
    fake = FakeBackend()
    with ConversationSession(backend=fake, tools=[]) as s:
        assert s.load_history(sid)
        history = s.history
        calls, _ = _check_history(history)  # no orphan: each recorded call has one result
        by_id = {c["id"]: c["function"]["arguments"]["label"] for m in history for c in m.get("tool_calls", [])}
        # Runs never exceed recorded calls, and every run has its call recorded.
        assert len(runs) <= len(calls)
        assert sorted(runs) == sorted(set(runs)) and set(runs) <= set(by_id.values())
        expected_runs = {"before": [], "intent": [], "during": ["a"], "result": ["a"], "final": ["a", "b"]}[stage]
        assert runs == expected_runs
        assert len(calls) == (0 if stage == "before" else 2)
        assert s.turns == (1 if stage == "before" else 2)  # the warm-up turn, then the tool turn if recorded
        s.chat("after the crash")  # the next request is valid: no orphan call in it
        _check_history(fake.requests[-1].messages)
    # Loading again runs nothing and records nothing more.
    assert (runs_path.read_text().splitlines() if runs_path.exists() else []) == expected_runs
    with ConversationSession(backend=FakeBackend()) as s:
        assert s.load_history(sid)
        assert len(s.history) == len(history) + 2


def test_the_chat_app_offers_current_time_and_shows_each_call(sessions_dir):
    import io
    import re

    from conversation_session.cli._args import parse_args
    from conversation_session.cli._chat import ChatApp
    from conversation_session.cli._export import render_markdown
    from conversation_session.stores import HistoryStore

    fake = FakeBackend()
    fake.enqueue(ToolCalls([("current_time", {})]))
    fake.enqueue("现在是中午。")
    out, err = io.StringIO(), io.StringIO()
    app = ChatApp(parse_args(["--backend", "fake", "--tool", "time"]), stdin=io.StringIO("现在几点？\n"),
                  stdout=out, stderr=err, interactive=False, backend=fake)
    assert app.run() == 0
    assert out.getvalue() == "现在是中午。\n"  # the reply alone on stdout; the call on stderr
    line = next(x for x in err.getvalue().splitlines() if "🔧" in x)
    assert re.search(r"🔧 current_time\(\) → \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", line), line
    assert fake.requests[0].tools[0]["function"]["name"] == "current_time"
    store = HistoryStore(sessions_dir)
    record = store.load(store.list_sessions()[0].session_id)
    assert record.turns == 1 and [m["role"] for m in record.messages] == ["user", "assistant", "tool", "assistant"]
    md = render_markdown(record)
    assert "🔧 current_time()" in md and "current_time → " in md


def test_the_readme_example_runs(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("**Tools**"):]
    code = section[section.index("```python") + len("```python"):section.index("```\n", section.index("```python") + 9)]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "CONVERSATION_SESSIONS_DIR": str(tmp_path / "s")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "The kitchen light is on. kitchen light on\n"


def test_a_cancelled_task_during_an_async_tool_keeps_the_call_with_its_one_result(tmp_path):
    started = asyncio.Event
    runs: list[str] = []

    async def main() -> None:
        go = started()

        async def hang(label: str) -> str:
            """Hang."""
            runs.append(label)
            go.set()
            await asyncio.sleep(30)
            return "never"

        fake = FakeBackend()
        fake.enqueue(ToolCalls([("hang", {"label": "a"}), ("hang", {"label": "b"})]))
        async with AsyncConversationSession(backend=fake, tools=[hang]) as s:
            task = asyncio.ensure_future(s.chat("go"))
            await go.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            history = s.history
            assert [m["role"] for m in history] == ["user", "assistant", "tool", "tool"]
            assert "outcome is unknown" in history[2]["content"] and "not run" in history[3]["content"]
            _check_history(history)
            fake.enqueue("after")
            assert (await s.chat("next")).response == "after"
            _check_history(fake.requests[-1].messages)

    asyncio.run(main())
    assert runs == ["a"]


def test_tool_turns_and_the_orphan_repair_on_postgresql(pg_url, tmp_path):
    counter = Counter(tmp_path / "runs.txt")
    fake = FakeBackend()
    fake.enqueue(ToolCalls([("count", {"label": "a", "times": 3})]))
    fake.enqueue("done")
    with ConversationSession(backend=fake, store=pg_url, tools=[counter.as_tool()]) as s:
        s.chat("count")
        sid, history = s.session_id, s.history
    with ConversationSession(backend=FakeBackend(), store=pg_url) as s:
        assert s.load_history(sid) and s.history == history and s.turns == 1
        # A call left without a result (as a killed process leaves it), written by the store itself.
        calls = [{"id": "call_x", "type": "function", "function": {"name": "count", "arguments": {"label": "x"}}}]
        s._writer.append(len(history), [{"role": "user", "content": "again"},
                                        {"role": "assistant", "content": "", "tool_calls": calls}], None)
    with ConversationSession(backend=FakeBackend(), store=pg_url) as s:
        assert s.load_history(sid)
        assert s.history[-1]["content"] == UNKNOWN_OUTCOME and s.turns == 2
        _check_history(s.history)
    from conversation_session.stores._postgres import PostgresStore
    store = PostgresStore(pg_url)
    try:
        assert store.load(sid).messages[-1] == {"role": "tool", "tool_call_id": "call_x", "name": "count",
                                                "content": UNKNOWN_OUTCOME}
    finally:
        store.close()
    assert counter.runs() == ["a"]


def test_the_chat_app_offers_a_files_public_functions(tmp_path, sessions_dir):
    import io

    from conversation_session.cli._args import parse_args
    from conversation_session.cli._chat import ChatApp

    path = tmp_path / "my_tools.py"
    path.write_text(textwrap.dedent('''
        from os.path import join  # imported: not offered

        def set_light(room: str, on: bool) -> str:
            """Switch a room's light."""
            return f"{room}: {'on' if on else 'off'}"

        def _helper() -> None:  # private: not offered
            pass
    '''))
    fake = FakeBackend()
    fake.enqueue(ToolCalls([("set_light", {"room": "kitchen", "on": True})]))
    fake.enqueue("done")
    out, err = io.StringIO(), io.StringIO()
    app = ChatApp(parse_args(["--backend", "fake", "--tools-file", str(path)]), stdin=io.StringIO("light\n"),
                  stdout=out, stderr=err, interactive=False, backend=fake)
    assert app.run() == 0 and out.getvalue() == "done\n"
    assert [t["function"]["name"] for t in fake.requests[0].tools] == ["set_light"]
    assert "🔧 set_light(room='kitchen', on=True) → kitchen: on" in err.getvalue()
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('broken file')\n")
    err = io.StringIO()
    app = ChatApp(parse_args(["--backend", "fake", "--tools-file", str(bad)]), stdin=io.StringIO("x\n"),
                  stdout=io.StringIO(), stderr=err, interactive=False, backend=FakeBackend())
    assert app.run() == 1 and "could not load it: RuntimeError: broken file" in err.getvalue()


def test_undo_and_retry_move_a_tool_turn_whole(tmp_path, sessions_dir):
    counter = Counter(tmp_path / "runs.txt")
    fake = FakeBackend()
    fake.enqueue(ToolCalls([("count", {"label": "a"})]))
    fake.enqueue("first")
    with ConversationSession(backend=fake, tools=[counter.as_tool()]) as s:
        s.chat("count")
        old = s.history
        fake.enqueue(ToolCalls([("count", {"label": "b"})]))
        fake.enqueue("second")
        result = s.retry()  # a new answer: the model decides anew, its calls are new calls
        assert result.response == "second" and [c["arguments"] for c in result.tool_calls] == [{"label": "b"}]
        assert [m["role"] for m in s.history] == ["user", "assistant", "tool", "assistant"] and s.turns == 1
        assert s.undo() and s.history == [] and s.turns == 0
        sid = s.session_id
    record = SessionRecord.from_dict(json.loads((sessions_dir / f"{sid}.json").read_text()))
    assert record.undone[0]["messages"] == old and record.messages == []
    assert counter.runs() == ["a", "b"]  # nothing was run again by the retry or the undo


# -- on_tool: the calls' events as they happen (what the service streams) -----------------------
def test_on_tool_reports_each_call_before_it_runs_and_its_result_after(tmp_path: Path) -> None:
    order: list[str] = []

    def set_light(room: str) -> str:
        """Switch a light."""
        order.append(f"run {room}")
        return "ok"

    fake = FakeBackend()
    fake.enqueue(ToolCalls([("set_light", {"room": "a"}), ("nope", {})], text="Sure. "))
    fake.enqueue("Done.")
    with ConversationSession(backend=fake, tools=[set_light], sessions_dir=tmp_path) as s:
        with s.stream("lights") as turn:
            turn.on_tool(lambda e: order.append(f"{e['type']} {e['name']} {e.get('result', e.get('error', ''))}"))
            for piece in turn:
                order.append(f"piece {piece}")
            result = turn.result()
    assert order == ["piece Sure. ", "tool_call set_light ", "run a", "tool_result set_light ok",
                     "tool_call nope ", "tool_result nope " + result.tool_calls[1]["error"], "piece Done."]
    assert result.tool_calls[1]["error"].startswith("error: there is no tool named 'nope'")


def test_async_on_tool_awaits_an_async_callback_before_the_call_runs(tmp_path: Path) -> None:
    order: list[str] = []

    async def ping() -> str:
        """Ping."""
        order.append("run")
        return "pong"

    async def main() -> None:
        fake = FakeBackend()
        fake.enqueue(ToolCalls([("ping", {})]))
        fake.enqueue("Done.")
        async with AsyncConversationSession(backend=fake, tools=[ping], sessions_dir=tmp_path) as s:
            turn = s.stream("go")

            async def seen(event: dict[str, object]) -> None:
                await asyncio.sleep(0.01)  # a send that takes a moment: the tool waits for it
                order.append(str(event["type"]))

            turn.on_tool(seen)  # before the turn has begun
            async with turn:
                async for _ in turn:
                    pass
                await turn.result()

    asyncio.run(main())
    assert order == ["tool_call", "run", "tool_result"]


def test_approve_is_asked_before_a_call_and_a_refusal_is_recorded_not_run(tmp_path: Path) -> None:
    ran: list[str] = []
    asked: list[dict[str, object]] = []

    def set_light(room: str) -> str:
        """Switch a light."""
        ran.append(room)
        return "ok"

    async def ask(call: dict[str, object]) -> bool | str:
        asked.append(call)
        return True if call["arguments"] == {"room": "a"} else "not that room"

    async def main() -> list[dict[str, object]]:
        fake = FakeBackend()
        fake.enqueue(ToolCalls([("set_light", {"room": "a"}), ("set_light", {"room": "b"})]))
        fake.enqueue("Done.")
        async with AsyncConversationSession(backend=fake, tools=[set_light], approve=ask,
                                            sessions_dir=tmp_path) as s:
            result = await s.chat("lights")
            return result.tool_calls

    calls = asyncio.run(main())
    assert ran == ["a"] and [c["arguments"] for c in asked] == [{"room": "a"}, {"room": "b"}]
    assert calls[0]["result"] == "ok"
    assert calls[1]["error"] == "error: not approved: not that room; it was not run"
    with pytest.raises(TypeError, match="approve must be a function"):
        ConversationSession(backend=FakeBackend(), approve="yes", sessions_dir=tmp_path)  # type: ignore[arg-type]
