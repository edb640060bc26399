"""Who is calling: bearer tokens, the owner each token stands for, and a per-token rate limit.

A token is never stored: sessions record the *owner*, a hash of the token, so the ownership
table on disk (or in PostgreSQL) gives away nothing an attacker could send.  Without any token
(allowed only on loopback) every caller is the one local owner.
"""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = ["LOCAL_OWNER", "Authenticator", "RateLimiter", "owner_of"]

LOCAL_OWNER = "local"


def owner_of(token: str) -> str:
    """The owner id a token stands for (stable across workers and restarts)."""
    return "t" + hashlib.sha256(("conversation-session:" + token).encode()).hexdigest()[:32]


class Authenticator:
    """Maps an ``Authorization: Bearer <token>`` header (or ``?token=`` on a WebSocket, which
    browsers cannot give headers) to an owner; None when it is missing or wrong."""

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


class RateLimiter:
    """A token bucket per owner: ``rate`` requests per second, bursts up to ``burst``.

    Per worker process: with N workers a client may get up to N times the rate, which is
    documented; the point is to stop a runaway device, not to meter."""

    def __init__(self, rate: float, burst: float, max_owners: int = 10_000):
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._max = max_owners

    def take(self, owner: str, cost: float = 1.0) -> float:
        """0.0 if allowed (and counted), else the seconds to wait before retrying."""
        now = time.monotonic()
        level, at = self._buckets.get(owner, (self.burst, now))
        level = min(self.burst, level + (now - at) * self.rate)
        if level < cost:
            self._buckets[owner] = (level, now)
            return (cost - level) / self.rate
        if len(self._buckets) >= self._max and owner not in self._buckets:
            # Owners are bounded by the configured tokens; this only guards memory.
            self._buckets.clear()
        self._buckets[owner] = (level - cost, now)
        return 0.0
