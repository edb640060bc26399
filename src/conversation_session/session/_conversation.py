"""The conversation itself: no threads, no I/O, no backend calls of its own.

What the sync and the async session share, written once: the kept messages, what a prompt
carries (through a window policy), what a completed turn commits, and the running figures.
The drivers (``_sync.py``, ``_aio.py``) and the ``Turn`` do the waiting, streaming and
saving; every decision about the history is made here.

Three outcomes of a turn, and what each leaves in the history:

* completed: the user message and the whole reply are appended (one step, then journaled);
* timed out, cancelled, failed: nothing (the history, file and KV cache are as before);
* interrupted (barge-in): the reply cut to what the user heard, marked ``interrupted``
  (see ``_turn.py``).

A turn that calls tools is committed in steps (``continued``): the user message with the call
request, then each result, then the reply; what was recorded stays whatever ends the turn.

A retry is a turn that replaces the last one: it is planned without the last turn, and its
commit withdraws that turn (which the store records as undone) and appends the new one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .._exceptions import SessionError
from ..backends import Usage
from ..memory._window import Fit, WindowPolicy
from ..stores._record import MessageDict, count_turns

__all__ = ["Conversation", "Figures", "Plan"]


@dataclass(frozen=True)
class Plan:
    """What one turn sends."""

    user: MessageDict
    prompt: list[MessageDict]   # system prompt, the history the window allows, the new message
    start: int                  # index in the history where the sent part begins
    trimmed_turns: int          # turns left out of the prompt
    replaces: int | None = None  # a retry: the index of the turn it replaces (withdrawn on commit)


@dataclass
class Figures:
    """Running cache figures of the current conversation (reset with it)."""

    total_prompt: int = 0
    total_cached: int = 0
    turns_done: int = 0

    def add(self, usage: Usage) -> None:
        self.turns_done += 1
        if usage.prompt_tokens and usage.cached_tokens is not None:  # a ratio of known turns only
            self.total_prompt += usage.prompt_tokens
            self.total_cached += usage.cached_tokens

    @property
    def cache_hit_ratio(self) -> float | None:
        return self.total_cached / self.total_prompt if self.total_prompt else None


@dataclass
class Conversation:
    """The kept messages of one session and the rules that change them."""

    policy: WindowPolicy
    system_prompt: str | None = None
    stateless: bool = False     # enable_cache=False: each prompt carries only its own message
    messages: list[MessageDict] = field(default_factory=list)
    figures: Figures = field(default_factory=Figures)
    turns: int = 0              # the user's messages; kept incrementally (never recounted per turn)
    trimmed_turns: int = 0

    def __post_init__(self) -> None:
        self.turns = count_turns(self.messages)

    def replace(self, messages: list[MessageDict], system_prompt: str | None) -> None:
        """Another conversation from now on (resume, clear): its own window and figures."""
        self.messages = messages
        self.system_prompt = system_prompt
        self.turns = count_turns(messages)
        self.trimmed_turns = 0
        self.figures = Figures()
        self.policy.reset()

    def system(self) -> list[MessageDict]:
        return [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    def last_turn_start(self) -> int | None:
        """Where the last complete turn (its user message) begins, or None if there is none."""
        # A tool-using turn stopped after its calls ends with results, not a reply: still a turn.
        if self.stateless or not self.messages or self.messages[-1]["role"] == "user":
            return None
        i = len(self.messages) - 1
        while i >= 0 and self.messages[i]["role"] != "user":
            i -= 1
        return i if i >= 0 else None

    def rewind(self, n: int, new: list[MessageDict] | None = None) -> None:
        """Keep the first ``n`` messages, then ``new`` (an undo, a retry, a cut reply: once the
        store has recorded it)."""
        del self.messages[n:]
        self.messages.extend(new or [])
        self.turns = count_turns(self.messages)
        self.policy.truncated(n)

    def plan_retry(self) -> Plan:
        """The prompt that asks the last user message again, without the turn it replaces."""
        at = self.last_turn_start()
        if at is None:
            raise SessionError("there is no reply to retry yet")
        plan = self.plan(self.messages[at]["content"], upto=at)
        return Plan(plan.user, plan.prompt, plan.start, plan.trimmed_turns, replaces=at)

    def plan_continue(self) -> tuple[Plan, list[MessageDict]]:
        """The prompt that continues the last turn after its tool results (the API client ran
        the calls): the turn's plan, and its messages after the user's (already committed)."""
        at = self.last_turn_start()
        if at is None or self.messages[-1]["role"] != "tool":
            raise SessionError("there is no tool result to continue after")
        return self.plan(self.messages[at]["content"], upto=at), self.messages[at + 1:]

    def plan(self, text: str, *, upto: int | None = None) -> Plan:
        """The prompt for a new user message (raises ``SessionError`` if it cannot fit at all);
        ``upto`` plans as if the history held only its first ``upto`` messages (a retry)."""
        user: MessageDict = {"role": "user", "content": text}
        history = [] if self.stateless else self.messages if upto is None else self.messages[:upto]
        system = self.system()
        fit: Fit = self.policy.fit(history, system, user)
        self.trimmed_turns += fit.dropped_now  # the start only moves forward: count incrementally
        prefix = self.policy.prefix(system)  # after fit: a compaction may have changed it
        # Backends get no "interrupted": that marker is for the file (tool fields they need).
        sent: list[MessageDict] = [m if "interrupted" not in m else  # type: ignore[misc]
                                   {k: v for k, v in m.items() if k != "interrupted"}
                                   for m in history[fit.start:]]
        return Plan(user, [*prefix, *sent, user], fit.start, self.trimmed_turns)

    def warm_prompt(self) -> list[MessageDict]:
        """What the next prompt will start with (for a warm-up after a resume)."""
        plan = self.plan("…")
        return plan.prompt[:-1]

    def commit(self, plan: Plan, reply: MessageDict | list[MessageDict], *,
               continued: bool = False) -> tuple[int, list[MessageDict]]:
        """Append a completed (or interrupted) turn, or a step of a tool-using one (``reply``: a
        list); returns (start index, messages) to journal.  ``continued``: the turn's user
        message is already in (a later step).  A retry's plan first withdraws the turn it
        replaces (its store write must be done)."""
        after = reply if isinstance(reply, list) else [reply]
        if continued:
            start = len(self.messages)
            if not self.stateless:
                self.messages.extend(after)
            return start, after
        new = [plan.user, *after]
        if plan.replaces is not None:
            self.rewind(plan.replaces, new)
            return plan.replaces, new
        start = len(self.messages)
        if not self.stateless:
            self.messages.extend(new)  # one extend: a reader never sees half a turn
            self.turns += 1
        return start, new
