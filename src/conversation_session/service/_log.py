"""The service's log on stderr: one JSON object per line for a log collector, or plain lines
for a person at a terminal (``--log-format auto``, the default, picks by whether stderr is a
terminal).  Both carry the request id and session id of the request being served (context
variables, so library log lines get them too)."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time
from typing import TextIO

__all__ = ["LOG_FORMATS", "JsonFormatter", "PlainFormatter", "request_id_var", "session_id_var",
           "setup_json_logging"]

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
session_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("session_id", default=None)

LOG_FORMATS = ("auto", "json", "plain")

_PLAIN = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": os.getpid(),
        }
        rid = request_id_var.get()
        sid = session_id_var.get()
        if rid:
            out["request_id"] = rid
        if sid:
            out["session_id"] = sid
        out.update(_extras(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)  # the log only, never a response
        return json.dumps(out, ensure_ascii=False, default=str)


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _PLAIN and not k.startswith("_")}


class PlainFormatter(logging.Formatter):
    """``14:03:07.412 INFO    POST /v1/sessions 201  [request 3f2a… session c1b2… ms=4.1]``"""

    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        tags = []
        rid, sid = request_id_var.get(), session_id_var.get()
        if rid:
            tags.append(f"request {rid}")
        if sid:
            tags.append(f"session {sid}")
        tags += [f"{k}={v}" for k, v in _extras(record).items() if k != "status" and v is not None]
        line = f"{when} {record.levelname:<7} {record.getMessage()}" + (f"  [{' '.join(tags)}]" if tags else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _is_tty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError):
        return False


def setup_json_logging(level: str = "INFO", log_format: str = "auto", stream: TextIO | None = None) -> None:
    """The service's log for the service, the library and uvicorn (root handler; idempotent):
    JSON lines, or plain lines (``auto``: plain when ``stream``, stderr by default, is a terminal)."""
    stream = stream or sys.stderr
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    plain = log_format == "plain" or (log_format == "auto" and _is_tty(stream))
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_cs_service", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(PlainFormatter() if plain else JsonFormatter())
    handler._cs_service = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("conversation_session", "uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers = [h for h in lg.handlers if not getattr(h, "_conversation_session", False)]
        lg.propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # the service logs each request itself
