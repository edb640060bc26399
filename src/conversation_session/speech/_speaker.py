"""Speaker: speaks a streamed reply sentence by sentence, in a worker thread, with a bounded wait.

It keeps a playback clock (when each sentence started playing and how long it lasts), so that an
interrupted reply can be cut to what the user heard: ``interrupt()``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
import wave
import weakref
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from ._engine import SpeechEngine, SpeechJob, sound_device_available
from ._espeak import ESPEAK_BINARY_ENV, EspeakEngine
from ._heard import SECONDS_PER_LETTER, HeardReport, SentenceClock, cut_sentence, speech_weight
from ._split import Sentence, SentenceSplitter, clean_for_speech, script_runs

__all__ = ["PLAYBACK_CHOICES", "TTS_CHOICES", "Playback", "Speaker", "SpeechReport", "SpeechTimeout",
           "create_speaker"]

logger = logging.getLogger("conversation_session.speech")

TTS_CHOICES = ("espeak", "none")
#: ``playback=``: "device" plays on the sound device, "silent" is a real-time silent sink (each
#: sentence "plays" for its duration without a device: headless machines and tests), "off" plays
#: nothing (WAV files only, if ``output_dir``), "auto" is "device" when one is found, else "off".
PLAYBACK_CHOICES = ("auto", "device", "silent", "off")
Playback = bool | str | None
# How long cancel() waits for the worker to reap the process it has just killed.
_REAP_TIMEOUT_S = 2.0
_UNSAFE_IN_NAMES = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class SpeechReport:
    """What the speech of one turn did.

    Attributes:
        sentences: sentences spoken (or written) completely.
        first_audio_s: seconds from the turn's start to the first audio being ready (WAV written
            or playback started); None when nothing was spoken.
        wav_files: the WAV files written, in order.
        total_s: seconds from the turn's start until the speech was done (or stopped).
        errors: language runs the engine failed on (logged as warnings).
        interrupted: ``Speaker.interrupt()`` stopped the speech of this turn.
        heard: what ``interrupt()`` found had reached the user (None if not interrupted).
    """

    sentences: int = 0
    first_audio_s: float | None = None
    wav_files: list[Path] = field(default_factory=list)
    total_s: float = 0.0
    errors: int = 0
    interrupted: bool = False
    heard: HeardReport | None = None


class SpeechTimeout(Exception):
    """``Speaker.finish`` ran out of time; the speech has been stopped.

    Attributes:
        report: what was spoken before the deadline.
        timeout: the limit that expired, in seconds.
    """

    def __init__(self, message: str, *, report: SpeechReport, timeout: float | None):
        super().__init__(message)
        self.report = report
        self.timeout = timeout


@dataclass
class _Turn:
    t0: float
    label: str
    report: SpeechReport = field(default_factory=SpeechReport)
    queued: int = 0           # sentences handed to the worker
    stopped: bool = False     # cancelled: later feeds are ignored until the next turn
    lang: str = "en"          # the last language spoken: a sentence of digits only keeps it
    failure_logged: bool = False
    pieces: list[str] = field(default_factory=list)        # the reply as streamed
    clock: list[SentenceClock] = field(default_factory=list)
    flushed: bool = False     # finish() queued the last sentence: the reply is complete
    interrupting: bool = False  # interrupt() is working out what was heard

    def text(self) -> str:
        if len(self.pieces) > 1:
            self.pieces[:] = ["".join(self.pieces)]
        return self.pieces[0] if self.pieces else ""


class Speaker:
    """Speaks a reply while it streams: ``start_turn``, ``feed`` each piece, then ``finish``.

    ``feed`` only cuts sentences and queues them; a worker thread synthesizes and plays them in
    order, so the chat thread never waits for audio.  Every method is thread-safe.

    Args:
        engine: the speech engine.
        output_dir: also write each sentence (each language run of it) as a WAV file here:
            ``<output_dir>/<turn_label>_<sentence>_<run>_<lang>.wav``, which sort in order.
        playback: where the audio goes (``PLAYBACK_CHOICES``): ``"device"`` (or True) the sound
            device, ``"silent"`` a real-time silent sink, ``"off"`` (or False) nowhere, ``"auto"``
            (or None) the device when one is found.  With no playback and no ``output_dir``
            speech is skipped, after one warning.

    Raises:
        ValueError: ``playback`` is not one of ``PLAYBACK_CHOICES``.
    """

    def __init__(self, engine: SpeechEngine, *, output_dir: str | os.PathLike[str] | None = None,
                 playback: Playback = None):
        self.engine = engine
        #: "device", "silent" or "off".
        self.playback_mode = _playback_mode(playback, engine)
        #: whether it plays on the sound device.
        self.playback = self.playback_mode == "device"
        self.output_dir: Path | None = None
        if output_dir is not None:
            try:
                Path(output_dir).mkdir(parents=True, exist_ok=True)
                self.output_dir = Path(output_dir)
            except OSError as exc:
                # Speech must never cost the conversation: go on without the files.
                logger.warning("cannot create the speech output folder %s (%s); WAV files are not written",
                               output_dir, exc.strerror or exc)
        if not self.active:
            why = ("playback is off" if _playback_name(playback) == "off" else
                   "no sound device found" if engine.can_play else f"the {engine.name} engine cannot play sound")
            logger.warning("%s, so speech is not played; use --tts-output-dir DIR (output_dir=...) to save "
                           "it as WAV files", why)
        self._cond = threading.Condition()
        self._queue: deque[tuple[int, _Turn, SentenceClock]] = deque()  # (generation, turn, sentence)
        self._generation = 0      # bumped by cancel(): work of an older generation is dropped
        self._busy = False        # the worker is speaking a sentence
        # The silent sink's sentence playing, and when it ends: it plays on while the worker
        # synthesizes the next one, so that sentences follow each other as on a sound device.
        self._sink: tuple[_Turn, SentenceClock] | None = None
        self._sink_until = 0.0
        self._job: SpeechJob | None = None
        self._closed = False
        self._splitter = SentenceSplitter()
        self._turn: _Turn | None = None
        self._scratch: str | None = None  # the silent sink's WAV files when there is no output_dir
        self._thread = threading.Thread(target=self._work, name=f"speech-{engine.name}", daemon=True)
        self._thread.start()
        # Killing the children at interpreter exit: a sentence must not go on playing after the app quits.
        self._finalizer = weakref.finalize(self, self.close)

    @property
    def active(self) -> bool:
        """Whether speech goes anywhere (a sound device, the silent sink or a folder)."""
        return self.playback_mode != "off" or self.output_dir is not None

    @property
    def clocked(self) -> bool:
        """Whether speech plays in real time, so the playback clock can tell what was heard."""
        return self.playback_mode != "off"

    @property
    def first_audio_s(self) -> float | None:
        """Seconds from the current (or last) turn's start to its first audio being ready."""
        turn = self._turn
        return turn.report.first_audio_s if turn is not None else None

    # -- the chat thread's side -----------------------------------------------------------
    def start_turn(self, t0: float, turn_label: str) -> None:
        """Begin a reply: ``t0`` is ``time.perf_counter()`` at its start, ``turn_label`` names its WAV files.

        Speech still running from an earlier turn is stopped.
        """
        label = _UNSAFE_IN_NAMES.sub("_", turn_label).strip("._") or "speech"
        with self._cond:
            if self._queue or self._busy or self._sink is not None:
                logger.debug("speech of the previous turn stopped by a new turn")
                self._stop_locked()
            self._splitter.reset()
            self._turn = _Turn(t0=t0, label=label)

    def feed(self, piece: str) -> None:
        """Add a streamed piece of the reply; returns at once (complete sentences are queued)."""
        if not piece:
            return
        with self._cond:
            if self._closed:
                return
            if self._turn is None:
                self._turn = _Turn(t0=time.perf_counter(), label="speech")
            self._turn.pieces.append(piece)  # the text heard is cut out of this
            if self._turn.stopped or not self.active:
                return
            self._enqueue_locked(self._splitter.feed_spans(piece))

    def finish(self, timeout: float | None) -> SpeechReport:
        """The reply is complete: speak its last sentence and wait until all speech is done.

        Args:
            timeout: seconds to wait at most (None: no limit).

        Raises:
            SpeechTimeout: the speech took longer; it has been stopped (processes killed, queue
                dropped) before this is raised.
        """
        deadline = None if timeout is None else time.perf_counter() + timeout
        with self._cond:
            turn = self._turn
            if turn is None:
                return SpeechReport()
            if not turn.stopped and not self._closed:
                if self.active:
                    self._enqueue_locked(self._splitter.flush_spans())
                turn.flushed = True
            try:
                while self._queue or self._busy or self._sink is not None or turn.interrupting:
                    wait = None if deadline is None else deadline - time.perf_counter()
                    if wait is not None and wait <= 0:
                        self._stop_locked()
                        self._await_idle_locked()
                        turn.report.total_s = time.perf_counter() - turn.t0
                        raise SpeechTimeout(
                            f"speech did not finish within {timeout} s and was stopped "
                            f"({turn.report.sentences} of {turn.queued} sentences spoken)",
                            report=_copy(turn.report), timeout=timeout,
                        )
                    self._cond.wait(wait)
            except BaseException as exc:
                if not isinstance(exc, SpeechTimeout):  # Ctrl-C while waiting: silence at once
                    self._stop_locked()
                raise
            turn.report.total_s = time.perf_counter() - turn.t0
            if turn.report.first_audio_s is not None:
                logger.debug("speech: %d sentences, first audio %.3f s, done %.3f s after the turn started",
                             turn.report.sentences, turn.report.first_audio_s, turn.report.total_s)
            return _copy(turn.report)

    def cancel(self) -> None:
        """Stop speaking now: kill the running synthesis, drop the queue.  Idempotent."""
        with self._cond:
            self._stop_locked()
            self._await_idle_locked()

    def interrupt(self) -> HeardReport:
        """Barge-in: stop speaking now, like ``cancel()``, and return what of the reply reached the user.

        The sentences played to their end, then the words of the one playing at that moment up to
        its estimated playback position (see ``conversation_session.speech._heard``).  After the
        reply was played completely: all of it; before any audio: "".  Without a playback clock
        (``clocked`` is False) the report holds all the text streamed, with ``clocked=False``.
        ``interrupt_to_silence_s`` is measured: until the silent sink is silenced and the speech
        processes are killed and reaped.  On the sound device, a sentence cut off before its length
        was known is then measured (``SpeechEngine.measure``: espeak-ng synthesizes it again into a
        pipe, ~40 ms), after the silence.  Idempotent: a second call reports the same text.
        """
        t = time.perf_counter()
        with self._cond:
            turn = self._turn
            if turn is not None:
                turn.interrupting = True  # finish() waiting in another thread returns the heard part too
            try:
                self._stop_locked()
                self._await_idle_locked()
                silence = time.perf_counter() - t
                if turn is None:
                    return HeardReport("", 0.0, 0, False, False, 0.0, self.clocked, silence)
                # Under the lock, so that no other turn starts meanwhile; the worker is idle by now.
                heard = replace(self._heard(*self._snapshot_locked(turn), now=t), interrupt_to_silence_s=silence)
                turn.report.interrupted = True
                turn.report.heard = heard
                return heard
            finally:
                if turn is not None:
                    turn.interrupting = False
                    self._cond.notify_all()

    def heard(self) -> HeardReport:
        """What of the current (or last) reply has reached the user so far, without stopping it."""
        with self._cond:
            turn = self._turn
            if turn is None:
                return HeardReport("", 0.0, 0, False, False, 0.0, self.clocked)
            snapshot = self._snapshot_locked(turn)
        return self._heard(*snapshot, now=time.perf_counter())

    def clock(self) -> list[SentenceClock]:
        """The playback clock of the current (or last) turn: one record per sentence queued, in order."""
        with self._cond:
            return [replace(entry) for entry in self._turn.clock] if self._turn is not None else []

    def durations(self) -> list[float | None]:
        """Seconds of audio of each sentence of the current turn so far (None: not known yet),
        for ``heard_prefix`` when the caller's own device plays the audio."""
        return [entry.duration for entry in self.clock()]

    def close(self) -> None:
        """Stop speaking and end the worker thread.  Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._stop_locked()
            self._cond.notify_all()
        self._finalizer.detach()
        if threading.current_thread() is not self._thread:
            self._thread.join(_REAP_TIMEOUT_S)
        self.engine.close()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def __enter__(self) -> Speaker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _enqueue_locked(self, sentences: list[Sentence]) -> None:
        turn = self._turn
        assert turn is not None
        for sentence in sentences:
            turn.queued += 1
            entry = SentenceClock(turn.queued, sentence.text, sentence.start, sentence.end)
            turn.clock.append(entry)
            self._queue.append((self._generation, turn, entry))
        if sentences:
            self._cond.notify_all()

    def _stop_locked(self) -> None:
        self._generation += 1
        self._queue.clear()
        self._splitter.reset()
        if self._turn is not None:
            self._turn.stopped = True
        if self._job is not None:
            self._job.kill()
        if self._sink is not None:  # the silent sink goes silent right here
            if time.perf_counter() >= self._sink_until:
                self._sink_done_locked()
            else:
                self._sink[1].ended = time.perf_counter()
                self._sink = None
        self._cond.notify_all()

    def _snapshot_locked(self, turn: _Turn) -> tuple[str, list[SentenceClock], bool]:
        return turn.text(), [replace(entry) for entry in turn.clock], turn.flushed

    def _heard(self, text: str, clock: list[SentenceClock], flushed: bool, *, now: float) -> HeardReport:
        """The heard prefix of ``text`` by the clock records, the position taken at ``now``."""
        if not self.clocked:
            return HeardReport(text, 1.0 if text else 0.0, sum(e.completed for e in clock), False, flushed, 0.0,
                               clocked=False)
        played = 0.0
        cut_at, full, partial = 0, 0, False
        for entry in clock:
            if entry.completed:
                full += 1
                cut_at = entry.end
                played += entry.played_s(now)
                continue
            if entry.started is not None:  # the sentence playing (or cut off)
                elapsed = entry.played_s(now)
                duration = entry.duration if entry.duration else self._estimate(entry, clock)
                played += min(elapsed, duration)
                cut = cut_sentence(text, entry, elapsed / duration if duration > 0 else 1.0)
                if cut >= entry.end:
                    full += 1
                    cut_at = entry.end
                elif cut > entry.start:
                    cut_at, partial = cut, True
            break
        if flushed and full == len(clock):
            return HeardReport(text, 1.0 if text else 0.0, full, False, True, played)
        return HeardReport(text[:cut_at], cut_at / len(text) if text else 0.0, full, partial, False, played)

    def _estimate(self, entry: SentenceClock, clock: list[SentenceClock]) -> float:
        """The length of a sentence cut off on the sound device: asked of the engine, else from the rate."""
        runs = script_runs(clean_for_speech(entry.text))
        try:
            measured = [self.engine.measure(run, lang) for lang, run in runs]
        except Exception:  # a plug-in engine's failure costs the estimate only
            logger.debug("speech: %s could not measure a sentence", self.engine.name, exc_info=True)
            measured = [None]
        if runs and all(m is not None and m > 0 for m in measured):
            return sum(m for m in measured if m is not None)
        seconds = weight = 0.0
        for done in clock:
            if done.completed and done.duration:
                seconds += done.duration
                weight += speech_weight(done.text)
        rate = seconds / weight if weight > 0 else SECONDS_PER_LETTER
        return max(speech_weight(entry.text) * rate, 1e-3)

    def _await_idle_locked(self) -> None:
        """Let the worker reap the process just killed, so none is left when cancel() returns."""
        if threading.current_thread() is self._thread:
            return
        deadline = time.perf_counter() + _REAP_TIMEOUT_S
        while self._busy and (left := deadline - time.perf_counter()) > 0:
            self._cond.wait(left)

    # -- the worker thread ----------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    if self._sink is None:
                        self._cond.wait()
                    elif (left := self._sink_until - time.perf_counter()) > 0:
                        self._cond.wait(left)
                    else:
                        self._sink_done_locked()
                if self._closed:
                    return
                generation, turn, entry = self._queue.popleft()
                self._busy = True
            try:
                self._speak_sentence(generation, turn, entry)
            except Exception:  # a speech failure must not end the worker
                logger.exception("speech failed on sentence %d", entry.number)
            finally:
                with self._cond:
                    playing_on = self._sink is not None and self._sink[1] is entry
                    if entry.started is not None and entry.ended is None and not playing_on:
                        entry.ended = time.perf_counter()  # cut off: silent from now
                    self._busy = False
                    self._cond.notify_all()

    def _speak_sentence(self, generation: int, turn: _Turn, entry: SentenceClock) -> None:
        runs = script_runs(clean_for_speech(entry.text), default=turn.lang)
        if runs:
            turn.lang = runs[-1][0]
        if self.output_dir is not None or self.playback_mode == "silent":
            # WAV first: its frames give the sentence's duration before it plays.
            seconds = 0.0
            keep = self.output_dir is not None
            folder = self.output_dir if self.output_dir is not None else self._scratch_dir()
            for k, (lang, run) in enumerate(runs, 1):
                path = folder / f"{turn.label}_{entry.number:04d}_{k:02d}_{lang}.wav"
                try:
                    if not self._run(generation, turn, run, lang, path, entry):
                        return
                    length = _wav_seconds(path)
                    if length is not None and length > 0:
                        seconds += length
                        if keep:
                            turn.report.wav_files.append(path)
                            self._audio_ready(turn)
                finally:
                    if not keep:
                        path.unlink(missing_ok=True)
            with self._cond:
                entry.duration = seconds
            if self.playback_mode == "silent":
                self._play_silent(generation, turn, entry)
                return  # the sink completes it once its time has passed
        if self.playback:
            for lang, run in runs:
                if not self._run(generation, turn, run, lang, None, entry):
                    return
        with self._cond:
            if generation == self._generation:
                now = time.perf_counter()
                if self.clocked:
                    if entry.started is None:  # nothing to play (the engine failed): passed over
                        entry.started = now
                    if entry.ended is None:
                        entry.ended = now
                    if entry.duration is None:  # played on the device: as long as it took
                        entry.duration = entry.ended - entry.started
                entry.completed = True
                turn.report.sentences += 1

    def _play_silent(self, generation: int, turn: _Turn, entry: SentenceClock) -> None:
        """Hand the sentence to the silent sink once the one before has played out; returns at once."""
        with self._cond:
            while self._sink is not None and generation == self._generation and not self._closed:
                if (left := self._sink_until - time.perf_counter()) > 0:
                    self._cond.wait(left)
                else:
                    self._sink_done_locked()
            if generation != self._generation or self._closed:
                return
            seconds = entry.duration or 0.0
            entry.started = time.perf_counter()
            if seconds > 0:
                self._audio_ready(turn)
            self._sink = (turn, entry)
            self._sink_until = entry.started + seconds

    def _sink_done_locked(self) -> None:
        """The silent sink's sentence has played to its end."""
        assert self._sink is not None
        turn, entry = self._sink
        self._sink = None
        entry.ended = self._sink_until
        entry.completed = True
        turn.report.sentences += 1
        self._cond.notify_all()

    def _scratch_dir(self) -> Path:
        if self._scratch is None:
            self._scratch = tempfile.mkdtemp(prefix="conversation-speech-")
        return Path(self._scratch)

    def _run(self, generation: int, turn: _Turn, text: str, lang: str, wav_path: Path | None,
             entry: SentenceClock) -> bool:
        """Have the engine speak one run and wait for it; False when speech was stopped meanwhile."""
        try:
            job = self.engine.speak(text, lang, wav_path)
        except OSError as exc:
            self._failed(turn, f"{self.engine.name} could not start: {exc}")
            return generation == self._generation
        with self._cond:
            current = generation == self._generation and not self._closed
            if current:
                self._job = job
                if wav_path is None and entry.started is None:
                    entry.started = time.perf_counter()  # the clock runs from the first run's start
            else:
                job.kill()  # cancel() came while it was starting
        if current and wav_path is None:
            self._audio_ready(turn)  # playback has started
        try:
            code = job.wait()
        except BaseException:
            job.kill()
            job.wait()
            raise
        finally:
            with self._cond:
                if self._job is job:
                    self._job = None
        with self._cond:
            if generation != self._generation or self._closed:
                return False
        if code != 0:
            detail = getattr(job, "error", "") or f"exit status {code}"
            self._failed(turn, f"{self.engine.name} failed on a {lang} run: {detail}")
        return True

    def _audio_ready(self, turn: _Turn) -> None:
        if turn.report.first_audio_s is None:
            turn.report.first_audio_s = time.perf_counter() - turn.t0

    def _failed(self, turn: _Turn, message: str) -> None:
        turn.report.errors += 1
        if not turn.failure_logged:  # one warning per turn, not one per sentence
            turn.failure_logged = True
            logger.warning("speech: %s", message)


def _copy(report: SpeechReport) -> SpeechReport:
    return replace(report, wav_files=list(report.wav_files))


def _wav_seconds(path: Path) -> float | None:
    """The duration of a WAV file from its frames and rate; None when it is missing or unreadable."""
    try:
        with wave.open(str(path)) as w:
            rate, frames = w.getframerate(), w.getnframes()
    except (OSError, EOFError, wave.Error):
        return None
    return frames / rate if rate > 0 else None


def _playback_name(playback: Playback) -> str:
    """The ``PLAYBACK_CHOICES`` name asked for."""
    if playback is None:
        return "auto"
    if isinstance(playback, bool):
        return "device" if playback else "off"
    name = playback.strip().lower() if isinstance(playback, str) else None
    if name in ("none", "no", "false"):
        name = "off"
    if name not in PLAYBACK_CHOICES:
        raise ValueError(f"playback must be one of {', '.join(PLAYBACK_CHOICES)} (or True/False/None), "
                         f"not {playback!r}")
    return name


def _playback_mode(playback: Playback, engine: SpeechEngine) -> str:
    """Where the audio goes: "device", "silent" or "off"."""
    name = _playback_name(playback)
    if name == "auto":
        return "device" if engine.can_play and sound_device_available() else "off"
    if name == "device" and not engine.can_play:
        return "off"
    return name


def create_speaker(tts: str | SpeechEngine | None, *, output_dir: str | os.PathLike[str] | None = None,
                   rate: int | None = None, voice: str | Mapping[str, str] | None = None,
                   playback: Playback = None) -> Speaker | None:
    """The ``Speaker`` for a ``tts`` setting, or None for silence.

    Args:
        tts: ``None`` or ``"none"`` (silent), ``"espeak"``, or a ``SpeechEngine`` object (then
            ``rate`` and ``voice`` are the engine's own business and ignored here).
        output_dir: write the speech as WAV files into this folder.
        rate: words per minute.
        voice: one voice for all text, or a mapping from language (``"en"``, ``"cmn"``) to voice.
        playback: ``"device"`` (True), ``"silent"`` (the real-time silent sink), ``"off"`` (False),
            ``"auto"`` (None: the device when one is found).

    Returns:
        None when ``tts`` is None, or when espeak-ng is not installed (after one warning that says
        how to install it): the conversation goes on without speech.

    Raises:
        ValueError: ``tts`` is an unknown name, or ``rate`` or ``playback`` is invalid.
    """
    if tts is None:
        return None
    if isinstance(tts, SpeechEngine):
        engine: SpeechEngine = tts
    elif isinstance(tts, str):
        name = tts.strip().lower()
        if name in ("none", "off", ""):
            return None
        if name not in ("espeak", "espeak-ng"):
            raise ValueError(f"unknown tts {tts!r}; choose one of: {', '.join(TTS_CHOICES)} "
                             "(or pass a SpeechEngine object)")
        try:
            engine = EspeakEngine(rate=rate, voice=voice)
        except FileNotFoundError as exc:
            logger.warning("speech is off: %s (or set %s to its path)", exc, ESPEAK_BINARY_ENV)
            return None
    else:
        raise TypeError(f"tts must be None, a name ({', '.join(TTS_CHOICES)}) or a SpeechEngine, "
                        f"not {type(tts).__name__}")
    return Speaker(engine, output_dir=output_dir, playback=playback)

