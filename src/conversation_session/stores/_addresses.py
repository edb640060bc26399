"""Store addresses: which strings name PostgreSQL, the environment variable that names a store,
and a URL as it may be shown (without its password).  A leaf module: every store module and
``open_store`` read addresses through it."""

from __future__ import annotations

import re
from typing import TypeGuard
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["STORE_ENV", "is_postgres_url", "password_of", "redact_url"]

STORE_ENV = "CONVERSATION_SESSIONS_STORE"
_PG_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(value: object) -> TypeGuard[str]:
    """True for a ``postgresql://`` (or ``postgres://``) address."""
    return isinstance(value, str) and value.startswith(_PG_SCHEMES)


def redact_url(url: str) -> str:
    """The URL (or ``key=value`` conninfo) without its password, for messages and logs."""
    if "://" in url:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            netloc = f"{userinfo.split(':', 1)[0]}@{hostport}"
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "password"])
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    try:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        params = conninfo_to_dict(url)
        params.pop("password", None)
        return make_conninfo(**params)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - unparsable: say nothing of it rather than risk the password
        return "(PostgreSQL conninfo)"


def password_of(url: str) -> str | None:
    """The password inside a URL or conninfo string (to blank it out of error messages)."""
    if "://" in url:
        try:
            parts = urlsplit(url)
            return parts.password or dict(parse_qsl(parts.query)).get("password")
        except ValueError:
            return None
    m = re.search(r"password\s*=\s*'?([^'\s]+)", url)
    return m.group(1) if m else None
