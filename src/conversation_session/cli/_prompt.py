"""The interactive prompt (prompt_toolkit): input history kept across runs, Tab completion
of commands, session ids and (after ``/model``) the backend's model names, Alt-Enter for a new
line within a message."""

from __future__ import annotations

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

__all__ = ["make_prompt"]

logger = logging.getLogger("conversation_session.cli")


class _ChatCompleter(Completer):
    def __init__(self, session_ids: Callable[[], Iterable[str]],
                 model_names: Callable[[], Iterable[str]] | None = None):
        self.session_ids = session_ids
        self.model_names = model_names

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterator[Completion]:
        from ._chat import completions

        for text, start in completions(document.text_before_cursor, self.session_ids, self.model_names):
            yield Completion(text, start_position=-start)


def _history(directory: str | os.PathLike[str] | None) -> History:
    if directory is None:
        return InMemoryHistory()
    path = Path(directory) / ".input_history"
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.touch(mode=0o600, exist_ok=True)
        return FileHistory(str(path))
    except OSError as exc:
        logger.warning("input history not kept across runs: %s", exc)
        return InMemoryHistory()


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
