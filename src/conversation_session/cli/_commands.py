"""The chat's commands: one table (the help text in ``--help`` and ``help`` comes from it) and
the rule that tells a command from a message.

A bare word is a command only when it is the whole line (``history``, ``stats``, ``quit``, as
the seed shows them); a line that merely starts with one ("help me write a poem", "quit
smoking tips") is a message.  Commands with arguments take the slash form (``/resume ID``), or
the bare form only when the argument is a session that exists (``resume session_1730000001``),
so "resume writing tips" is a message too.  A leading backslash always sends the rest as a
message (``\\history``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..stores import validate_session_id

__all__ = ["COMMANDS", "SETTINGS", "Command", "Parsed", "command_help", "completions", "find_command", "parse_line"]


@dataclass(frozen=True)
class Command:
    name: str
    usage: str             # the arguments, e.g. "ID [PATH]"; "" for none
    help: str
    aliases: tuple[str, ...] = ()
    session_arg: bool = False   # the first argument is a session id (bare form allowed with one)


COMMANDS: tuple[Command, ...] = (
    Command("history", "", "this session: id, turns, file, the last few turns"),
    Command("stats", "", "KV-cache figures, time to first token, tokens per second, memory"),
    Command("memory", "", "the running summary of the oldest turns (--memory summary)"),
    Command("clear", "", "start over in a new session (the old file stays on disk)"),
    Command("new", "", "start a new session (the same as clear)"),
    Command("undo", "", "withdraw the last turn (the file keeps it in its undone list)"),
    Command("retry", "", "ask the last message again: a new reply replaces the last one"),
    Command("title", "[TEXT]", "show or set this session's title (listings show it)"),
    Command("sessions", "", "list saved sessions"),
    Command("search", "TEXT", "find saved sessions whose title or messages hold TEXT"),
    Command("resume", "[ID]", "continue a saved session (without ID: the latest other one)", session_arg=True),
    Command("delete", "ID [--yes]", "delete a saved session (asks first)", session_arg=True),
    Command("export", "[ID] [PATH]", "write a session to a file (.json, or .md for Markdown)", session_arg=True),
    Command("set", "[NAME VALUE]", "show or change: system, temperature, max_tokens, timeout, verbose"),
    Command("model", "[NAME]", "show the model, or switch to NAME for the rest of this conversation"),
    Command("models", "", "list the models the backend offers"),
    Command("help", "", "this list"),
    Command("quit", "", "leave (also exit, /bye, Ctrl-D)", aliases=("exit", "bye")),
)

_BY_NAME = {name: c for c in COMMANDS for name in (c.name, *c.aliases)}


def find_command(word: str) -> Command | None:
    return _BY_NAME.get(word.lower())


def command_help(indent: str = "  ") -> str:
    """The command list, as ``help`` prints it and ``--help`` ends with."""
    rows = [(f"{c.name} {c.usage}".rstrip(), c.help) for c in COMMANDS]
    width = max(len(left) for left, _ in rows) + 2
    lines = [f"{indent}{left:<{width}}{text}" for left, text in rows]
    lines += [
        "A word alone on its line is a command; with arguments use the slash form (/resume ID,",
        "/export ID out.md, /set temperature 0.2). Anything else is sent to the model; a leading",
        'backslash sends a command word as a message (\\history). """ starts and ends a message',
        "of several lines (Alt-Enter also adds a line). Ctrl-C stops a reply being written. With",
        "speech on, Ctrl-C or typing while a reply is spoken interrupts it; what was spoken is kept.",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class Parsed:
    """One input line: ``kind`` is ``"empty"``, ``"message"``, ``"command"`` or ``"unknown"``."""

    kind: str
    text: str = ""               # the message, or the unknown command word
    command: Command | None = None
    arg: str = ""


def _is_session_id(text: str) -> bool:
    try:
        validate_session_id(text)
    except ValueError:
        return False
    return True


def parse_line(line: str, session_exists: Callable[[str], bool]) -> Parsed:
    """Tell a command from a message (see the module docstring)."""
    text = line.strip()
    if not text:
        return Parsed("empty")
    if text.startswith("\\"):
        return Parsed("message", text[1:]) if text[1:].strip() else Parsed("empty")
    if text.startswith("/") and len(text) > 1 and not text[1].isspace():
        word, _, rest = text[1:].partition(" ")
        command = find_command(word)
        if command is None:
            return Parsed("unknown", "/" + word)
        return Parsed("command", command=command, arg=rest.strip())
    word, _, rest = text.partition(" ")
    command = find_command(word)
    if command is not None:
        rest = rest.strip()
        if not rest:
            return Parsed("command", command=command)
        first = rest.split()[0]
        if command.session_arg and _is_session_id(first) and session_exists(first):
            return Parsed("command", command=command, arg=rest)
    return Parsed("message", text)


SETTINGS = ("system", "temperature", "max_tokens", "timeout", "verbose")
"""What ``/set NAME VALUE`` can change."""


def completions(text: str, session_ids: Callable[[], Iterable[str]],
                model_names: Callable[[], Iterable[str]] | None = None) -> list[tuple[str, int]]:
    """Tab completions for ``text`` (the line before the cursor): ``(completion, start)`` pairs,
    ``start`` being how many characters before the cursor the completion replaces."""
    if " " not in text:
        slash = text.startswith("/")
        word = (text[1:] if slash else text).lower()
        if not word and not slash:
            return []
        names = [n for c in COMMANDS for n in (c.name, *c.aliases) if n.startswith(word)]
        return [(("/" if slash else "") + n, len(text)) for n in names]
    head, _, tail = text.partition(" ")
    command = find_command(head.lstrip("/"))
    if command is None or " " in tail:
        return []
    if command.session_arg:
        return [(sid, len(tail)) for sid in session_ids() if sid.startswith(tail)]
    if command.name == "set":
        return [(n, len(tail)) for n in SETTINGS if n.startswith(tail.lower())]
    if command.name == "model" and model_names is not None:
        return [(n, len(tail)) for n in model_names() if n.startswith(tail)]
    return []
