"""The playback clock and barge-in: what of a reply reached the user when it was interrupted.

Real espeak-ng into the real-time silent sink, and two plug-in engines with audio of a known
length (a silent WAV "played" by the sink, or a ``sleep`` process standing for a sound device), so
that the heard text at a given moment can be worked out by hand.
"""

from __future__ import annotations

import itertools
import os
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest

from conversation_session import ConversationSession, FakeBackend
from conversation_session.speech import (
    EspeakEngine,
    HeardReport,
    ProcessJob,
    Sentence,
    SentenceSplitter,
    Speaker,
    SpeechEngine,
    create_speaker,
    cut_sentence,
    heard_prefix,
    split_sentence_spans,
    split_sentences,
    wav_bytes_seconds,
)

needs_espeak = pytest.mark.skipif(not EspeakEngine.available(), reason="espeak-ng is not installed")

ENGLISH = ("The weather is lovely today. We could walk to the park after lunch, if you like! "
           "Bring a coat, because it may rain later in the afternoon. Then we come home for tea.")
CHINESE = "今天天气很好。我们下午去公园散步吧！你觉得怎么样？"
# Generous for a loaded 2-core machine; bench/bench_interrupt.py measures the real figure.
SILENCE_BOUND_S = 0.5


def children(*names: str) -> list[tuple[int, str]]:
    """Our child processes with one of these names (zombies included: a killed child must be reaped)."""
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
        if ppid == os.getpid() and comm.startswith(names):
            found.append((int(entry), comm))
    return found


def letters(text: str) -> int:
    return sum(c.isalnum() for c in text)


def wait_for(predicate, timeout: float = 10.0, step: float = 0.002) -> None:
    deadline = time.perf_counter() + timeout
    while not predicate():
        assert time.perf_counter() < deadline, "timed out waiting"
        time.sleep(step)


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.perf_counter()))


def started(spk: Speaker, number: int) -> bool:
    clock = spk.clock()
    return len(clock) >= number and clock[number - 1].started is not None


def words_begun(sentence: str, position_letters: float) -> str:
    """By hand: the words of ``sentence`` whose audio has begun after ``position_letters`` letters."""
    kept, before = [], 0
    for word in sentence.split(" "):
        if kept and before >= position_letters:
            break
        kept.append(word)
        before += letters(word)
    return " ".join(kept)


def assert_word_cut(reply: str, heard: str) -> None:
    """``heard`` is a prefix of ``reply`` ending at a word's end (or between two CJK characters)."""
    assert reply.startswith(heard)
    if heard and len(heard) < len(reply):
        nxt, last = reply[len(heard)], heard[-1]
        assert not last.isspace(), heard
        assert nxt.isspace() or is_cjk(nxt) or is_cjk(last), (heard, reply[len(heard):])


def is_cjk(ch: str) -> bool:
    return "\u3000" <= ch <= "\u9fff" or "\uff00" <= ch <= "\uffef"


class ToneEngine(SpeechEngine):
    """WAV audio of exactly ``per_letter`` seconds per letter or digit (silence: the sink plays it)."""

    name = "tone"
    can_play = False

    def __init__(self, per_letter: float = 0.08):
        self.per_letter = per_letter

    def speak(self, text: str, lang: str, wav_path: Path | None) -> ProcessJob:
        assert wav_path is not None
        with wave.open(str(wav_path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(8000)
            w.writeframes(b"\0\0" * round(8000 * self.per_letter * letters(text)))
        return ProcessJob(["true"])


class SleepDevice(SpeechEngine):
    """Plays on "the sound device" with a ``sleep`` process as long as the audio would be."""

    name = "sleeper"
    can_play = True

    def __init__(self, per_letter: float = 0.08, *, measurable: bool = True):
        self.per_letter = per_letter
        self.measurable = measurable
        self.measured: list[str] = []

    def speak(self, text: str, lang: str, wav_path: Path | None) -> ProcessJob:
        assert wav_path is None
        return ProcessJob(["sleep", f"{self.per_letter * letters(text):.3f}"])

    def measure(self, text: str, lang: str) -> float | None:
        self.measured.append(text)
        return self.per_letter * letters(text) if self.measurable else None


@pytest.fixture
def silent_espeak() -> Iterator[Speaker]:
    with Speaker(EspeakEngine(), playback="silent") as spk:
        yield spk


# -- sentence spans and the pure heard_prefix (no audio) ------------------------------------------
@pytest.mark.parametrize("text", [ENGLISH, CHINESE, "  **Bold.** Then `code`:\n```\nx = 1\n```\nDone!  ",
                                  "Pi is 3.14. E.g. this one. " * 40 + "no end"], ids=["en", "cmn", "md", "long"])
def test_sentence_spans_point_into_the_stream(text: str):
    spans = split_sentence_spans(text)
    assert [s.text for s in spans] == split_sentences(text)
    assert all(text[s.start:s.end] == s.text for s in spans)
    assert all(a.end <= b.start for a, b in itertools.pairwise(spans))
    splitter = SentenceSplitter()
    streamed = [s for ch in text for s in splitter.feed_spans(ch)] + splitter.flush_spans()
    assert streamed == spans
    splitter.feed_spans("Reset. ")
    splitter.reset()
    assert splitter.feed_spans("Again. x") == [Sentence("Again.", 0, 6)]  # offsets count from reset()


def test_cut_sentence_at_words_and_characters():
    text = "Hi. Alpha beta gamma."
    s = Sentence("Alpha beta gamma.", 4, 21)
    assert cut_sentence(text, s, 0) == 4
    assert text[:cut_sentence(text, s, 0.01)] == "Hi. Alpha"          # anything played keeps a word
    assert text[:cut_sentence(text, s, 5 / 15)] == "Hi. Alpha"         # "beta" begins at letter 5
    assert text[:cut_sentence(text, s, 5.5 / 15)] == "Hi. Alpha beta"
    assert text[:cut_sentence(text, s, 0.999)] == text
    cjk = "你好。今天天气很好。"
    s2 = Sentence("今天天气很好。", 3, 10)
    assert cjk[:cut_sentence(cjk, s2, 0.5)] == "你好。今天天"             # cut between characters
    assert cjk[:cut_sentence(cjk, s2, 1)] == cjk


def test_heard_prefix_maps_milliseconds_to_text():
    text = "Alpha beta. Gamma delta epsilon zeta. Eta theta."
    durations = [0.9, 2.1, 0.8]  # 9, 21, 8 letters at 0.1 s
    assert heard_prefix(text, 0, durations) == HeardReport("", 0.0, 0, False, False, 0.0)
    assert heard_prefix(text, 900, durations).text == "Alpha beta."
    r = heard_prefix(text, 900 + 1250, durations)                  # 12.5 letters into sentence 2
    assert r.text == "Alpha beta. Gamma delta epsilon" and r.sentences == 1 and r.partial
    assert r.fraction == pytest.approx(len(r.text) / len(text)) and r.played_s == pytest.approx(2.15)
    assert heard_prefix(text, 3800, durations) == HeardReport(text, 1.0, 3, False, True, pytest.approx(3.8))
    assert heard_prefix(text, 99_000, durations).complete
    # Durations not known: estimated from the rate of those known (0.1 s a letter), then espeak's default.
    assert heard_prefix(text, 900 + 1250, [0.9]).text == "Alpha beta. Gamma delta epsilon"
    assert heard_prefix(text, 100).text == "Alpha"
    assert heard_prefix(CHINESE, 1500, seconds_per_letter=0.1).text == "今天天"   # 5.5 letters a character
    for bad in (-1, float("nan"), "10", True):
        with pytest.raises(ValueError, match="heard_ms"):
            heard_prefix(text, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", [ENGLISH, CHINESE, "Mixed 中文 and English. **Markdown** `here`!\n- item two"],
                         ids=["en", "cmn", "mixed"])
def test_heard_prefix_grows_with_time_and_always_cuts_at_a_word(text: str):
    last = ""
    for ms in range(0, 40_000, 37):
        heard = heard_prefix(text, ms).text
        assert_word_cut(text, heard)
        assert heard.startswith(last) and (heard or ms == 0)
        last = heard
    assert last == text


def test_wav_bytes_seconds():
    assert wav_bytes_seconds(b"not a wav") is None
    assert wav_bytes_seconds(b"RIFF\0\0\0\0WAVEfmt " + b"\0" * 40) is None


# -- playback option --------------------------------------------------------------------------------
def test_playback_choices(tmp_path: Path):
    for value, mode in (("silent", "silent"), (" Silent ", "silent"), (False, "off"), ("off", "off"),
                        ("device", "off"), (True, "off")):  # ToneEngine cannot play on a device
        with Speaker(ToneEngine(), playback=value, output_dir=tmp_path) as spk:
            assert spk.playback_mode == mode and spk.clocked == (mode != "off") and not spk.playback
    with Speaker(SleepDevice(), playback="device") as spk:
        assert spk.playback_mode == "device" and spk.playback and spk.clocked
    with pytest.raises(ValueError, match="silent"):
        Speaker(ToneEngine(), playback="loud")
    with pytest.raises(ValueError, match="playback"):
        create_speaker(ToneEngine(), playback="speakers")


# -- the clock with audio of known length -----------------------------------------------------------
def test_silent_sink_plays_in_real_time_and_keeps_the_clock():
    text = "Alpha beta. Gamma delta."
    with Speaker(ToneEngine(0.02), playback="silent") as spk:
        t0 = time.perf_counter()
        spk.start_turn(t0, "t")
        spk.feed(text)
        report = spk.finish(10)
        took = time.perf_counter() - t0
        clock = spk.clock()
    assert report.sentences == 2 and not report.interrupted
    assert [e.duration for e in clock] == [pytest.approx(0.18), pytest.approx(0.2)]
    assert took >= 0.38  # it took the audio's time, without a device
    assert all(e.completed and e.ended is not None and e.started is not None for e in clock)
    assert clock[0].ended <= clock[1].started and clock[1].ended - clock[1].started == pytest.approx(0.2, abs=0.02)


@pytest.mark.parametrize("device", [False, True], ids=["silent-sink", "device"])
def test_interrupt_keeps_the_sentences_played_and_the_words_begun(device: bool):
    text = "Alpha beta. Gamma delta epsilon zeta. Eta theta."
    engine = SleepDevice() if device else ToneEngine()
    with Speaker(engine, playback="device" if device else "silent") as spk:
        spk.start_turn(time.perf_counter(), "t")
        for word in text.split(" "):
            spk.feed(word + " ")
        wait_for(lambda: started(spk, 2))
        sleep_until(spk.clock()[1].started + 1.0)  # 12.5 of its 21 letters
        t = time.perf_counter()
        heard = spk.interrupt()
        took = time.perf_counter() - t
        assert children("sleep", "true") == []
        clock = spk.clock()
    played = clock[1].ended - clock[1].started  # the moment it went silent, as the clock saw it
    assert 0.95 < played < 1.4
    # Worked out by hand from the time it actually played: 0.08 s a letter.
    assert heard.text == "Alpha beta. " + words_begun("Gamma delta epsilon zeta.", played / 0.08)
    assert heard.text in ("Alpha beta. Gamma delta epsilon", "Alpha beta. Gamma delta epsilon zeta.")
    assert heard.sentences == 1 + heard.text.endswith("zeta.") and heard.partial != heard.text.endswith("zeta.")
    assert not heard.complete and heard.clocked and heard.fraction == len(heard.text) / len(text + " ")
    assert heard.played_s == pytest.approx(0.72 + played, abs=0.05)
    assert heard.interrupt_to_silence_s is not None and heard.interrupt_to_silence_s <= took < SILENCE_BOUND_S
    assert clock[0].completed and not clock[1].completed and clock[2].started is None
    if device:
        assert clock[0].duration >= 0.72  # the measured process time
        assert engine.measured == ["Gamma delta epsilon zeta."]  # the sentence cut off, after silence


def test_device_without_a_measure_estimates_from_the_sentences_played():
    engine = SleepDevice(0.05, measurable=False)
    text = "One two three four five. Six seven eight nine ten eleven twelve thirteen. "
    with Speaker(engine, playback="device") as spk:
        spk.start_turn(time.perf_counter(), "t")
        spk.feed(text)
        wait_for(lambda: started(spk, 2))
        time.sleep(0.6)  # of ~2.5 s
        heard = spk.interrupt()
    assert heard.text.startswith("One two three four five. Six") and heard.partial and heard.sentences == 1
    assert len(heard.text) < len(text) - 10
    assert_word_cut(text, heard.text)


def test_something_played_keeps_a_word():
    with Speaker(ToneEngine(), playback="silent") as spk:
        spk.start_turn(time.perf_counter(), "t")
        spk.feed("Alpha beta gamma. Delta.")
        wait_for(lambda: started(spk, 1), step=0.0005)
        heard = spk.interrupt()
    assert heard.text == "Alpha" and heard.sentences == 0 and heard.partial and heard.played_s > 0


def test_nothing_heard_before_any_audio():
    class Stuck(ToneEngine):
        def speak(self, text: str, lang: str, wav_path: Path | None) -> ProcessJob:
            return ProcessJob(["sleep", "30"])  # synthesis that never ends

    with Speaker(Stuck(), playback="silent") as spk:
        assert spk.interrupt() == HeardReport("", 0.0, 0, False, False, 0.0, True, pytest.approx(0, abs=0.5))
        spk.start_turn(time.perf_counter(), "t")
        assert spk.interrupt().text == ""  # a turn with no text yet
        spk.start_turn(time.perf_counter(), "t")
        spk.feed("Alpha beta. Gamma.")
        wait_for(lambda: children("sleep") != [])
        heard = spk.interrupt()
        assert children("sleep") == []
    assert heard.text == "" and heard.sentences == 0 and heard.fraction == 0 and heard.played_s == 0
    assert heard.interrupt_to_silence_s is not None and heard.interrupt_to_silence_s < SILENCE_BOUND_S


def test_interrupt_after_the_reply_was_played_returns_all_of_it():
    text = "**Alpha** beta. Gamma!\n```\n```\n"
    with Speaker(ToneEngine(0.01), playback="silent") as spk:
        spk.start_turn(time.perf_counter(), "t")
        spk.feed(text)
        spk.finish(10)
        heard = spk.interrupt()
        assert spk.interrupt().text == heard.text  # idempotent
        # Played to the end but not finished: the last sentence may still grow, so it is not spoken yet.
        spk.start_turn(time.perf_counter(), "t2")
        spk.feed("One. Two")
        wait_for(lambda: spk.clock()[0].completed)
        time.sleep(0.05)
        partial = spk.interrupt()
    assert heard.text == text and heard.complete and heard.fraction == 1.0 and heard.sentences == 2
    assert partial.text == "One." and not partial.complete


def test_finish_waiting_in_another_thread_gets_the_heard_part():
    import threading

    text = "Alpha beta. Gamma delta epsilon zeta."
    with Speaker(ToneEngine(0.05), playback="silent") as spk:
        spk.start_turn(time.perf_counter(), "t")
        spk.feed(text)
        box: list = []
        waiter = threading.Thread(target=lambda: box.append(spk.finish(30)))
        waiter.start()
        wait_for(lambda: started(spk, 2))
        heard = spk.interrupt()
        waiter.join(5)
    assert box and box[0].interrupted and box[0].heard == heard and box[0].sentences == 1


def test_feeds_after_an_interrupt_are_not_spoken_but_the_next_turn_is():
    with Speaker(ToneEngine(0.01), playback="silent") as spk:
        spk.start_turn(time.perf_counter(), "t")
        spk.feed("Alpha. ")
        wait_for(lambda: started(spk, 1))
        first = spk.interrupt()
        spk.feed("Beta. Gamma. ")
        time.sleep(0.1)
        assert len(spk.clock()) == 1 and spk.interrupt().text == first.text
        spk.start_turn(time.perf_counter(), "t2")
        spk.feed("Delta.")
        assert spk.finish(5).sentences == 1
        assert spk.heard().text == "Delta." and spk.heard().complete


def test_without_a_clock_the_streamed_text_is_reported(tmp_path: Path):
    with Speaker(ToneEngine(), output_dir=tmp_path, playback="off") as spk:
        assert not spk.clocked
        spk.start_turn(time.perf_counter(), "t")
        spk.feed("Alpha beta. Gamma")
        heard = spk.interrupt()
        durations = spk.durations()
    assert heard.text == "Alpha beta. Gamma" and not heard.clocked
    assert durations in ([None], [pytest.approx(0.72)])  # the WAV's length, once written


# -- real espeak-ng into the silent sink ---------------------------------------------------------------
@needs_espeak
def test_espeak_interrupt_at_a_known_moment(silent_espeak: Speaker):
    spk = silent_espeak
    sentences = split_sentence_spans(ENGLISH)
    spk.start_turn(time.perf_counter(), "en")
    for word in ENGLISH.split(" "):
        spk.feed(word + " ")
    wait_for(lambda: started(spk, 3))
    third = spk.clock()[2]
    assert third.duration is not None and third.duration > 1.0  # from the WAV, before it plays
    sleep_until(third.started + third.duration * 0.4)
    t = time.perf_counter()
    heard = spk.interrupt()
    took = time.perf_counter() - t
    assert children("espeak") == []
    clock = spk.clock()
    # Exactly the two sentences played, then the words of the third up to its playback position.
    assert heard.text.startswith(ENGLISH[:sentences[1].end] + " Bring")
    assert heard.sentences == 2 and heard.partial and not heard.complete
    fraction = (clock[2].ended - clock[2].started) / clock[2].duration
    position = fraction * letters(sentences[2].text)
    assert heard.text == ENGLISH[:sentences[2].start] + words_begun(sentences[2].text, position)
    assert heard.text != ENGLISH[:sentences[2].end]
    assert_word_cut(ENGLISH, heard.text)
    assert heard.played_s == pytest.approx(clock[0].duration + clock[1].duration + fraction * clock[2].duration)
    assert took < SILENCE_BOUND_S and heard.interrupt_to_silence_s is not None
    # The pure function, given the same milliseconds and durations, says the same.
    assert heard_prefix(ENGLISH, heard.played_s * 1000, spk.durations()).text == heard.text


@needs_espeak
def test_espeak_chinese_is_cut_between_characters(silent_espeak: Speaker):
    spk = silent_espeak
    spk.start_turn(time.perf_counter(), "cmn")
    spk.feed(CHINESE)
    wait_for(lambda: started(spk, 1))
    first = spk.clock()[0]
    sleep_until(first.started + first.duration * 0.5)
    heard = spk.interrupt()
    assert heard.text and CHINESE.startswith(heard.text) and heard.partial and heard.sentences == 0
    assert 1 <= len(heard.text) < len("今天天气很好")


@needs_espeak
def test_espeak_heard_ms_after_the_whole_reply(silent_espeak: Speaker):
    spk = silent_espeak
    text = "Yes. We could walk to the park. Then tea."
    spk.start_turn(time.perf_counter(), "full")
    spk.feed(text)
    report = spk.finish(20)
    durations = spk.durations()
    assert report.sentences == 3 and all(d is not None and d > 0.1 for d in durations)
    clock = spk.clock()
    # The next sentence is synthesized while one plays: they follow each other as on a device.
    assert all(b.started - a.ended < 0.25 for a, b in itertools.pairwise(clock))  # type: ignore[operator]
    assert spk.interrupt().text == text
    d1, d2, d3 = (d for d in durations if d is not None)
    assert heard_prefix(text, 0, durations).text == ""
    assert heard_prefix(text, d1 * 1000, durations).text == "Yes."
    assert heard_prefix(text, (d1 + d2 * 0.5) * 1000, durations).text.startswith("Yes. We could")
    assert heard_prefix(text, (d1 + d2) * 1000, durations).text == "Yes. We could walk to the park."
    assert heard_prefix(text, (d1 + d2 + d3) * 1000, durations).complete


@needs_espeak
def test_espeak_measure_matches_the_wav(tmp_path: Path):
    engine = EspeakEngine()
    job = engine.speak("We could walk to the park.", "en", tmp_path / "a.wav")
    assert job.wait() == 0
    with wave.open(str(tmp_path / "a.wav")) as w:
        seconds = w.getnframes() / w.getframerate()
    assert engine.measure("We could walk to the park.", "en") == pytest.approx(seconds, abs=0.01)
    assert children("espeak") == []


@needs_espeak
@pytest.mark.parametrize("how", ["interrupt", "cancel", "close", "new turn"])
def test_no_speech_process_is_left(how: str, tmp_path: Path):
    spk = Speaker(EspeakEngine(), playback="silent", output_dir=tmp_path)
    spk.start_turn(time.perf_counter(), "t")
    spk.feed(ENGLISH * 5)
    for _ in range(3):  # synthesis and playback, at different moments
        time.sleep(0.03)
        t = time.perf_counter()
        if how == "interrupt":
            spk.interrupt()
        elif how == "cancel":
            spk.cancel()
        elif how == "close":
            spk.close()
        else:
            spk.start_turn(time.perf_counter(), "next")
            spk.feed(ENGLISH)
            continue
        assert time.perf_counter() - t < SILENCE_BOUND_S
        assert children("espeak") == []
        spk.start_turn(time.perf_counter(), "t")
        spk.feed(ENGLISH)
    spk.close()
    assert children("espeak") == []


@needs_espeak
def test_session_takes_the_silent_sink_from_tts_options():
    fake = FakeBackend()
    fake.enqueue(["Hello there. ", "How are you?"])
    with ConversationSession(backend=fake, tts="espeak", tts_options={"playback": "silent"}) as s:
        speaker = s.tts
        assert speaker is not None and speaker.playback_mode == "silent"
        s.chat("hi")
        assert speaker.heard() == HeardReport("Hello there. How are you?", 1.0, 2, False, True,
                                              pytest.approx(sum(d or 0 for d in speaker.durations())))
