"""The speech package with the real espeak-ng: WAV output, streaming, the bounded wait, cancel."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import wave
from array import array
from collections.abc import Iterator
from pathlib import Path

import pytest

from conversation_session.speech import (
    ESPEAK_BINARY_ENV,
    EspeakEngine,
    SentenceSplitter,
    Speaker,
    SpeechEngine,
    SpeechReport,
    SpeechTimeout,
    clean_for_speech,
    create_speaker,
    script_runs,
    sound_device_available,
    split_sentences,
)
from conversation_session.speech import ProcessJob as _ProcessJob

needs_espeak = pytest.mark.skipif(not EspeakEngine.available(), reason="espeak-ng is not installed")
headless_only = pytest.mark.skipif(sound_device_available(), reason="would play sound on this machine's device")

ENGLISH = ("The weather is lovely today. We could walk to the park after lunch! Would you like that? "
           "Version 3.14 of the app, e.g. the new one, is faster. Bring a coat, because it may rain later.")
CHINESE = "今天天气很好。我们下午去公园散步吧！你觉得怎么样？记得带一件外套，晚上可能会下雨。"
LONG = " ".join(f"This is sentence number {n} of a long reply, and it goes on for a while." for n in range(300))


@pytest.fixture
def speech_log(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.LogCaptureFixture]:
    # Captured at the package's logger itself (setup_logger() elsewhere may stop propagation to
    # the root), and only there, so that no record is counted twice.
    log = logging.getLogger("conversation_session.speech")
    monkeypatch.setattr(log, "propagate", False)
    old_level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        log.removeHandler(caplog.handler)
        log.setLevel(old_level)


@pytest.fixture
def speaker(tmp_path: Path) -> Iterator[Speaker]:
    with Speaker(EspeakEngine(), output_dir=tmp_path / "wav", playback=False) as spk:
        yield spk


def espeak_children() -> list[int]:
    """Our espeak-ng child processes, zombies included (a killed child must also be reaped)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1: stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == os.getpid() and comm.startswith("espeak"):
            found.append(int(entry))
    return found


def wav_figures(path: Path) -> tuple[int, float, float]:
    """Sample width in bytes, duration in seconds, RMS on the 16-bit scale."""
    with wave.open(str(path)) as w:
        assert w.getcomptype() == "NONE"
        width, rate, frames = w.getsampwidth(), w.getframerate(), w.readframes(w.getnframes())
    samples = array("h", frames)
    rms = math.sqrt(sum(s * s for s in samples) / len(samples)) if samples else 0.0
    return width, len(samples) / rate, rms


def speak(spk: Speaker, text: str, label: str = "t1", timeout: float | None = 10) -> SpeechReport:
    spk.start_turn(time.perf_counter(), label)
    spk.feed(text)
    return spk.finish(timeout)


# -- the splitter (no espeak-ng needed) -----------------------------------------------------
def test_split_english_keeps_decimals_and_abbreviations():
    assert split_sentences("Pi is 3.14 exactly. E.g. this one, i.e. that. Dr. Li agreed! Really? Yes.") == [
        "Pi is 3.14 exactly.", "E.g. this one, i.e. that.", "Dr. Li agreed!", "Really?", "Yes."]
    assert split_sentences("Visit example.com today. Wait... what?! OK") == [
        "Visit example.com today.", "Wait...", "what?!", "OK"]


def test_split_chinese_punctuation_and_closing_quotes():
    assert split_sentences("你好。今天天气很好！你呢？他说：“好。”然后走了") == [
        "你好。", "今天天气很好！", "你呢？", "他说：“好。”", "然后走了"]


def test_split_line_breaks_and_lists():
    text = "Steps:\n1. Open the lid\n2. Pour water\n\n```\n---\nDone"
    assert split_sentences(text) == ["Steps:", "1. Open the lid", "2. Pour water", "Done"]


def test_split_streamed_pieces_mid_sentence():
    splitter = SentenceSplitter()
    assert splitter.feed("The answer is 3") == []
    assert splitter.feed(".") == []              # "3." or "3.14"? the next piece decides
    assert splitter.feed("14 and") == []
    assert splitter.feed(" more. Next") == ["The answer is 3.14 and more."]
    assert splitter.feed(" one，还有中文。后") == ["Next one，还有中文。"]
    assert splitter.pending == "后"
    assert splitter.flush() == ["后"]
    assert splitter.flush() == []


@pytest.mark.parametrize("text", [ENGLISH, CHINESE, ENGLISH + "\n" + CHINESE, LONG[:3000]],
                         ids=["en", "cmn", "mixed", "long"])
def test_split_char_by_char_equals_whole(text: str):
    splitter = SentenceSplitter()
    streamed = [s for ch in text for s in splitter.feed(ch)] + splitter.flush()
    assert streamed == split_sentences(text)


def test_split_cuts_sentences_without_full_stops():
    parts = split_sentences("这是一个没有句号的很长的句子，" * 30, max_chars=100)
    assert len(parts) > 3 and all(len(p) <= 100 for p in parts)
    assert all(p.endswith("，") for p in parts[:-1])


def test_script_runs_and_cleaning():
    assert script_runs("Mixed 中文 and English, 共 3 个。") == [
        ("en", "Mixed"), ("cmn", "中文"), ("en", "and English,"), ("cmn", "共 3 个。")]
    assert script_runs("42.", default="cmn") == [("cmn", "42.")]
    assert script_runs("“ ”") == []
    assert clean_for_speech("**Bold** and `code` # x") == "Bold and code x"


# -- the real espeak-ng -----------------------------------------------------------------------
@needs_espeak
@pytest.mark.parametrize(("text", "lang"), [(ENGLISH, "en"), (CHINESE, "cmn")], ids=["en", "cmn"])
def test_wav_files_have_sound(speaker: Speaker, text: str, lang: str):
    report = speak(speaker, text, label="session_1_turn2")
    assert report.sentences == len(split_sentences(text)) >= 4
    assert report.errors == 0
    assert report.first_audio_s is not None and 0 < report.first_audio_s <= report.total_s
    assert [p.name for p in report.wav_files] == sorted(p.name for p in report.wav_files)
    assert report.wav_files[0].name == f"session_1_turn2_0001_01_{lang}.wav"
    for path in report.wav_files:
        width, seconds, rms = wav_figures(path)
        assert width == 2, path
        assert seconds > 0.2, (path, seconds)
        assert rms > 300, (path, rms)  # silence is ~0; espeak-ng speech is in the thousands


@needs_espeak
def test_mixed_text_is_spoken_with_both_voices(speaker: Speaker):
    report = speak(speaker, "Hello 你好世界 world.")
    names = [p.name for p in report.wav_files]
    assert names == ["t1_0001_01_en.wav", "t1_0001_02_cmn.wav", "t1_0001_03_en.wav"]
    figures = [wav_figures(p) for p in report.wav_files]
    assert all(seconds > 0.2 and rms > 300 for _, seconds, rms in figures)
    assert EspeakEngine().voice_for("cmn") == "cmn" and EspeakEngine().voice_for("en") == "en"


@needs_espeak
def test_first_audio_comes_before_the_reply_is_complete(speaker: Speaker):
    words = (ENGLISH + " " + CHINESE + " " + ENGLISH).split(" ")
    t0 = time.perf_counter()
    speaker.start_turn(t0, "stream")
    slowest_feed = 0.0
    for word in words:
        t = time.perf_counter()
        speaker.feed(word + " ")
        slowest_feed = max(slowest_feed, time.perf_counter() - t)
        time.sleep(0.01)  # a model writing ~100 pieces/s
    last_piece_at = time.perf_counter() - t0
    first = speaker.first_audio_s
    assert first is not None and first < last_piece_at, (first, last_piece_at)
    assert slowest_feed < 0.05  # feed() only queues
    report = speaker.finish(10)
    assert report.first_audio_s == first
    assert report.sentences == len(split_sentences(" ".join(words)))


@needs_espeak
def test_finish_timeout_stops_speech_and_kills_espeak(speaker: Speaker):
    speaker.start_turn(time.perf_counter(), "long")
    speaker.feed(LONG)
    t = time.perf_counter()
    with pytest.raises(SpeechTimeout) as info:
        speaker.finish(timeout=0.05)
    assert time.perf_counter() - t < 1.0
    assert not isinstance(info.value, TimeoutError)  # a plain Exception: the session maps it
    assert info.value.timeout == 0.05 and info.value.report.sentences < 300
    assert espeak_children() == []
    count = len(list(speaker.output_dir.iterdir()))
    time.sleep(0.2)
    assert len(list(speaker.output_dir.iterdir())) == count  # nothing more is synthesized
    assert speak(speaker, "Still works.", label="after").sentences == 1  # the next turn speaks again


@needs_espeak
def test_cancel_stops_at_once(speaker: Speaker):
    speaker.start_turn(time.perf_counter(), "cancel")
    speaker.feed(LONG)
    deadline = time.perf_counter() + 5
    while speaker.first_audio_s is None and time.perf_counter() < deadline:
        time.sleep(0.005)
    assert speaker.first_audio_s is not None
    t = time.perf_counter()
    speaker.cancel()
    assert time.perf_counter() - t < 0.5
    assert espeak_children() == []
    count = len(list(speaker.output_dir.iterdir()))
    speaker.feed("More text. And more. ")       # ignored until the next turn
    time.sleep(0.2)
    assert len(list(speaker.output_dir.iterdir())) == count
    report = speaker.finish(1)                  # nothing left to wait for
    assert report.sentences < 300
    speaker.cancel()                            # idempotent
    speaker.close()
    speaker.cancel()                            # even after close


@needs_espeak
def test_close_in_the_middle_leaves_no_process(tmp_path: Path):
    spk = create_speaker("espeak", output_dir=tmp_path, rate=220, voice={"en": "en-us"})
    assert spk is not None
    spk.start_turn(time.perf_counter(), "close")
    spk.feed(LONG)
    time.sleep(0.05)
    spk.close()
    spk.close()
    assert espeak_children() == []


def test_missing_espeak_gives_one_warning_and_no_speaker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         speech_log: pytest.LogCaptureFixture):
    monkeypatch.setenv(ESPEAK_BINARY_ENV, str(tmp_path / "no-such" / "espeak-ng"))
    assert not EspeakEngine.available()
    assert create_speaker("espeak", output_dir=tmp_path) is None
    warnings = [r for r in speech_log.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "sudo apt-get install espeak-ng" in warnings[0].getMessage()
    with pytest.raises(FileNotFoundError, match="apt-get install espeak-ng"):
        EspeakEngine()


def test_create_speaker_choices():
    assert create_speaker(None) is None
    assert create_speaker("none") is None
    with pytest.raises(ValueError, match="espeak"):
        create_speaker("piper")


@needs_espeak
@headless_only
def test_headless_without_output_dir_warns_once_and_never_raises(speech_log: pytest.LogCaptureFixture):
    spk = create_speaker("espeak")
    assert spk is not None and not spk.active
    with spk:
        for _ in range(2):
            report = speak(spk, ENGLISH)
            assert report.sentences == 0 and report.wav_files == []
    messages = [r.getMessage() for r in speech_log.records if r.levelno >= logging.INFO]
    assert len(messages) == 1 and "--tts-output-dir" in messages[0]


@needs_espeak
@headless_only
def test_forced_playback_on_a_headless_machine_does_not_raise():
    with Speaker(EspeakEngine(), playback=True) as spk:
        report = speak(spk, "Hello. 你好。")
        assert report.sentences == 2 and report.first_audio_s is not None


class _SineEngine(SpeechEngine):
    """A plug-in engine written in Python: a 0.3 s tone per run, or a failing program."""

    name = "sine"
    can_play = False

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.calls: list[tuple[str, str]] = []

    def speak(self, text: str, lang: str, wav_path: Path | None) -> _ProcessJob | _Done:
        self.calls.append((lang, text))
        if self.fail:
            return _ProcessJob(["sh", "-c", "echo broken voice >&2; exit 3"])
        assert wav_path is not None
        with wave.open(str(wav_path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(8000)
            w.writeframes(array("h", (int(8000 * math.sin(i / 5)) for i in range(2400))).tobytes())
        return _Done()


class _Done:
    def wait(self, timeout: float | None = None) -> int:
        return 0

    def kill(self) -> None:
        pass


def test_a_plugged_in_engine(tmp_path: Path):
    engine = _SineEngine()
    spk = create_speaker(engine, output_dir=tmp_path)
    assert spk is not None and not spk.playback  # the engine cannot play
    with spk:
        report = speak(spk, "One. 二。Three", label="sine")
    assert engine.calls == [("en", "One."), ("cmn", "二。"), ("en", "Three")]
    assert [p.name for p in report.wav_files] == ["sine_0001_01_en.wav", "sine_0002_01_cmn.wav",
                                                  "sine_0003_01_en.wav"]
    assert all(wav_figures(p)[1] == 0.3 for p in report.wav_files)


def test_engine_failures_are_logged_once_and_never_raise(tmp_path: Path, speech_log: pytest.LogCaptureFixture):
    with Speaker(_SineEngine(fail=True), output_dir=tmp_path) as spk:
        report = speak(spk, "One. Two. Three.")
    assert report.errors == 3 and report.wav_files == [] and report.first_audio_s is None
    warnings = [r.getMessage() for r in speech_log.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "broken voice" in warnings[0]


def test_feed_never_blocks_on_a_slow_engine(tmp_path: Path):
    release = threading.Event()

    class Slow(_SineEngine):
        def speak(self, text: str, lang: str, wav_path: Path | None) -> _Done:
            release.wait(5)
            return _Done()

    with Speaker(Slow(), output_dir=tmp_path) as spk:
        spk.start_turn(time.perf_counter(), "slow")
        t = time.perf_counter()
        for _ in range(200):
            spk.feed("A sentence. ")
        assert time.perf_counter() - t < 0.5
        threading.Timer(0.3, release.set).start()  # the engine call in progress cannot be killed
        with pytest.raises(SpeechTimeout):
            spk.finish(0.05)
