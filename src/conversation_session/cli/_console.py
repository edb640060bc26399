"""Terminal output: colour and a spinner on a terminal, plain text anywhere else."""

from __future__ import annotations

import itertools
import sys
import threading
from typing import TextIO

__all__ = ["Console"]

_STYLES = {"dim": "2", "bold": "1", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}


class Console:
    def __init__(self, out: TextIO | None = None, *, tty: bool | None = None):
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self._spinner: threading.Thread | None = None
        self._spin_stop = threading.Event()
        self._lock = threading.Lock()

    def style(self, text: str, *names: str) -> str:
        if not self.tty or not names:
            return text
        codes = ";".join(_STYLES[n] for n in names)
        return f"\x1b[{codes}m{text}\x1b[0m"

    def write(self, text: str) -> None:
        with self._lock:
            self.out.write(text)
            self.out.flush()

    def line(self, text: str = "", *styles: str) -> None:
        self.stop_spinner()
        self.write(self.style(text, *styles) + "\n")

    def error(self, text: str) -> None:
        self.line(f"❌ {text}", "red")

    # -- spinner ---------------------------------------------------------------------------
    def start_spinner(self, label: str) -> None:
        """Show ``label`` with a spinner until ``stop_spinner`` (terminals only)."""
        if not self.tty or self._spinner is not None:
            return
        self._spin_stop.clear()

        def spin() -> None:
            for frame in itertools.cycle("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"):
                with self._lock:
                    self.out.write(f"\r{self.style(frame + ' ' + label, 'dim')}")
                    self.out.flush()
                if self._spin_stop.wait(0.08):
                    break
            with self._lock:
                self.out.write("\r\x1b[2K")
                self.out.flush()

        self._spinner = threading.Thread(target=spin, name="spinner", daemon=True)
        self._spinner.start()

    def stop_spinner(self) -> None:
        spinner = self._spinner
        if spinner is None:
            return
        self._spin_stop.set()
        spinner.join()
        self._spinner = None
