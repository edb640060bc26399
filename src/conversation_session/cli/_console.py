"""Terminal output: colour and a spinner on a terminal, plain text anywhere else.

Two streams: ``out`` carries what the user asked for (replies, and what ``history``,
``stats``... print); ``err`` carries notices, warnings and errors.  On a terminal both are the
screen; piped, they are stdout and stderr, so a script gets only the replies on stdout.

Log records go through the console too (``ConsoleLogHandler``): while a reply is being
written they are held back and printed after it, each on a line of its own, so a library
warning never lands in the middle of the spinner or of the streamed text.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
from typing import TextIO

from ._text import escape_controls

__all__ = ["Console", "ConsoleLogHandler"]

_STYLES = {"dim": "2", "bold": "1", "italic": "3", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}


class Console:
    def __init__(self, out: TextIO | None = None, err: TextIO | None = None, *, tty: bool | None = None):
        # None: whatever sys.stdout is at the time of writing, so that while the prompt is up
        # (prompt_toolkit's patch_stdout) a notice from another thread prints above it.
        self._out = out
        self._err = err
        self.tty = self.out.isatty() if tty is None else tty
        self._spinner: threading.Thread | None = None
        self._spin_stop = threading.Event()
        self._lock = threading.RLock()
        self._held: list[str] | None = None   # notices held back while a reply streams
        self._mid_line = False                 # the last write to ``out`` did not end a line

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    @property
    def err(self) -> TextIO:
        return self._err or self.out

    def style(self, text: str, *names: str) -> str:
        if not self.tty or not names:
            return text
        codes = ";".join(_STYLES[n] for n in names)
        return f"\x1b[{codes}m{text}\x1b[0m"

    def write(self, text: str, stream: TextIO | None = None) -> None:
        stream = stream or self.out
        with self._lock:
            if stream is self.out and text:
                self._mid_line = not text.endswith("\n")
            stream.write(text)
            stream.flush()

    def _end_line(self, stream: TextIO) -> None:
        """Start ``stream``'s next text on a fresh line (after a half-written reply on the same screen)."""
        if self._mid_line and stream is self.out:
            self.write("\n")

    def end_line(self) -> None:
        """Go to a fresh line on the terminal if a reply was left half-written (before a question)."""
        with self._lock:
            self._end_line(self.out)

    def line(self, text: str = "", *styles: str) -> None:
        """Output the user asked for (stdout)."""
        self.stop_spinner()
        self._end_line(self.out)
        self.write(self.style(text, *styles) + "\n")

    def notice(self, text: str, *styles: str) -> None:
        """A notice (stderr when piped); held back while a reply is being written."""
        with self._lock:
            if self._held is not None:
                self._held.append(self.style(text, *styles))
                return
        self.stop_spinner()
        self._end_line(self.err)
        self.write(self.style(text, *styles) + "\n", self.err)

    def error(self, text: str) -> None:
        self.notice(f"❌ {text}", "red")

    def reply(self, piece: str) -> None:
        """A piece of a streamed reply: control characters shown, never obeyed."""
        self.write(escape_controls(piece))

    def rewrite(self, shown: str, text: str) -> bool:
        """Replace ``shown`` (just written, the cursor at its end) with ``text``; False (and
        nothing done) when it is not on a terminal or has scrolled beyond the top of the screen."""
        from ._markdown import screen_rows

        if not self.tty:
            return False
        try:
            columns, lines = os.get_terminal_size(self.out.fileno())
        except (OSError, ValueError, AttributeError):
            return False
        rows = screen_rows(shown, columns)
        if rows >= lines:
            return False
        up = f"\x1b[{rows - 1}A" if rows > 1 else ""
        self.write(f"\r{up}\x1b[J{text}")
        return True

    # -- holding notices during a reply -----------------------------------------------------
    def hold(self) -> None:
        with self._lock:
            if self._held is None:
                self._held = []

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, None
        for text in held or ():
            self.stop_spinner()
            self._end_line(self.err)
            self.write(text + "\n", self.err)

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


class ConsoleLogHandler(logging.Handler):
    """Library log records as console notices: ``⚠️ message`` on a terminal, the usual log
    format piped; never over the spinner or inside a streamed reply (see ``Console.hold``).

    ``drop`` filters out records the app reports in its own words (the trimming notice).
    """

    def __init__(self, console: Console, *, interactive: bool, level: int = logging.NOTSET):
        super().__init__(level)
        self.console = console
        self.interactive = interactive
        self.drop: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if any(text in message for text in self.drop):
                return
            if self.interactive:
                icon = "⚠️ " if record.levelno >= logging.WARNING else "·"
                self.console.notice(f"{icon} {message}", "yellow" if record.levelno >= logging.WARNING else "dim")
            else:
                self.console.notice(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never break the app
            self.handleError(record)
