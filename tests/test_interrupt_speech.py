"""Barge-in with real speech: espeak-ng into the real-time silent sink (a headless device).

What is kept is what was played by the moment of the interrupt: whole sentences, plus the words
of the sentence playing then.  Also: the embedded model's next turn reuses its cache up to the cut.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import pytest

from conversation_session import AsyncConversationSession, ConversationSession, FakeBackend, HistoryStore

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is installed by ./scripts/test")

SENTENCES = ["The first sentence is short.", "The second one is a little longer than that.",
             "The third sentence should never be heard at all.", "Nor should this fourth one be heard."]


def _speaking_session(fake: FakeBackend, **kw) -> ConversationSession:
    return ConversationSession(backend=fake, tts="espeak", tts_options={"playback": "silent"},
                               tts_wait_timeout=60, **kw)


def _espeak_children() -> list[str]:
    """Live espeak-ng processes started by this process (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            comm = stat.read_text().split("(", 1)[1].rsplit(")", 1)[0]
        except (OSError, IndexError):
            continue
        if int(fields[1]) == os.getpid() and "espeak" in comm and fields[0] != "Z":
            found.append(comm)
    return found


def test_an_interrupt_during_playback_keeps_the_sentences_played(sessions_dir):
    fake = FakeBackend()
    with _speaking_session(fake) as s:
        s.chat("hello")  # a first, complete spoken turn
        fake.enqueue([x + " " for x in SENTENCES])
        turn = s.stream("tell me four things")
        for _ in turn:
            pass  # the text is complete at once; the audio plays in real time
        speaker = s._core.speaker
        deadline = time.monotonic() + 30
        # Wait until the first sentence has played and the second is playing.
        while time.monotonic() < deadline:
            clock = speaker.clock()
            if len(clock) >= 2 and clock[0].completed and clock[1].started is not None:
                break
            time.sleep(0.01)
        result = turn.interrupt()
        assert result is not None and result.interrupted
        heard = result.response
        assert heard.startswith(SENTENCES[0])  # the whole first sentence
        assert SENTENCES[2] not in heard and SENTENCES[3] not in heard
        assert 0 < result.heard_fraction < 1
        assert result.interrupt_to_silence_s is not None and result.interrupt_to_silence_s < 0.5
        assert not _espeak_children()  # no speech process left running
        s.chat("what were you saying?")
        sent = [m["content"] for m in fake.requests[-1].messages]
        assert sent[-2] == heard and sent[-1] == "what were you saying?"  # in order, cut
        sid = s.session_id
    saved = HistoryStore(sessions_dir).load(sid).messages
    assert saved[3] == {"role": "assistant", "content": heard, "interrupted": True}
    assert [m["role"] for m in saved] == ["user", "assistant"] * 3


def test_an_interrupt_before_any_audio_keeps_nothing(sessions_dir):
    fake = FakeBackend()
    with _speaking_session(fake) as s:
        fake.enqueue([x + " " for x in SENTENCES])
        turn = s.stream("go")
        for _ in turn:
            turn.interrupt()  # at the first piece: nothing has been played yet
            break
        result = turn.result()
        assert result.interrupted and result.response == "" and s.turns == 0


def test_async_barge_in_with_speech(sessions_dir):
    async def main():
        fake = FakeBackend()
        async with AsyncConversationSession(backend=fake, tts="espeak", tts_options={"playback": "silent"},
                                            tts_wait_timeout=60) as s:
            fake.enqueue([x + " " for x in SENTENCES])
            async with s.stream("talk") as turn:
                async for _ in turn:
                    pass
                await asyncio.sleep(1.5)  # part of the audio plays
                result = await turn.interrupt()
            assert result is not None and result.interrupted
            assert 0 < len(result.response) < len(" ".join(SENTENCES))
            assert s.history[-1]["interrupted"] is True

    asyncio.run(main())


@pytest.mark.model
def test_the_embedded_models_next_turn_reuses_the_cache_up_to_the_cut(sessions_dir):
    with ConversationSession(max_tokens=48, temperature=0, timeout=None) as s:
        s.chat("Name three colours.")
        with s.stream("Tell me a long story about a fox.") as turn:
            got = []
            for piece in turn:
                got.append(piece)
                if len(got) == 20:
                    turn.interrupt()
            cut = turn.result()
        assert cut.interrupted and cut.response == "".join(got)
        after = s.chat("Go on.")
        # Everything up to the cut came from the cache: only the new message (and the cut
        # reply's closing tokens) were computed.
        assert after.prompt_tokens - after.cached_tokens < 30, (after.prompt_tokens, after.cached_tokens)
