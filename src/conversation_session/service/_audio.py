"""The audio of a WebSocket's replies: each sentence synthesised (the speech engine, WAV) and sent
as a binary frame after a JSON ``{"type": "audio", "sentence": i, "format": "wav", "bytes": n}``.

Why a stream per connection with a worker task of its own: synthesis takes a process per run
of one language (~20 ms a sentence for espeak-ng), which must neither block the event loop nor
delay the text pieces; a single worker per connection keeps the audio in sentence order while
the text streams ahead of it.  The engine runs in a thread (a pool shared by the worker's
connections) into a temporary file, read and unlinked at once; the folder is removed when the
connection closes.

``stop()`` (an interrupt) drops the queued sentences and kills the running process; nothing of
the stopped audio is sent afterwards (the generation is checked under the connection's send
lock, so no audio frame follows the event that reports the stop).  ``aclose()`` (a disconnect)
stops and waits for the worker, so no synthesis process outlives the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import logging
import shutil
import tempfile
import threading
import wave
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from ..speech import SpeechEngine, SpeechJob, clean_for_speech, script_runs, wav_bytes_seconds

__all__ = ["AUDIO_FORMATS", "AudioStream", "join_wavs"]

logger = logging.getLogger("conversation_session.service")

AUDIO_FORMATS = ("wav",)
"""What ``?audio=`` may ask for."""

SendAudio = Callable[[dict[str, Any], bytes | None, Callable[[], bool]], Awaitable[None]]
"""``send(event, frame, still_wanted)``: under the connection's send lock, if ``still_wanted()``,
the JSON event then (when not None) the binary frame, back to back."""


class SpeechFailed(Exception):
    """The engine failed on a run (its message says why)."""


def join_wavs(parts: list[bytes]) -> bytes:
    """One WAV of the PCM of ``parts`` (one per language run, all from one engine), with a
    correct header: ``--stdout``-style headers have no sizes, and a client wants one file."""
    fmt: tuple[int, int, int] | None = None
    frames = bytearray()
    for data in parts:
        at = data.find(b"data", 12)
        if not data.startswith(b"RIFF") or data[8:12] != b"WAVE" or at < 0 or len(data) < 36:
            raise SpeechFailed("the engine did not write a WAV file")
        here = (int.from_bytes(data[22:24], "little"), int.from_bytes(data[24:28], "little"),
                int.from_bytes(data[34:36], "little"))
        if fmt is None:
            fmt = here
        elif here != fmt:
            raise SpeechFailed(f"runs of one sentence in different formats: {fmt} and {here}")
        frames += data[at + 8:]
    if fmt is None:
        raise SpeechFailed("nothing to say")
    channels, rate, bits = fmt
    frame = max(channels * bits // 8, 1)
    del frames[len(frames) - len(frames) % frame:]
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(bits // 8)
        w.setframerate(rate)
        w.writeframes(bytes(frames))
    return out.getvalue()


class AudioStream:
    """The audio of one WebSocket connection's replies (see the module docstring)."""

    def __init__(self, engine: SpeechEngine, pool: Executor, send: SendAudio):
        self.engine = engine
        self._pool = pool
        self._send = send
        self._queue: asyncio.Queue[tuple[Any, ...] | None] = asyncio.Queue()
        self._gen = 0                       # bumped by stop(): older items are dropped
        self._lock = threading.Lock()       # guards _gen against the synthesis thread, and _job
        self._job: SpeechJob | None = None
        self._names = itertools.count()
        self._dir: Path | None = None
        self._lang = "en"                   # a sentence with no letters is said in the last language
        self._task: asyncio.Task[None] | None = None
        # The turn whose audio is in flight: sentences queued, sent, and their durations.
        self._open = False
        self._queued = 0
        self._sent = 0
        self._durations: list[float | None] = []

    # -- driven by the connection -------------------------------------------------------------
    def start_turn(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._work())
        self._queue.put_nowait(("start", self._gen))

    def sentence(self, text: str) -> None:
        """Queue sentence ``text`` of the current turn (numbered from 0 in the order given)."""
        self._queue.put_nowait(("sentence", self._gen, text))

    def end_turn(self) -> None:
        """No more sentences in this turn: ``audio_end`` follows its last audio."""
        self._queue.put_nowait(("end", self._gen))

    @property
    def pending(self) -> bool:
        """A turn's audio is still being made or sent."""
        return self._open or not self._queue.empty()

    def durations(self) -> list[float | None]:
        """Seconds of audio of the current turn's sentences sent so far, in order."""
        return list(self._durations)

    async def stop(self) -> dict[str, Any] | None:
        """Drop the queued audio and kill the running synthesis.  The ``audio_end`` event of the
        turn that was cut (``interrupted``: true), or None when no audio was in flight."""
        was_open = self.pending
        with self._lock:
            self._gen += 1
            job = self._job
        if job is not None:
            job.kill()
        while not self._queue.empty():
            self._queue.get_nowait()
        if not was_open:
            return None
        sent = self._sent
        self._open = False
        return {"type": "audio_end", "sentences": sent, "interrupted": True}

    async def aclose(self) -> None:
        """Stop, wait for the worker (its synthesis process is reaped), remove the temp folder."""
        await self.stop()
        task, self._task = self._task, None
        if task is not None:
            self._queue.put_nowait(None)
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                # Cancelled while waiting: the worker still ends (its process is killed); wait
                # for it, then let the cancellation go on.
                with contextlib.suppress(BaseException):
                    await task
                raise
            finally:
                self._remove_dir()
        else:
            self._remove_dir()

    # -- the worker -----------------------------------------------------------------------------
    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await self._queue.get()
            if item is None:
                return
            kind, gen = item[0], item[1]
            if gen != self._gen:
                continue
            if kind == "start":
                self._open, self._queued, self._sent, self._durations = True, 0, 0, []
            elif kind == "end":
                self._open = False
                await self._send({"type": "audio_end", "sentences": self._sent, "interrupted": False}, None,
                                 self._current(gen))
            else:
                index = self._queued
                self._queued += 1
                try:
                    data = await loop.run_in_executor(self._pool, self._synthesise, gen, item[2])
                except Exception as exc:  # noqa: BLE001 - told to the client; the text goes on
                    logger.warning("speech failed on sentence %d: %s", index, exc)
                    await self._send({"type": "error", "code": "speech_failed", "status": 500, "sentence": index,
                                      "message": f"no audio for sentence {index}: {exc}"}, None,
                                     self._current(gen))
                    self._durations.append(None)
                    continue
                if data is None:  # stopped meanwhile
                    continue
                event = {"type": "audio", "sentence": index, "format": "wav", "bytes": len(data)}
                wanted = self._current(gen)
                await self._send(event, data, wanted)
                if wanted():
                    self._sent += 1
                    self._durations.append(wav_bytes_seconds(data))

    def _current(self, gen: int) -> Callable[[], bool]:
        """Whether audio of generation ``gen`` is still wanted (no stop() since)."""
        return lambda: gen == self._gen

    def _synthesise(self, gen: int, text: str) -> bytes | None:
        """In a pool thread: the sentence's WAV, or None when stopped meanwhile."""
        runs = script_runs(clean_for_speech(text), default=self._lang)
        if not runs:
            raise SpeechFailed("nothing to say")
        self._lang = runs[-1][0]
        parts = []
        for lang, run in runs:
            path = self._folder() / f"{next(self._names)}.wav"
            try:
                with self._lock:
                    if gen != self._gen:
                        return None
                    job = self.engine.speak(run, lang, path)
                    self._job = job
                try:
                    code = job.wait()
                finally:
                    with self._lock:
                        if self._job is job:
                            self._job = None
                if gen != self._gen:
                    return None
                if code != 0:
                    raise SpeechFailed(getattr(job, "error", "") or f"{self.engine.name} exited with {code}")
                parts.append(path.read_bytes())
            finally:
                path.unlink(missing_ok=True)
        return join_wavs(parts)

    def _folder(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="cs-service-audio-"))
        return self._dir

    def _remove_dir(self) -> None:
        folder, self._dir = self._dir, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
