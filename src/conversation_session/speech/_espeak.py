"""The espeak-ng engine: one short-lived ``espeak-ng`` process per language run."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from ._engine import ProcessJob, SpeechEngine, wav_bytes_seconds

__all__ = ["ESPEAK_BINARY_ENV", "ESPEAK_INSTALL_HINT", "EspeakEngine", "find_espeak"]

#: Environment variable naming the espeak-ng program (a path or a name on $PATH).
ESPEAK_BINARY_ENV = "CONVERSATION_ESPEAK_BINARY"
ESPEAK_INSTALL_HINT = "install it with: sudo apt-get install espeak-ng"


def find_espeak(binary: str | os.PathLike[str] | None = None) -> str | None:
    """The espeak-ng program to run: ``binary``, else ``$CONVERSATION_ESPEAK_BINARY``, else ``espeak-ng``
    on ``$PATH``; None when it is not there or not executable."""
    name = os.fspath(binary) if binary is not None else (os.environ.get(ESPEAK_BINARY_ENV) or "espeak-ng")
    if os.sep in name:
        return name if os.path.isfile(name) and os.access(name, os.X_OK) else None
    return shutil.which(name)


class EspeakEngine(SpeechEngine):
    """espeak-ng: fast (a sentence in ~20 ms on one core), robotic, and in every Debian.

    Args:
        binary: the program (default: ``$CONVERSATION_ESPEAK_BINARY`` or ``espeak-ng`` on $PATH).
        rate: words per minute (espeak-ng's default is 175).
        voice: one espeak-ng voice for all text (``"en-us"``), or a mapping from language to
            voice that overrides the defaults (``{"en": "en-gb-x-rp"}``).

    Raises:
        FileNotFoundError: espeak-ng is not installed (the message says how to install it).
        ValueError: ``rate`` is not a positive number.
    """

    name: ClassVar[str] = "espeak"
    VOICES: ClassVar[Mapping[str, str]] = {"cmn": "cmn", "en": "en"}

    def __init__(self, *, binary: str | os.PathLike[str] | None = None, rate: int | None = None,
                 voice: str | Mapping[str, str] | None = None):
        found = find_espeak(binary)
        if found is None:
            wanted = binary if binary is not None else os.environ.get(ESPEAK_BINARY_ENV) or "espeak-ng"
            raise FileNotFoundError(f"espeak-ng not found ({wanted}); {ESPEAK_INSTALL_HINT}")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float) or rate <= 0):
            raise ValueError(f"rate must be a positive number of words per minute, not {rate!r}")
        self.binary = found
        self.rate = None if rate is None else round(rate)
        self._fixed_voice = voice if isinstance(voice, str) else None
        self._voices = {**self.VOICES, **(voice if isinstance(voice, Mapping) else {})}

    @classmethod
    def available(cls, binary: str | os.PathLike[str] | None = None) -> bool:
        return find_espeak(binary) is not None

    def voice_for(self, lang: str) -> str:
        """The espeak-ng voice for a language code; unknown codes get English."""
        return self._fixed_voice or self._voices.get(lang) or self._voices["en"]

    def _args(self, lang: str) -> list[str]:
        args = [self.binary, "-b", "1", "-v", self.voice_for(lang)]
        if self.rate is not None:
            args += ["-s", str(self.rate)]
        return args

    def speak(self, text: str, lang: str, wav_path: Path | None) -> ProcessJob:
        # Text on stdin, not argv: a sentence starting with "-" is not an option, and no length limit.
        args = self._args(lang)
        if wav_path is not None:
            args += ["-w", os.fspath(wav_path)]
        return ProcessJob(args, stdin_text=text)

    def measure(self, text: str, lang: str) -> float | None:
        # Synthesized again into a pipe (~20 ms a sentence): only asked for a sentence cut off
        # while playing on the sound device, after it has gone silent.
        try:
            done = subprocess.run([*self._args(lang), "--stdout"], input=text.encode("utf-8"),
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return wav_bytes_seconds(done.stdout) if done.returncode == 0 else None

    def __repr__(self) -> str:
        return f"<EspeakEngine {self.binary} rate={self.rate}>"
