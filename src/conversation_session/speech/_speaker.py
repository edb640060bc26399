"""Speaker: speaks a streamed reply sentence by sentence, in a worker thread, with a bounded wait."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ._engine import SpeechEngine, SpeechJob, sound_device_available
from ._espeak import ESPEAK_BINARY_ENV, EspeakEngine
from ._split import SentenceSplitter, clean_for_speech, script_runs

__all__ = ["TTS_CHOICES", "Speaker", "SpeechReport", "SpeechTimeout", "create_speaker"]

logger = logging.getLogger("conversation_session.speech")

TTS_CHOICES = ("espeak", "none")
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
    """

    sentences: int = 0
    first_audio_s: float | None = None
    wav_files: list[Path] = field(default_factory=list)
    total_s: float = 0.0
    errors: int = 0


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


class Speaker:
    """Speaks a reply while it streams: ``start_turn``, ``feed`` each piece, then ``finish``.

    ``feed`` only cuts sentences and queues them; a worker thread synthesizes and plays them in
    order, so the chat thread never waits for audio.  Every method is thread-safe.

    Args:
        engine: the speech engine.
        output_dir: also write each sentence (each language run of it) as a WAV file here:
            ``<output_dir>/<turn_label>_<sentence>_<run>_<lang>.wav``, which sort in order.
        playback: play on the sound device; None decides by looking for one.  With neither a
            device nor ``output_dir`` speech is skipped, after one warning.
    """

    def __init__(self, engine: SpeechEngine, *, output_dir: str | os.PathLike[str] | None = None,
                 playback: bool | None = None):
        self.engine = engine
        if playback is None:
            playback = engine.can_play and sound_device_available()
        self.playback = bool(playback and engine.can_play)
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
            why = "no sound device found" if engine.can_play else f"the {engine.name} engine cannot play sound"
            logger.warning("%s, so speech is not played; use --tts-output-dir DIR (output_dir=...) to save "
                           "it as WAV files", why)
        self._cond = threading.Condition()
        self._queue: deque[tuple[int, _Turn, int, str]] = deque()  # (generation, turn, number, text)
        self._generation = 0      # bumped by cancel(): work of an older generation is dropped
        self._busy = False        # the worker is speaking a sentence
        self._job: SpeechJob | None = None
        self._closed = False
        self._splitter = SentenceSplitter()
        self._turn: _Turn | None = None
        self._thread = threading.Thread(target=self._work, name=f"speech-{engine.name}", daemon=True)
        self._thread.start()
        # Killing the children at interpreter exit: a sentence must not go on playing after the app quits.
        self._finalizer = weakref.finalize(self, self.close)

    @property
    def active(self) -> bool:
        """Whether speech goes anywhere (a sound device or a folder)."""
        return self.playback or self.output_dir is not None

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
            if self._queue or self._busy:
                logger.debug("speech of the previous turn stopped by a new turn")
                self._stop_locked()
            self._splitter.reset()
            self._turn = _Turn(t0=t0, label=label)

    def feed(self, piece: str) -> None:
        """Add a streamed piece of the reply; returns at once (complete sentences are queued)."""
        if not piece or not self.active:
            return
        with self._cond:
            if self._closed:
                return
            if self._turn is None:
                self._turn = _Turn(t0=time.perf_counter(), label="speech")
            if self._turn.stopped:
                return
            self._enqueue_locked(self._splitter.feed(piece))

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
                self._enqueue_locked(self._splitter.flush())
            try:
                while self._queue or self._busy:
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

    def __enter__(self) -> Speaker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _enqueue_locked(self, sentences: list[str]) -> None:
        turn = self._turn
        assert turn is not None
        for sentence in sentences:
            turn.queued += 1
            self._queue.append((self._generation, turn, turn.queued, sentence))
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
                    self._cond.wait()
                if self._closed:
                    return
                generation, turn, number, text = self._queue.popleft()
                self._busy = True
            try:
                self._speak_sentence(generation, turn, number, text)
            except Exception:  # a speech failure must not end the worker
                logger.exception("speech failed on sentence %d", number)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _speak_sentence(self, generation: int, turn: _Turn, number: int, text: str) -> None:
        runs = script_runs(clean_for_speech(text), default=turn.lang)
        for k, (lang, run) in enumerate(runs, 1):
            turn.lang = lang
            if self.output_dir is not None:
                path = self.output_dir / f"{turn.label}_{number:04d}_{k:02d}_{lang}.wav"
                if not self._run(generation, turn, run, lang, path):
                    return
                if path.exists() and path.stat().st_size > 44:  # more than a WAV header
                    turn.report.wav_files.append(path)
                    self._audio_ready(turn)
            if self.playback and not self._run(generation, turn, run, lang, None):
                return
        with self._cond:
            if generation == self._generation:
                turn.report.sentences += 1

    def _run(self, generation: int, turn: _Turn, text: str, lang: str, wav_path: Path | None) -> bool:
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
    return SpeechReport(report.sentences, report.first_audio_s, list(report.wav_files), report.total_s,
                        report.errors)


def create_speaker(tts: str | SpeechEngine | None, *, output_dir: str | os.PathLike[str] | None = None,
                   rate: int | None = None, voice: str | Mapping[str, str] | None = None,
                   playback: bool | None = None) -> Speaker | None:
    """The ``Speaker`` for a ``tts`` setting, or None for silence.

    Args:
        tts: ``None`` or ``"none"`` (silent), ``"espeak"``, or a ``SpeechEngine`` object (then
            ``rate`` and ``voice`` are the engine's own business and ignored here).
        output_dir: write the speech as WAV files into this folder.
        rate: words per minute.
        voice: one voice for all text, or a mapping from language (``"en"``, ``"cmn"``) to voice.
        playback: play on the sound device; None looks for one.

    Returns:
        None when ``tts`` is None, or when espeak-ng is not installed (after one warning that says
        how to install it): the conversation goes on without speech.

    Raises:
        ValueError: ``tts`` is an unknown name, or ``rate`` is invalid.
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

