"""Speech inside a conversation: replies spoken as they stream, bounded by tts_wait_timeout."""

from __future__ import annotations

import time
import wave

import pytest

from conversation_session import ConversationSession, FakeBackend, HistoryStore, SessionTimeoutError, TTSTimeoutError
from conversation_session.speech import find_espeak

pytestmark = pytest.mark.skipif(find_espeak() is None, reason="espeak-ng is installed by the README's set-up")

LONG_REPLY = [f"This is sentence number {i} of a long streamed reply. " for i in range(12)]


def test_each_turn_is_spoken_into_wav_files(tmp_path, sessions_dir):
    out = tmp_path / "speech"
    fake = FakeBackend()
    fake.enqueue(["你好！", "今天天气很好。"])
    fake.enqueue(["Hello there. ", "How are you?"])
    with ConversationSession(backend=fake, tts="espeak", tts_output_dir=out, tts_options={"playback": False}) as s:
        r1 = s.chat("你好")
        r2 = s.chat("hi")
        stats = s.get_cache_stats()
    assert r1.tts_first_audio_s is not None and r1.tts_first_audio_s < r1.total_s + 5
    assert stats["tts_first_audio_s"] == r2.tts_first_audio_s
    wavs = sorted(out.glob("*.wav"))
    assert any("cmn" in p.name for p in wavs) and any("_en" in p.name for p in wavs)
    for path in wavs:
        with wave.open(str(path)) as w:
            assert w.getsampwidth() == 2 and w.getnframes() / w.getframerate() > 0.2


def test_first_audio_is_ready_before_a_long_reply_finishes(tmp_path):
    fake = FakeBackend(piece_delay=0.15)
    fake.enqueue(LONG_REPLY)
    with ConversationSession(backend=fake, tts="espeak", tts_output_dir=tmp_path,
                             tts_options={"playback": False}) as s:
        result = s.chat("tell me a long story")
    assert result.tts_first_audio_s is not None
    assert result.tts_first_audio_s < result.total_s / 2  # speech started while the text streamed


def test_a_tiny_tts_wait_timeout_raises_after_the_turn_is_saved(tmp_path, sessions_dir):
    fake = FakeBackend()
    fake.enqueue(LONG_REPLY)
    with ConversationSession(backend=fake, tts="espeak", tts_output_dir=tmp_path, tts_wait_timeout=0.01,
                             tts_options={"playback": False}) as s:
        t0 = time.monotonic()
        with pytest.raises(TTSTimeoutError) as info:
            s.chat("a long one, please")
        assert time.monotonic() - t0 < 5
        err = info.value
        assert isinstance(err, SessionTimeoutError) and isinstance(err, TimeoutError)
        assert err.result.response == "".join(LONG_REPLY) and err.result.saved
        assert s.turns == 1
        assert HistoryStore(sessions_dir).load(s.session_id).turns == 1  # saved before the error
        s.tts_wait_timeout = 30
        assert s.chat("and a short one").turn == 2  # the session stays usable


def test_a_model_timeout_stops_speech_and_saves_nothing(tmp_path, sessions_dir):
    fake = FakeBackend(piece_delay=0.1)
    fake.enqueue(LONG_REPLY)
    with ConversationSession(backend=fake, tts="espeak", tts_output_dir=tmp_path, timeout=0.5,
                             tts_options={"playback": False}) as s:
        with pytest.raises(SessionTimeoutError) as info:
            s.chat("go")
        assert not isinstance(info.value, TTSTimeoutError)
        assert s.turns == 0


def test_missing_espeak_goes_on_silently(monkeypatch, caplog, fake):
    monkeypatch.setenv("CONVERSATION_ESPEAK_BINARY", "/nonexistent/espeak-ng")
    with ConversationSession(backend=fake, tts="espeak") as s:
        assert s.chat("hi").tts_first_audio_s is None
    assert any("apt-get install espeak-ng" in r.getMessage() for r in caplog.records)
