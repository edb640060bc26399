"""The session file format, spelled out, with validation and ordered upgrade steps.

A session is stored as ``<sessions_dir>/<session_id>.json`` in the seed's format::

    {
      "schema_version": 3,
      "session_id": "session_1730000001",
      "created_at": "2025-10-24T12:00:00",
      "updated_at": "2025-10-24T12:03:10",
      "llm_model": "qwen2.5:3b",
      "turns": 3,
      "conversation_history": [{"role": "user", "content": "你好"}, ...]
    }

Version 2 adds ``system_prompt`` (optional, a string or null; written only when set) and lets
an assistant message carry ``"interrupted": true`` (a reply cut short but kept).  Version 3
adds ``summary`` (optional, written only when set): the running summary of ``memory="summary"``,
``{"text": ..., "covers": <leading messages it summarises>, "model": <who wrote it>}``.  The
history itself is never shortened: the summary only decides what the prompt carries.
Version 4 adds ``title`` (optional: the session's name, one line) and ``undone`` (optional: what
``undo()`` and ``retry()`` withdrew from the history, oldest first, each
``{"at": <time>, "start": <index it was withdrawn from>, "messages": [...]}``): an undo is never a
silent rewrite, the file says what left the history and when.
Version 5 adds tool calls: an assistant message may carry ``"tool_calls": [{"id", "type":
"function", "function": {"name", "arguments": {...}}}]`` (its content may be ""), and a message
with ``"role": "tool"`` carries ``tool_call_id``, ``name`` and ``content`` (the result, or the
error text).  ``turns`` counts the user's turns: a turn with three tool calls is one turn.

Files without ``schema_version`` (written by the seed's own implementation) are version 0 and
are upgraded on load by the steps in ``MIGRATIONS``.  Turns completed since the last snapshot
live in ``<session_id>.journal``: one JSON object per line, see ``JournalRecordDict``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

from .._exceptions import SessionFormatError

if TYPE_CHECKING:  # Python 3.10 has no typing.NotRequired; annotations are strings at run time
    from typing_extensions import NotRequired

__all__ = [
    "META_FIELDS",
    "MIGRATIONS",
    "ROLES",
    "SCHEMA_VERSION",
    "TITLE_MAX_CHARS",
    "UTF8_BOM",
    "JournalMetaDict",
    "JournalRecordDict",
    "MessageDict",
    "SessionFileDict",
    "SessionRecord",
    "SummaryDict",
    "ToolCallDict",
    "ToolFunctionDict",
    "UndoneDict",
    "check_text",
    "clean_title",
    "count_turns",
    "is_utf8_text",
    "now_iso",
    "parse_journal_line",
    "validate_messages",
    "validate_summary",
    "validate_tool_calls",
    "validate_undone",
]

SCHEMA_VERSION = 5
TITLE_MAX_CHARS = 200
ROLES = frozenset({"system", "user", "assistant", "tool"})
UTF8_BOM = b"\xef\xbb\xbf"


class ToolFunctionDict(TypedDict):
    name: str
    arguments: dict[str, Any]   # stored as a JSON object, never as a JSON string


class ToolCallDict(TypedDict):
    """One call an assistant message asks for (schema 5)."""

    id: str
    type: str                   # always "function"
    function: ToolFunctionDict
    client: NotRequired[bool]   # present (True): the API client runs it, not the library (docs/compat.md)


class MessageDict(TypedDict):
    role: str
    content: str
    interrupted: NotRequired[bool]  # assistant only; present (True) when the reply was cut short
    tool_calls: NotRequired[list[ToolCallDict]]  # assistant only (schema 5)
    tool_call_id: NotRequired[str]  # role "tool" only: the call this message answers
    name: NotRequired[str]          # role "tool" only: the tool's name


class SummaryDict(TypedDict):
    """The running summary of ``memory="summary"`` (schema 3)."""

    text: str
    covers: int   # the first ``covers`` messages of the history are summarised
    model: str


class UndoneDict(TypedDict):
    """Messages withdrawn from the history by ``undo()``/``retry()`` (schema 4)."""

    at: str                       # when (local time, as ``updated_at``)
    start: int                    # the index they were withdrawn from
    messages: list[MessageDict]


class SessionFileDict(TypedDict):
    schema_version: int
    session_id: str
    created_at: str
    updated_at: str
    llm_model: str
    turns: int
    system_prompt: NotRequired[str | None]
    summary: NotRequired[SummaryDict | None]
    title: NotRequired[str | None]
    undone: NotRequired[list[UndoneDict]]
    conversation_history: list[MessageDict]


class JournalMetaDict(TypedDict, total=False):
    """Record-level fields a journal line updates (only those present)."""

    system_prompt: str | None
    summary: SummaryDict | None
    title: str | None


# The record-level fields a journal line's "meta" may carry, in the order they are written.
META_FIELDS = ("system_prompt", "summary", "title")


class JournalRecordDict(TypedDict):
    """One line of ``<session_id>.journal``: messages appended at index ``start``.

    ``session_id`` (written since schema 2) lets replay refuse a journal that belongs to
    another session (a copied file, a restored backup); lines without it are from older
    releases and are accepted.
    """

    session_id: NotRequired[str]
    start: int
    messages: list[MessageDict]
    updated_at: str
    meta: NotRequired[JournalMetaDict]
    # An undo/retry (schema 4): the messages from ``start`` on were withdrawn (``undone`` holds
    # them) before ``messages`` were appended; ``rewind`` numbers the session's rewinds from 1, so
    # replay over a snapshot knows which ones the snapshot already holds.
    rewind: NotRequired[int]
    undone: NotRequired[list[MessageDict]]


def now_iso() -> str:
    """Local time, ISO 8601 to the second, as the seed's ``created_at`` shows."""
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def clean_title(title: object) -> str | None:
    """A session title as stored: one line, whitespace collapsed, at most ``TITLE_MAX_CHARS``
    characters; blank (or None) means no title.  Anything but a str or None is a ``TypeError``."""
    if title is None:
        return None
    if not isinstance(title, str):
        raise TypeError(f"a title must be a str, not {type(title).__name__}")
    if not is_utf8_text(title):
        raise ValueError("the title contains a lone surrogate character and cannot be saved as UTF-8")
    line = " ".join(title.split())
    if len(line) > TITLE_MAX_CHARS:
        line = line[:TITLE_MAX_CHARS - 1].rstrip() + "…"
    return line or None


def count_turns(messages: Iterable[MessageDict]) -> int:
    """A turn is one exchange started by the user, so it is counted by the user's messages (a
    turn with tool calls holds several assistant messages; before schema 5 both counts agree)."""
    return sum(1 for m in messages if m["role"] == "user")


def is_utf8_text(text: str) -> bool:
    """False for strings JSON can carry but UTF-8 cannot (lone surrogates such as ``"\\ud800"``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# A lone surrogate can only reach a parsed file through a \uD800-\uDFFF escape (raw surrogate
# bytes are not valid UTF-8), so scanning the bytes spares checking every string of a clean file.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def check_text(data: Any, raw: bytes | bytearray | None = None) -> None:
    """Raise ``SessionFormatError`` if a string in ``data`` (keys included) cannot be UTF-8.

    Such a file parses, but could never be written back.  With ``raw``, the bytes ``data`` was
    parsed from, the full check only runs when they contain a surrogate escape.
    """
    if raw is not None and not _SURROGATE_ESCAPE.search(raw):
        return
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start:exc.end] if isinstance(exc.object, str) else "?"
        raise SessionFormatError(f"it contains a lone surrogate {bad!r} (\\ud800-\\udfff), not text") from None
    except (ValueError, RecursionError):
        pass  # not this check's business; the structure is validated field by field


def validate_messages(value: Any, *, where: str = "conversation_history") -> list[MessageDict]:
    """Return ``value`` as a list of ``{role, content}`` messages or raise ``SessionFormatError``."""
    if not isinstance(value, list):
        raise SessionFormatError(f"{where} is {type(value).__name__}, not a list")
    out: list[MessageDict] = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise SessionFormatError(f"{where}[{i}] is {type(m).__name__}, not an object")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in ROLES:
            raise SessionFormatError(f"{where}[{i}].role is {role!r}, not one of {sorted(ROLES)}")
        if not isinstance(content, str):
            raise SessionFormatError(f"{where}[{i}].content is {type(content).__name__}, not a string")
        if len(m) == 2:
            # The parsed dict itself when it is exactly {role, content}: a 5,000-message load
            # then allocates nothing more.
            out.append(m)  # type: ignore[arg-type]
            continue
        interrupted = m.get("interrupted")
        if interrupted is not None and not isinstance(interrupted, bool):
            raise SessionFormatError(f"{where}[{i}].interrupted is {type(interrupted).__name__}, not true/false")
        msg: MessageDict = {"role": role, "content": content}
        if interrupted and role == "assistant":
            msg["interrupted"] = True
        if role == "assistant" and m.get("tool_calls") is not None:
            calls = validate_tool_calls(m["tool_calls"], f"{where}[{i}].tool_calls")
            if calls:
                msg["tool_calls"] = calls
        elif role == "tool":
            for key in ("tool_call_id", "name"):
                value = m.get(key)
                if not isinstance(value, str):
                    raise SessionFormatError(f"{where}[{i}].{key} is {type(value).__name__}, not a string")
            msg["tool_call_id"] = m["tool_call_id"]
            msg["name"] = m["name"]
        out.append(msg)  # any other key is dropped: it is not part of the format
    return out


def validate_tool_calls(value: Any, where: str = "tool_calls") -> list[ToolCallDict]:
    """An assistant message's ``tool_calls`` (schema 5), or ``SessionFormatError``.  Arguments
    written as a JSON string (as the OpenAI API sends them) are read as the object they hold."""
    if not isinstance(value, list):
        raise SessionFormatError(f"{where} is {type(value).__name__}, not a list")
    out: list[ToolCallDict] = []
    for i, call in enumerate(value):
        if not isinstance(call, dict):
            raise SessionFormatError(f"{where}[{i}] is {type(call).__name__}, not an object")
        call_id, fn = call.get("id"), call.get("function")
        if not isinstance(call_id, str) or not call_id:
            raise SessionFormatError(f"{where}[{i}].id is {call_id!r}, not a call id")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise SessionFormatError(f"{where}[{i}].function has no name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except (ValueError, RecursionError):
                raise SessionFormatError(f"{where}[{i}].function.arguments is not JSON") from None
        if not isinstance(args, dict):
            raise SessionFormatError(f"{where}[{i}].function.arguments is {type(args).__name__}, not an object")
        checked: ToolCallDict = {"id": call_id, "type": "function", "function": {"name": fn["name"], "arguments": args}}
        if call.get("client") is True:
            checked["client"] = True  # the client's to answer: never repaired as an orphan while pending
        out.append(checked)
    return out


def _require_str(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise SessionFormatError(f"{key!r} is {type(value).__name__}, not a string")
    return value


# Upgrade steps, in order: step N turns a version N-1 dict into version N.  Never edit a step
# once released; add a new one and bump SCHEMA_VERSION.
def _v1_from_seed(data: dict[str, Any]) -> dict[str, Any]:
    """Version 0 is the seed's format: no schema_version, no updated_at."""
    data = dict(data)
    data.setdefault("updated_at", data.get("created_at"))
    data.setdefault("llm_model", "unknown")
    data["schema_version"] = 1
    return data


def _v2_system_prompt(data: dict[str, Any]) -> dict[str, Any]:
    """Version 2: an optional record-level ``system_prompt`` (absent = none) and assistant
    messages that may carry ``"interrupted": true``.  Nothing in a version 1 file changes."""
    data = dict(data)
    data.setdefault("system_prompt", None)
    data["schema_version"] = 2
    return data


def _v3_summary(data: dict[str, Any]) -> dict[str, Any]:
    """Version 3: an optional record-level ``summary`` (absent = none).  Nothing in a version 2
    file changes."""
    data = dict(data)
    data.setdefault("summary", None)
    data["schema_version"] = 3
    return data


def _v4_title_undone(data: dict[str, Any]) -> dict[str, Any]:
    """Version 4: optional ``title`` and ``undone`` (absent = none).  Nothing in a version 3
    file changes."""
    data = dict(data)
    data.setdefault("title", None)
    data.setdefault("undone", [])
    data["schema_version"] = 4
    return data


def _v5_tool_calls(data: dict[str, Any]) -> dict[str, Any]:
    """Version 5: assistant messages may carry ``tool_calls``, and ``"role": "tool"`` messages
    answer them; ``turns`` counts the user's messages.  Nothing in a version 4 file changes
    (without tool calls, the user's and the assistant's messages come in pairs)."""
    data = dict(data)
    data["schema_version"] = 5
    return data


MIGRATIONS: list[tuple[int, Callable[[dict[str, Any]], dict[str, Any]]]] = [
    (1, _v1_from_seed),
    (2, _v2_system_prompt),
    (3, _v3_summary),
    (4, _v4_title_undone),
    (5, _v5_tool_calls),
]


def _optional_str(value: Any, where: str) -> str | None:
    """An optional record-level string (``system_prompt``, ``title``), or ``SessionFormatError``."""
    if value is not None and not isinstance(value, str):
        raise SessionFormatError(f"'{where}' is {type(value).__name__}, not a string")
    return value


def validate_undone(value: Any, where: str = "undone") -> list[UndoneDict]:
    """The ``undone`` list of a file (schema 4), or ``SessionFormatError``."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise SessionFormatError(f"'{where}' is {type(value).__name__}, not a list")
    out: list[UndoneDict] = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise SessionFormatError(f"'{where}[{i}]' is {type(entry).__name__}, not an object")
        at, start = entry.get("at"), entry.get("start")
        if not isinstance(at, str):
            raise SessionFormatError(f"'{where}[{i}].at' is {type(at).__name__}, not a string")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise SessionFormatError(f"'{where}[{i}].start' is {start!r}, not a message index")
        out.append({"at": at, "start": start,
                    "messages": validate_messages(entry.get("messages"), where=f"{where}[{i}].messages")})
    return out


def validate_summary(value: Any, where: str = "summary") -> SummaryDict | None:
    """A summary dict, or None; anything else raises ``SessionFormatError``."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise SessionFormatError(f"'{where}' is {type(value).__name__}, not an object")
    text, covers, model = value.get("text"), value.get("covers"), value.get("model", "")
    if not isinstance(text, str):
        raise SessionFormatError(f"'{where}.text' is {type(text).__name__}, not a string")
    if isinstance(covers, bool) or not isinstance(covers, int) or covers < 0:
        raise SessionFormatError(f"'{where}.covers' is {covers!r}, not a count of messages")
    if not isinstance(model, str):
        raise SessionFormatError(f"'{where}.model' is {type(model).__name__}, not a string")
    return {"text": text, "covers": covers, "model": model}


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """Apply every upgrade step newer than the file's ``schema_version``."""
    version = data.get("schema_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise SessionFormatError(f"schema_version is {version!r}, not a whole number")
    if version > SCHEMA_VERSION:
        raise SessionFormatError(
            f"schema_version {version} is newer than this release understands ({SCHEMA_VERSION}); "
            "upgrade conversation_session to read it"
        )
    for target, step in MIGRATIONS:
        if version < target:
            data = step(data)
            version = target
    return data


@dataclass
class SessionRecord:
    """A session's persisted state; ``to_dict``/``from_dict`` are the only way in and out."""

    session_id: str
    llm_model: str
    created_at: str = field(default_factory=now_iso)
    updated_at: str = ""
    messages: list[MessageDict] = field(default_factory=list)
    system_prompt: str | None = None
    summary: SummaryDict | None = None
    title: str | None = None
    undone: list[UndoneDict] = field(default_factory=list)

    @property
    def turns(self) -> int:
        return count_turns(self.messages)

    def to_dict(self, messages: list[MessageDict] | None = None, *, turns: int | None = None) -> SessionFileDict:
        """The file's dict; ``turns``, when the caller keeps the count, spares a recount."""
        history = self.messages if messages is None else messages
        data: SessionFileDict = {
            "schema_version": SCHEMA_VERSION,
            "session_id": self.session_id,
            "created_at": self.created_at,
            "updated_at": self.updated_at or self.created_at,
            "llm_model": self.llm_model,
            "turns": count_turns(history) if turns is None else turns,
            "conversation_history": history,
        }
        if self.system_prompt is not None:  # a session without one keeps the seed's exact keys
            data["system_prompt"] = self.system_prompt
        if self.summary is not None:
            data["summary"] = self.summary
        if self.title is not None:
            data["title"] = self.title
        if self.undone:
            data["undone"] = self.undone
        return data

    def apply_meta(self, meta: JournalMetaDict | dict[str, Any] | None) -> None:
        """Take the record-level fields a journal line (or ``append(meta=...)``) carries."""
        if meta and "system_prompt" in meta:
            self.system_prompt = meta["system_prompt"]
        if meta and "summary" in meta:
            self.summary = meta["summary"]
        if meta and "title" in meta:
            self.title = meta["title"]

    def withdraw(self, start: int, at: str) -> list[MessageDict]:
        """Move the messages from ``start`` on to ``undone`` (an undo); returns them.  A summary
        that covered any of them no longer applies and is dropped with them."""
        if not 0 <= start <= len(self.messages):
            raise ValueError(f"cannot withdraw from message {start}: there are {len(self.messages)}")
        gone = self.messages[start:]
        del self.messages[start:]
        self.undone.append({"at": at, "start": start, "messages": gone})
        if self.summary is not None and self.summary["covers"] > start:
            self.summary = None
        return gone

    @classmethod
    def from_dict(cls, data: Any, *, raw: bytes | bytearray | None = None) -> SessionRecord:
        """Validate a parsed session file (any schema version) into a record.

        Args:
            data: the parsed JSON.
            raw: the bytes it was parsed from, if at hand (makes the text check cheap).
        """
        if not isinstance(data, dict):
            raise SessionFormatError(f"the top level is {type(data).__name__}, not an object")
        check_text(data, raw)
        data = upgrade(data)
        messages = validate_messages(data.get("conversation_history"))
        created_at = _require_str(data, "created_at")
        updated_at = data.get("updated_at", created_at)
        if not isinstance(updated_at, str):
            raise SessionFormatError(f"'updated_at' is {type(updated_at).__name__}, not a string")
        # "turns" is derived from the history: whatever is on disk (2, 2.0, "2", nonsense) is
        # not read at all, so it can never make a session unloadable.
        return cls(
            session_id=_require_str(data, "session_id"),
            llm_model=_require_str(data, "llm_model"),
            created_at=created_at,
            updated_at=updated_at or created_at,
            messages=messages,
            system_prompt=_optional_str(data.get("system_prompt"), "system_prompt"),
            summary=validate_summary(data.get("summary")),
            title=_optional_str(data.get("title"), "title"),
            undone=validate_undone(data.get("undone")),
        )


def parse_journal_line(line: bytes | bytearray) -> JournalRecordDict:
    """Parse one journal line; a torn or damaged line raises ``SessionFormatError``."""
    if line.startswith(UTF8_BOM):  # an editor's BOM on the first line is harmless
        line = line[len(UTF8_BOM):]
    try:
        data = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise SessionFormatError(f"journal line is not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise SessionFormatError("journal line is not an object")
    check_text(data, line)
    start = data.get("start")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise SessionFormatError(f"journal line has start={start!r}")
    updated_at = data.get("updated_at")
    if not isinstance(updated_at, str):
        raise SessionFormatError("journal line has no updated_at")
    out: JournalRecordDict = {
        "start": start,
        "messages": validate_messages(data.get("messages"), where="journal messages"),
        "updated_at": updated_at,
    }
    if "session_id" in data:
        session_id = data["session_id"]
        if not isinstance(session_id, str):
            raise SessionFormatError(f"journal line has session_id={session_id!r}")
        out["session_id"] = session_id
    if "rewind" in data:
        rewind = data["rewind"]
        if isinstance(rewind, bool) or not isinstance(rewind, int) or rewind < 1:
            raise SessionFormatError(f"journal line has rewind={rewind!r}")
        out["rewind"] = rewind
        out["undone"] = validate_messages(data.get("undone", []), where="journal undone")
    meta = data.get("meta")
    if meta is not None:
        if not isinstance(meta, dict):
            raise SessionFormatError("journal line has a meta that is not an object")
        clean: JournalMetaDict = {}
        if "system_prompt" in meta:
            clean["system_prompt"] = _optional_str(meta["system_prompt"], "journal system_prompt")
        if "summary" in meta:
            clean["summary"] = validate_summary(meta["summary"], "journal summary")
        if "title" in meta:
            clean["title"] = _optional_str(meta["title"], "journal title")
        out["meta"] = clean  # unknown meta keys (a newer release's) are ignored
    return out
