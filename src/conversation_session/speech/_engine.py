"""The engine interface: what a text-to-speech backend (espeak-ng, piper, a cloud API) provides."""

from __future__ import annotations

import os
import subprocess
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

__all__ = ["ProcessJob", "SpeechEngine", "SpeechJob", "sound_device_available", "wav_bytes_seconds"]


@runtime_checkable
class SpeechJob(Protocol):
    """Speech in progress.  ``subprocess.Popen`` is one; so is ``ProcessJob``."""

    def wait(self, timeout: float | None = None) -> int:
        """Block until the speech is done; return its exit status (0 = success)."""
        ...

    def kill(self) -> None:
        """Stop it now (a no-op when it is already done)."""
        ...


class ProcessJob:
    """A ``SpeechJob`` for engines that run a program: ``kill()`` ends it, ``wait()`` reaps it.

    The program's stderr goes to an unnamed temporary file (a pipe could fill up and stall it)
    and is kept in ``error`` when it fails.
    """

    def __init__(self, args: list[str], *, stdin_text: str | None = None):
        self._stderr = tempfile.TemporaryFile()
        self.error = ""
        try:
            # Own session: Ctrl-C in the terminal reaches our process only; the Speaker then
            # stops speech itself, instead of each child dying on its own with an error status.
            self.proc = subprocess.Popen(
                args, stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=self._stderr, start_new_session=True,
            )
        except BaseException:
            self._stderr.close()
            raise
        if stdin_text is not None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write(stdin_text.encode("utf-8"))
                self.proc.stdin.close()
            except BrokenPipeError:
                pass  # it died at once: wait() reports the status and the message
            except BaseException:
                self.kill()
                self.wait()
                raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        code = self.proc.wait(timeout)
        if not self._stderr.closed:
            if code != 0:
                self._stderr.seek(0)
                self.error = self._stderr.read(2000).decode("utf-8", "replace").strip()
            self._stderr.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:  # exited between poll() and kill()
                pass


class SpeechEngine(ABC):
    """A text-to-speech backend.  Subclass it to plug in piper, pyttsx3, a cloud API, ...

    The ``Speaker`` splits text into sentences and each sentence into runs of one language,
    then calls ``speak`` for one run at a time, from its worker thread, in order.
    """

    name: ClassVar[str] = "engine"
    #: whether ``speak(..., wav_path=None)`` plays on the sound device.
    can_play: ClassVar[bool] = True

    @classmethod
    def available(cls) -> bool:
        """Whether the engine can run on this machine (its program or library is installed)."""
        return True

    @abstractmethod
    def speak(self, text: str, lang: str, wav_path: Path | None) -> SpeechJob:
        """Start speaking ``text`` in language ``lang`` (``"en"``, ``"cmn"``, ...) and return at once.

        With ``wav_path`` the audio goes into that file (16-bit PCM WAV), otherwise to the sound
        device.  The returned job is waited for, or killed on cancel and timeout.
        """

    def measure(self, text: str, lang: str) -> float | None:
        """Seconds of audio ``speak(text, lang, ...)`` makes, or None when the engine cannot tell.

        The playback clock asks when a sentence was cut off while playing on the sound device and
        its length is not known yet (it is known for WAV output); None falls back to an estimate
        from the speaking rate.
        """
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, most engines hold nothing
        """Release what the engine holds (a loaded voice model, a connection)."""


def sound_device_available() -> bool:
    """Whether audio can be played here: a PulseAudio/PipeWire server or an ALSA playback device.

    A guess from the environment, not a test: a headless machine (a server, a container, CI) has
    neither, and espeak-ng there fails noisily yet exits with status 0.
    """
    if os.environ.get("PULSE_SERVER"):
        return True
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    if any(os.path.exists(os.path.join(runtime, name)) for name in ("pulse/native", "pipewire-0")):
        return True
    try:
        return any(name.startswith("pcmC") and name.endswith("p") for name in os.listdir("/dev/snd"))
    except OSError:
        return False


def wav_bytes_seconds(data: bytes) -> float | None:
    """Seconds of PCM audio in a WAV file's bytes, counting the bytes after the ``data`` header.

    The bytes, not the header's sizes: a WAV written to a pipe (``espeak-ng --stdout``) cannot go
    back to fill them in.  None when ``data`` is not a PCM WAV.
    """
    at = data.find(b"data", 12)
    if not data.startswith(b"RIFF") or data[8:12] != b"WAVE" or at < 0 or len(data) < 36:
        return None
    channels = int.from_bytes(data[22:24], "little")
    rate = int.from_bytes(data[24:28], "little")
    bits = int.from_bytes(data[34:36], "little")
    frame = channels * bits // 8
    if rate <= 0 or frame <= 0:
        return None
    return max(0, len(data) - at - 8) // frame / rate
