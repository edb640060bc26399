"""Who is calling: bearer tokens, the owner each token stands for, and a per-token rate limit.

The rate limit holds across workers: the buckets live beside the ownership table (a small file
under ``flock`` for the file store, one row per token updated in one statement for PostgreSQL;
see ``_owners``), so N workers give a token the rate once, not N times.  ``RateLimiter`` here is
the in-process bucket a worker falls back to while that shared state cannot be reached.

A token is never stored: sessions record the *owner*, a hash of the token, so the ownership
table on disk (or in PostgreSQL) gives away nothing an attacker could send.  Without any token
(allowed only on loopback) every caller is the one local owner.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

__all__ = ["LOCAL_OWNER", "WS_PROTOCOL", "Authenticator", "RateLimiter", "owner_of", "subprotocol_token",
           "take_from_bucket"]

LOCAL_OWNER = "local"
# A browser cannot set headers on a WebSocket, and a token in the URL ends up in logs and
# history: a page offers the subprotocols ``conversation-session`` and ``bearer.<token>``
# (``Sec-WebSocket-Protocol``), and the service selects the first, never echoing the token.
WS_PROTOCOL = "conversation-session"
_BEARER_PREFIX = "bearer."


def subprotocol_token(headers: Mapping[str, str]) -> str | None:
    """The token offered as subprotocol ``bearer.<token>`` in ``Sec-WebSocket-Protocol``."""
    for item in (headers.get("sec-websocket-protocol") or "").split(","):
        item = item.strip()
        if item.lower().startswith(_BEARER_PREFIX) and len(item) > len(_BEARER_PREFIX):
            return item[len(_BEARER_PREFIX):]
    return None


def owner_of(token: str) -> str:
    """The owner id a token stands for (stable across workers and restarts)."""
    return "t" + hashlib.sha256(("conversation-session:" + token).encode()).hexdigest()[:32]


class Authenticator:
    """Maps an ``Authorization: Bearer <token>`` header (or, on a WebSocket, which browsers
    cannot give headers, the ``bearer.<token>`` subprotocol or the older ``?token=``, which the
    caller passes only for a WebSocket) to an owner; None when it is missing or wrong."""

    def __init__(self, tokens: tuple[str, ...]):
        self._tokens = [(t.encode(), owner_of(t)) for t in tokens]

    @property
    def required(self) -> bool:
        return bool(self._tokens)

    def owner(self, authorization: str | None, query_token: str | None = None) -> str | None:
        if not self._tokens:
            return LOCAL_OWNER
        given: str | None = None
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer":
                given = value.strip()
        if given is None:
            given = query_token
        if not given:
            return None
        raw = given.encode(errors="replace")
        found = None
        for token, owner in self._tokens:  # compare against all: no timing hint of which matched
            if hmac.compare_digest(raw, token):
                found = owner
        return found


def take_from_bucket(level: float, at: float, now: float, rate: float, burst: float,
                     cost: float = 1.0) -> tuple[float, float]:
    """One token-bucket step: ``(new_level, wait)``; ``wait`` is 0.0 when ``cost`` was taken,
    else the seconds until it could be (the level then is refilled, nothing taken)."""
    level = min(burst, level + max(now - at, 0.0) * rate)
    if level < cost:
        return level, (cost - level) / rate
    return level - cost, 0.0


class RateLimiter:
    """A token bucket per owner in this process: ``rate`` requests per second, bursts up to
    ``burst``.  The service's fallback while the shared buckets are unreachable (see above)."""

    def __init__(self, rate: float, burst: float, max_owners: int = 10_000):
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._max = max_owners

    def take(self, owner: str, cost: float = 1.0) -> float:
        """0.0 if allowed (and counted), else the seconds to wait before retrying."""
        now = time.monotonic()
        level, at = self._buckets.get(owner, (self.burst, now))
        level, wait = take_from_bucket(level, at, now, self.rate, self.burst, cost)
        if len(self._buckets) >= self._max and owner not in self._buckets:
            # Owners are bounded by the configured tokens; this only guards memory.
            self._buckets.clear()
        self._buckets[owner] = (level, now)
        return wait
