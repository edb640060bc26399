"""Structured logs: one JSON object per line on stderr, carrying the request id and session id
of the request being served (context variables, so library log lines get them too)."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time

__all__ = ["JsonFormatter", "request_id_var", "session_id_var", "setup_json_logging"]

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
session_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("session_id", default=None)

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
        for key, value in vars(record).items():
            if key not in _PLAIN and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)  # the log only, never a response
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_json_logging(level: str = "INFO") -> None:
    """JSON lines for the service, the library and uvicorn (root handler; idempotent)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_cs_service", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._cs_service = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("conversation_session", "uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers = [h for h in lg.handlers if not getattr(h, "_conversation_session", False)]
        lg.propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # the service logs each request itself
