"""The interactive prompt (prompt_toolkit): input history kept across runs, Tab completion
of commands, session ids and (after ``/model``) the backend's model names, Alt-Enter for a new
line within a message."""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.patch_stdout import patch_stdout

from ..stores._fileio import FileTooLargeError, NotARegularFileError, open_regular, read_regular_file
from ._commands import completions

__all__ = ["make_prompt"]

logger = logging.getLogger("conversation_session.cli")


class _ChatCompleter(Completer):
    def __init__(self, session_ids: Callable[[], Iterable[str]],
                 model_names: Callable[[], Iterable[str]] | None = None):
        self.session_ids = session_ids
        self.model_names = model_names

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterator[Completion]:
        for text, start in completions(document.text_before_cursor, self.session_ids, self.model_names):
            yield Completion(text, start_position=-start)


_HISTORY_MAX_BYTES = 64 << 20  # a planted huge file is not read into memory


class _RegularFileHistory(FileHistory):
    """prompt_toolkit's ``FileHistory``, except that the file is opened as the stores open
    theirs (``open_regular``): never blocking, never through a symlink, only a regular file.
    A FIFO planted as the history would otherwise hang the chat at the first message (opening
    a FIFO for writing waits for a reader).  If the file stops being a regular file, the
    history goes on in memory for this run, and that is said once."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self.path = path
        self.broken = False

    def _give_up(self, exc: OSError) -> None:
        if not self.broken:
            self.broken = True
            logger.warning("%s %s; input history is kept for this run only", self.path,
                           exc.strerror or exc)

    def load_history_strings(self) -> Iterable[str]:
        try:
            raw = bytes(read_regular_file(self.path, _HISTORY_MAX_BYTES))
        except FileNotFoundError:
            return []
        except (NotARegularFileError, FileTooLargeError) as exc:
            self._give_up(exc)
            return []
        except OSError as exc:
            logger.warning("input history not read: %s", exc)
            return []
        strings: list[str] = []
        lines: list[str] = []
        for line in raw.decode("utf-8", errors="replace").splitlines(keepends=True):
            if line.startswith("+"):
                lines.append(line[1:])
            elif lines:
                strings.append("".join(lines)[:-1])
                lines = []
        if lines:
            strings.append("".join(lines)[:-1])
        return list(reversed(strings))  # newest first, as FileHistory returns them

    def store_string(self, string: str) -> None:
        if self.broken:
            return
        text = f"\n# {datetime.datetime.now()}\n" + "".join(f"+{line}\n" for line in string.split("\n"))
        try:
            fd = open_regular(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        except NotARegularFileError as exc:
            self._give_up(exc)
            return
        except OSError as exc:
            logger.warning("input history not saved: %s", exc)
            return
        try:
            os.write(fd, text.encode("utf-8", errors="replace"))
        except OSError as exc:
            logger.warning("input history not saved: %s", exc)
        finally:
            os.close(fd)


def _history(directory: str | os.PathLike[str] | None) -> History:
    if directory is None:
        return InMemoryHistory()
    path = Path(directory) / ".input_history"
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT))
    except NotARegularFileError as exc:
        # A FIFO, a device, a directory or a symlink stands there: treated as absent, as the
        # stores treat such files (`doctor` names the session files among them).
        logger.warning("%s %s; input history is kept for this run only", path, exc.strerror or exc)
        return InMemoryHistory()
    except OSError as exc:
        logger.warning("input history not kept across runs: %s", exc)
        return InMemoryHistory()
    return _RegularFileHistory(path)


def make_prompt(directory: str | os.PathLike[str] | None,
                session_ids: Callable[[], Iterable[str]], *,
                on_typing: Callable[[], None] | None = None,
                model_names: Callable[[], Iterable[str]] | None = None) -> Callable[[str], str]:
    """``ask(prompt) -> line``.  ``on_typing`` is called at each change of the line being typed
    (the chat's barge-in: typing while a reply is spoken interrupts it)."""
    keys = KeyBindings()

    @keys.add("escape", "enter")  # Alt-Enter (Esc then Enter): a new line, not "send"
    def _newline(event: KeyPressEvent) -> None:
        event.current_buffer.insert_text("\n")

    ps: PromptSession[str] = PromptSession(history=_history(directory),
                                           completer=_ChatCompleter(session_ids, model_names),
                                           complete_while_typing=False, key_bindings=keys)
    if on_typing is not None:
        ps.default_buffer.on_text_changed += lambda _buffer: on_typing()

    def ask(prompt: str) -> str:
        # Log lines and notices from other threads (a background save) print above the
        # prompt, which is then drawn again, instead of over the line being typed.
        with patch_stdout(raw=True):
            return ps.prompt(prompt)

    return ask
