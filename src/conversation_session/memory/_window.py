"""Window policies: which part of the history a prompt carries when it no longer all fits.

A policy is asked once per turn (and once per warm-up) for the start index of the history to
send.  The first policy, ``TrimPolicy``, leaves the oldest whole turns out of the prompt; a
summarising policy will fold them into a running summary instead.

Two properties matter for a long-lived voice assistant:

* **Time proportional to what is sent.**  Each message's token count is computed once and
  cached; fitting walks back from the newest turn and stops as soon as the budget is spent, so
  a 5,000-message history costs what the last few dozen messages cost.  (Re-rendering the
  whole history for each candidate start made resume quadratic: 66 s at 2,500 turns.)
* **A stable prefix.**  When trimming is needed, a quarter of the window more is freed, so the
  prompt's start (and with it the backend's KV cache) stays put for the next several turns
  instead of shifting every turn.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .._exceptions import SessionError
from ..stores._record import MessageDict

__all__ = ["Fit", "TokenCounter", "TrimPolicy", "WindowPolicy"]

logger = logging.getLogger("conversation_session")


class TokenCounter:
    """Per-message token counts, computed once per message and cached by position.

    ``count(messages)`` is the backend's count of a whole prompt (exact or an overestimate).
    A message's share is measured as ``count([m]) - base``, where ``base`` is what the chat
    template adds once per prompt (a default system prompt, the reply's opening), measured once.
    Sums of shares then track the whole prompt's count closely; the policy verifies the chosen
    prompt once with the exact count when the backend has one.
    """

    def __init__(self, count: Callable[[list[MessageDict]], int]):
        self._count = count
        self._cache: list[int] = []  # by history index; only ever appended to or cut
        self._base: int | None = None

    def base(self) -> int:
        if self._base is None:
            probe: MessageDict = {"role": "user", "content": "x"}
            one = self._count([probe])
            two = self._count([probe, probe])
            self._base = max(one - (two - one), 0)
        return self._base

    def of(self, message: MessageDict) -> int:
        return max(self._count([message]) - self.base(), 1)

    def at(self, history: list[MessageDict], i: int) -> int:
        cache = self._cache
        if len(cache) > len(history):  # the history was replaced by a shorter one
            del cache[len(history):]
        while len(cache) <= i:  # fill up to i; only reached for messages never counted
            cache.append(-1)
        if cache[i] < 0:
            cache[i] = self.of(history[i])
        return cache[i]

    def reset(self) -> None:
        self._cache.clear()

    def forget_from(self, i: int) -> None:
        """Messages from ``i`` on were withdrawn (an undo): their counts no longer apply."""
        del self._cache[i:]


@dataclass(frozen=True)
class Fit:
    """The policy's answer: send ``history[start:]`` (after the system prompt)."""

    start: int
    dropped_now: int  # turns newly left out by this call (0 when the prefix stayed put)


class WindowPolicy(Protocol):
    """Decides what part of the history a prompt carries, and what precedes it."""

    start: int

    def fit(self, history: list[MessageDict], system: list[MessageDict], user: MessageDict) -> Fit: ...

    def prefix(self, system: list[MessageDict]) -> list[MessageDict]:
        """What the prompt starts with: the system prompt (and, for a summarising policy, the
        summary).  Stable between compactions, so the backend's cache stays valid."""

    def reset(self) -> None: ...

    def truncated(self, n: int) -> None:
        """The history was cut to its first ``n`` messages (undo/retry)."""


class TrimPolicy:
    """Leave the oldest whole turns out of the prompt, a quarter of the window at a time.

    Args:
        context_length: the backend's window in tokens (called each time: a server may learn it).
        max_tokens: room reserved for the reply (called each time: it can be changed in-chat).
        count: the backend's prompt token count; ``exact``: whether it is exact.
    """

    def __init__(self, context_length: Callable[[], int | None], max_tokens: Callable[[], int],
                 count: Callable[[list[MessageDict]], int], exact: bool):
        self._context_length = context_length
        self._max_tokens = max_tokens
        self._full_count = count
        self._exact = exact
        self.tokens = TokenCounter(count)
        self.start = 0  # history[start:] is what the prompt carries

    def reset(self) -> None:
        self.start = 0
        self.tokens.reset()

    def truncated(self, n: int) -> None:
        # The window's start stays where it is (the prefix, and the cache, stay valid): an undo
        # only removes turns after it.
        self.tokens.forget_from(n)
        self.start = min(self.start, n)

    def prefix(self, system: list[MessageDict]) -> list[MessageDict]:
        return system

    def fit(self, history: list[MessageDict], system: list[MessageDict], user: MessageDict) -> Fit:
        n_ctx = self._context_length()
        if self.start > len(history):
            self.start = 0
        if n_ctx is None:
            return Fit(self.start, 0)
        budget = n_ctx - self._max_tokens()
        fixed = self.tokens.base() + sum(self.tokens.of(m) for m in (*system, user))
        if fixed > budget:
            need = self._full_count([*system, user])
            if need > budget:
                raise SessionError(
                    f"the message is too long: with the system prompt it takes {need} tokens, and the "
                    f"{n_ctx}-token context leaves {budget} after reserving max_tokens={self._max_tokens()}; "
                    "shorten it or raise the context size"
                )
        start = self._choose(history, fixed, budget, n_ctx)
        if self._exact:
            # The shares are measured per message; one exact count of what is actually sent
            # guards against template effects between messages.  Proportional to the prompt.
            while start < len(history) and self._full_count([*system, *history[start:], user]) > budget:
                start = self._next_turn(history, start + 1)
        dropped = sum(1 for m in history[self.start:start] if m["role"] == "user") if start > self.start else 0
        if dropped:
            logger.warning("context window (%d tokens) full: %d oldest turn(s) left out of the prompt "
                           "(still in the history and the file)", n_ctx, dropped)
        self.start = max(start, self.start)
        return Fit(self.start, dropped)

    @staticmethod
    def _next_turn(history: list[MessageDict], i: int) -> int:
        while i < len(history) and history[i]["role"] != "user":
            i += 1
        return i

    def _choose(self, history: list[MessageDict], fixed: int, budget: int, n_ctx: int) -> int:
        """Walk back from the newest message: keep the current start if everything from it fits;
        else the earliest turn start that fits a quarter-window below the budget (hysteresis),
        or failing that the earliest that fits at all."""
        target = budget - n_ctx // 4
        total = fixed
        best_target: int | None = None
        best_budget: int | None = None
        i = len(history)
        while i > self.start:
            i -= 1
            total += self.tokens.at(history, i)
            if total > budget:
                break
            if history[i]["role"] == "user":
                best_budget = i
                if total <= target:
                    best_target = i
        else:
            return self.start  # everything from the current start fits: the prefix stays
        if best_target is not None:
            return best_target
        if best_budget is not None:
            return best_budget
        return len(history)  # not even the newest turn fits beside the new message
