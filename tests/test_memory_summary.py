"""memory="summary": running summaries that keep the prompt prefix (and the KV cache) stable."""

from __future__ import annotations

import itertools
import json

import pytest

from conversation_session import (
    AsyncConversationSession,
    BackendError,
    ConversationSession,
    FakeBackend,
    HistoryStore,
)
from conversation_session.memory import _summary


class Summarizer(FakeBackend):
    """A deterministic summariser: the summary lists the user's messages it was given."""

    def __init__(self, fail: int = 0):
        super().__init__(model_name="summarizer")
        self.calls = 0
        self.fail = fail

    def generate(self, request):
        self.calls += 1
        if self.fail:
            self.fail -= 1
            raise BackendError("summariser down")
        text = request.messages[-1]["content"]
        facts = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("user: ")]
        previous = text.split("Summary so far:\n", 1)[1].split("\n", 1)[0] if "Summary so far:" in text else ""
        kept = [x for x in previous.split("; ") if x] + facts
        # Bounded like a real summary: the first fact and the four newest.
        yield "; ".join(kept[:1] + kept[1:][-4:])


def _chat_until_compactions(s: ConversationSession, summarizer: Summarizer, n: int, turns: int = 120) -> int:
    for i in range(turns):
        s.chat(f"fact {i} is {i * 7}")
        s._core.policy.wait_idle(5)
        if s._core.policy.compactions >= n:
            return i
    raise AssertionError(f"only {s._core.policy.compactions} compactions in {turns} turns")


def test_compactions_come_in_batches_and_the_prefix_is_stable_between_them(sessions_dir):
    fake, summarizer = FakeBackend(context_length=400), Summarizer()
    with ConversationSession(backend=fake, summarizer=summarizer, memory="summary", max_tokens=10,
                             system_prompt="be brief") as s:
        _chat_until_compactions(s, summarizer, 3)
        prefixes = [r.messages[0]["content"] for r in fake.requests]
        # The prompt's first message (system prompt + summary) changes once per compaction.
        changes = sum(1 for a, b in itertools.pairwise(prefixes) if a != b)
        assert changes == s._core.policy.compactions
        assert len(fake.requests) > 3 * changes  # batches: far fewer compactions than turns
        summary = s.get_history_summary()
        assert summary["summary"] and "fact 0 is 0" in summary["summary"]  # the earliest fact survives
        assert summary["summarized_turns"] > 0
        assert prefixes[-1].startswith("be brief\n\n") and summary["summary"] in prefixes[-1]
        stats = s.get_cache_stats()
        assert stats["summarized_turns"] == summary["summarized_turns"] and stats["summary_tokens"] > 0
        # Between compactions the cache holds the whole prefix: only the new message is computed.
        s.chat("and one more")
        last = fake.requests[-1].usage
        assert last.cached_tokens and last.prompt_tokens - last.cached_tokens < 15
        warm = sum(1 for r in fake.requests[1:] if r.usage.prompt_tokens - r.usage.cached_tokens < 15)
        assert warm >= 0.8 * (len(fake.requests) - 1)
        assert fake.count_tokens(fake.requests[-1].messages) <= 400 - 10


def test_the_summary_is_persisted_and_restored_without_recomputing(sessions_dir):
    fake, summarizer = FakeBackend(context_length=400), Summarizer()
    with ConversationSession(backend=fake, summarizer=summarizer, memory="summary", max_tokens=10) as s:
        _chat_until_compactions(s, summarizer, 1)
        s.chat("one more")  # journals the compaction with a turn, like any other
        text, sid, turns = s.get_history_summary()["summary"], s.session_id, s.turns
    calls = summarizer.calls
    fake2 = FakeBackend(context_length=400)
    with ConversationSession(backend=fake2, summarizer=summarizer, memory="summary", max_tokens=10) as again:
        assert again.load_history(sid)
        assert again.turns == turns
        assert again.get_history_summary()["summary"] == text
        assert summarizer.calls == calls  # restored, not recomputed
        again.chat("what do you remember?")
        assert text in fake2.requests[-1].messages[0]["content"]
    data = json.loads((sessions_dir / f"{sid}.json").read_text())
    assert len(data["conversation_history"]) == 2 * (turns + 1)  # the full history is never rewritten
    assert data["summary"]["text"] == text and data["summary"]["model"] == "summarizer"


def test_a_failing_summariser_falls_back_to_trimming_and_loses_nothing(sessions_dir, monkeypatch):
    monkeypatch.setattr(_summary, "RETRY_AFTER_S", 0.0)
    fake, summarizer = FakeBackend(context_length=400), Summarizer(fail=2)
    with ConversationSession(backend=fake, summarizer=summarizer, memory="summary", max_tokens=10) as s:
        _chat_until_compactions(s, summarizer, 1, turns=80)
        assert summarizer.calls >= 3  # failed twice, then retried and succeeded
        assert fake.count_tokens(fake.requests[-1].messages) <= 390
        sid, turns = s.session_id, s.turns
    data = json.loads((sessions_dir / f"{sid}.json").read_text())
    assert data["turns"] == turns


def test_trim_stays_the_default_and_unknown_memory_is_refused(fake):
    with ConversationSession(backend=fake) as s:
        assert s.get_history_summary()["memory"] == "trim"
    with pytest.raises(ValueError, match="memory"):
        ConversationSession(backend=fake, memory="forever")


def test_summary_memory_on_the_async_session(sessions_dir):
    import asyncio

    async def main():
        fake, summarizer = FakeBackend(context_length=400), Summarizer()
        async with AsyncConversationSession(backend=fake, summarizer=summarizer, memory="summary",
                                            max_tokens=10) as s:
            for i in range(120):
                await s.chat(f"fact {i} is {i * 7}")
                s._core.policy.wait_idle(5)
                if s._core.policy.compactions:
                    break
            assert "fact 0 is 0" in s.get_history_summary()["summary"]

    asyncio.run(main())


CRASH_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
from conversation_session import ConversationSession, FakeBackend
from test_memory_summary import Summarizer
fake = FakeBackend(context_length=400)
s = ConversationSession(backend=fake, summarizer=Summarizer(), memory="summary", max_tokens=10)
i = 0
while not s._core.policy._ready:
    s.chat(f"fact {{i}} is {{i * 7}}"); s._core.policy.wait_idle(5); i += 1
print(s.session_id, s.turns, flush=True)
fake.piece_delay = 5.0  # the turn that adopts the summary is still generating when killed
s.chat("this turn never completes")
"""


def test_a_crash_between_compaction_and_save_loses_no_turn(sessions_dir):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).parent)
    proc = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT.format(tests=tests)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ})
    assert proc.stdout is not None
    sid, turns = proc.stdout.readline().split()
    import time

    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    fake, summarizer = FakeBackend(context_length=400), Summarizer()
    with ConversationSession(backend=fake, summarizer=summarizer, memory="summary", max_tokens=10) as s:
        assert s.load_history(sid)
        assert s.turns == int(turns)
        assert s.get_history_summary()["summary"] is None  # the compaction was never saved
        s.chat("still here")
        assert s.turns == int(turns) + 1


@pytest.mark.model
def test_embedded_model_long_conversation_with_summaries_keeps_the_cache_warm(sessions_dir):
    """The real model, a 1,024-token window: summaries are made by the model itself on a KV
    state of its own, and between compactions each turn computes little more than its message."""
    from conversation_session.backends._llama_cpp import LlamaCppBackend

    backend = LlamaCppBackend(n_ctx=1024)
    with ConversationSession(backend=backend, memory="summary", max_tokens=16, temperature=0, timeout=None,
                             persist_kv_cache=False, system_prompt="You are brief.") as s:
        s.chat("My name is Alice and my dog is called Rex.")
        results = []
        for i in range(60):
            results.append(s.chat(f"Question {i}: name one fruit that is red or yellow, please."))
            s._core.policy.wait_idle(120)
            if s._core.policy.compactions >= 2:
                break
        policy = s._core.policy
        assert policy.compactions >= 2, f"no compaction in {len(results)} turns ({policy.last_error})"
        summary = s.get_history_summary()
        assert summary["summary"] and summary["summarized_turns"] > 0
        assert s.turns == len(results) + 1  # nothing lost: the history keeps every turn
        sid = s.session_id
        # Most turns were served from the cache except their new message.
        warm = [r for r in results[1:] if r.prompt_tokens - r.cached_tokens <= 40]
        assert len(warm) >= 0.7 * len(results[1:]), [(r.prompt_tokens, r.cached_tokens) for r in results]
        assert all(r.prompt_tokens <= 1024 - 16 for r in results)
    assert HistoryStore(sessions_dir).load(sid).summary["text"] == summary["summary"]


class LongSummarizer(Summarizer):
    """A summariser whose summaries are long: they do not fit beside the turns they were cut for."""

    def generate(self, request):
        text = "".join(super().generate(request))
        yield text + "\n" + " ".join(["detail"] * 120)  # a second line: not carried into the next summary


def test_a_summary_longer_than_the_room_it_was_made_for_is_still_used(sessions_dir):
    # Before: the ready summary was dropped whenever it did not fit from the start it covered,
    # and the next one was made for the same room: the session trimmed for ever, silently.
    fake, summarizer = FakeBackend(context_length=400), LongSummarizer()
    with ConversationSession(backend=fake, summarizer=summarizer, memory="summary", max_tokens=10) as s:
        _chat_until_compactions(s, summarizer, 2)
        s.chat("and one more")
        assert "fact 0 is 0" in s.get_history_summary()["summary"]
        assert fake.count_tokens(fake.requests[-1].messages) <= 400 - 10


class Forgetful(FakeBackend):
    """A summariser as small models are: it keeps nothing of what it was given."""

    def __init__(self) -> None:
        super().__init__(model_name="forgetful")
        self.prompts: list[str] = []

    def generate(self, request):
        self.prompts.append(request.messages[-1]["content"])
        yield "They chatted about the weather."


def test_what_the_user_says_about_themselves_survives_a_summariser_that_forgets(sessions_dir):
    fake, summarizer = FakeBackend(context_length=500), Forgetful()
    script = ["My name is Alice Martin.", "Is my name Bob?", "我叫小明", "Tell me about the weather please."]
    with ConversationSession(backend=fake, summarizer=summarizer, memory="summary", max_tokens=10) as s:
        for text in script:
            s.chat(text)
        for i in range(200):
            s.chat(f"tell me about topic number {i}")
            s._core.policy.wait_idle(5)
            if s._core.policy.compactions >= 3:
                break
        assert s._core.policy.compactions >= 3
        assert s._core.policy.start > 8  # the planted turns left the verbatim part long ago
        prefix = fake.requests[-1].messages[0]["content"]
        summary = s.get_history_summary()["summary"]
        sid = s.session_id
    # Statements kept word for word, after the (useless) prose; questions and requests are not.
    assert _summary.NOTES_HEADER in prefix and summary in prefix
    prose, notes = _summary.split_summary(summary)
    assert prose == "They chatted about the weather." and notes == ["My name is Alice Martin.", "我叫小明"]
    # The summariser is only given the prose: the notes are never at its mercy.
    assert not any(_summary.NOTES_HEADER in p for p in summarizer.prompts)
    # Persisted with the summary: a new process has them without recomputing.
    record = HistoryStore(sessions_dir).load(sid)
    assert _summary.split_summary(record.summary["text"])[1] == notes


def test_the_notes_stay_within_an_eighth_of_the_window_oldest_first_out():
    policy = _summary.SummaryPolicy(lambda: 800, lambda: 10, FakeBackend().count_tokens, False,
                                    summarize=lambda prompt: "x", model_name="m", run=lambda fn, name: None)
    batch = [{"role": "user", "content": f"My number {i} is {'very ' * 5}long."} for i in range(40)]
    notes = policy._notes(["My name is Ana."], batch, 800)
    tokens = sum(policy.tokens.of({"role": "user", "content": n}) for n in notes)
    assert notes and tokens <= 100 and notes[-1] == batch[-1]["content"]
    assert "My name is Ana." not in notes  # the oldest gave way first
    assert policy._notes(["My name is Ana."], batch[:1], 800) == ["My name is Ana.", batch[0]["content"]]
    assert policy._notes(["My name is Ana."], [{"role": "user", "content": "My name is Ana."}], 800) == [
        "My name is Ana."]  # said twice, noted once
