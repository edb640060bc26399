"""What reached the user: the playback clock's records, and the heard prefix of a reply.

Pure functions and plain records: the ``Speaker`` fills the clock as it plays, and a caller whose
own device plays the audio (a phone, a browser) maps its playback position with ``heard_prefix``.

The estimate inside a sentence: a sentence's audio is spread over its letters and digits in
proportion (a Han or kana character counts ``HAN_WEIGHT`` letters: espeak-ng says one in about the
time it says five or six Latin letters); punctuation and spaces count nothing.  A word counts as
heard once its audio has begun, so anything played keeps at least one word, and the cut always
falls at a word's end (after a single character in Chinese and Japanese, which have no spaces).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ._split import Sentence, split_sentence_spans

__all__ = ["HAN_WEIGHT", "SECONDS_PER_LETTER", "HeardReport", "SentenceClock", "cut_sentence",
           "heard_prefix", "speech_weight"]

#: How many Latin letters one Han (or kana) character weighs in speaking time (espeak-ng: ~0.41 s
#: per Han character vs ~0.073 s per letter at 175 words per minute).
HAN_WEIGHT = 5.5
#: Seconds of audio per letter or digit when no duration is known yet (espeak-ng at 175 wpm).
SECONDS_PER_LETTER = 0.073

# Scripts written without spaces: every character is a word of its own for cutting.
_NO_SPACE = "\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef\U00020000-\U0003ffff"
_WORD = re.compile(f"[{_NO_SPACE}]|[^\\s{_NO_SPACE}]+")
_WIDE = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff]")


def speech_weight(text: str) -> float:
    """How long ``text`` takes to say, in letters: letters and digits 1, Han and kana ``HAN_WEIGHT``."""
    wide = len(_WIDE.findall(text))
    return sum(1 for c in text if c.isalnum()) - wide + wide * HAN_WEIGHT


@dataclass
class SentenceClock:
    """The playback clock's record of one sentence of a turn.

    Attributes:
        number: 1, 2, ... in the turn.
        text: the sentence as queued (stripped); ``stream[start:end] == text``.
        start, end: its place in the reply as streamed.
        duration: seconds of audio (from the WAV frames, or the measured playback time once it
            has played on the sound device); None while unknown.
        started: ``time.perf_counter()`` when its audio started playing; None if it never did.
        ended: when its audio stopped (done, or cut off); None while playing or never played.
        completed: it played to its end.
    """

    number: int
    text: str
    start: int
    end: int
    duration: float | None = None
    started: float | None = None
    ended: float | None = None
    completed: bool = False

    def played_s(self, now: float) -> float:
        """Seconds of its audio played by ``now`` (never more than its duration)."""
        if self.started is None:
            return 0.0
        played = max(0.0, (self.ended if self.ended is not None else now) - self.started)
        return min(played, self.duration) if self.duration is not None else played


@dataclass(frozen=True)
class HeardReport:
    """What of a reply reached the user.

    Attributes:
        text: the heard part: a prefix of the reply exactly as streamed (cut at a word's end),
            so the assistant message can be cut to it; "" when nothing was played.
        fraction: ``len(text) / len(reply)`` (the reply as streamed so far); 0.0 for an empty reply.
        sentences: sentences heard to their end.
        partial: the cut falls inside a sentence (its words up to the estimated playback position).
        complete: the whole reply was heard.
        played_s: seconds of the reply's audio played.
        clocked: the answer comes from a playback clock.  False when the speaker plays nothing in
            real time (WAV files only, or no output): then ``text`` is everything streamed, and a
            caller whose device plays the files should use ``heard_prefix`` with its position.
        interrupt_to_silence_s: for ``Speaker.interrupt()``: seconds from the call until speech
            had stopped: the silent sink silenced, and every speech process (playing or still
            synthesizing) killed and reaped.  An upper bound on the audible delay.  Else None.
    """

    text: str
    fraction: float
    sentences: int
    partial: bool
    complete: bool
    played_s: float
    clocked: bool = True
    interrupt_to_silence_s: float | None = None


def cut_sentence(stream: str, sentence: Sentence | SentenceClock, fraction: float) -> int:
    """Where the heard part of a sentence ends in ``stream``, ``fraction`` of its audio having played.

    Returns an offset between ``sentence.start`` (nothing heard) and ``sentence.end`` (all of it),
    at the end of a word; any ``fraction`` above 0 keeps the first word.
    """
    start, end = sentence.start, sentence.end
    if fraction <= 0:
        return start
    if fraction >= 1:
        return end
    segment = stream[start:end]
    position = fraction * speech_weight(segment)
    cut, before = start, 0.0
    for word in _WORD.finditer(segment):
        if before >= position and cut > start:
            break  # its audio has not begun
        cut = start + word.end()
        before += speech_weight(word.group())
    return cut


def _seconds_per_letter(sentences: Sequence[Sentence], durations: Sequence[float | None]) -> float:
    """The speaking rate learned from the durations known, else espeak-ng's default."""
    seconds = weight = 0.0
    for sentence, duration in zip(sentences, durations, strict=False):
        if duration is not None and duration > 0:
            seconds += duration
            weight += speech_weight(sentence.text)
    return seconds / weight if weight > 0 else SECONDS_PER_LETTER


def heard_prefix(text: str, heard_ms: float, durations: Sequence[float | None] = (), *,
                 seconds_per_letter: float | None = None, max_chars: int = 200) -> HeardReport:
    """The part of ``text`` heard after ``heard_ms`` milliseconds of its audio (for a remote device).

    The reply is cut into sentences as the ``Speaker`` cuts it; the audio is taken to be the
    sentences back to back (pauses between them are not audio).

    Args:
        text: the reply as streamed.
        heard_ms: milliseconds of the reply's audio played.
        durations: seconds of audio of the first sentences, in order (``Speaker.durations()``,
            or the device's own figures); None or missing entries are estimated.
        seconds_per_letter: the rate for the estimate (default: learned from ``durations``,
            else ``SECONDS_PER_LETTER``).
        max_chars: the splitter's limit, if the speaker was built with another.

    Raises:
        ValueError: ``heard_ms`` is negative or not a number.
    """
    if isinstance(heard_ms, bool) or not isinstance(heard_ms, int | float) or not heard_ms >= 0:
        raise ValueError(f"heard_ms must be a number of milliseconds >= 0, not {heard_ms!r}")
    sentences = split_sentence_spans(text, max_chars)
    rate = seconds_per_letter if seconds_per_letter is not None else _seconds_per_letter(sentences, durations)
    left = heard_ms / 1000.0
    played = 0.0
    for k, sentence in enumerate(sentences):
        known = durations[k] if k < len(durations) else None
        duration = known if known is not None and known > 0 else speech_weight(sentence.text) * rate
        if left + 1e-9 >= duration:
            left -= duration
            played += duration
            continue
        played += left
        # A few microseconds over a sentence's end are rounding (ms -> s), not its first word.
        cut = cut_sentence(text, sentence, left / duration if left > 1e-6 else 0.0)
        if cut >= sentence.end:  # its last word has begun: heard to its end
            if k + 1 == len(sentences):
                break
            return HeardReport(text[:cut], _fraction(cut, text), k + 1, False, False, played)
        if cut == sentence.start:  # nothing of it: end with the sentence before, not the space after it
            cut = sentences[k - 1].end if k else 0
        return HeardReport(text[:cut], _fraction(cut, text), k, cut > sentence.start, False, played)
    return HeardReport(text, 1.0 if text else 0.0, len(sentences), False, True, played)


def _fraction(cut: int, text: str) -> float:
    return cut / len(text) if text else 0.0
