"""The conversation itself: no threads, no I/O, no backend calls of its own.

What the sync and the async session share, written once: the kept messages, what a prompt
carries (through a window policy), what a completed turn commits, and the running figures.
The drivers (``_session.py``, ``_async.py``) and the ``Turn`` do the waiting, streaming and
saving; every decision about the history is made here.

Three outcomes of a turn, and what each leaves in the history:

* completed: the user message and the whole reply are appended (one step, then journaled);
* timed out, cancelled, failed: nothing (the history, file and KV cache are as before);
* interrupted (barge-in): the reply cut to what the user heard, marked ``interrupted``
  (see ``_turn.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._format import MessageDict
from ._policy import Fit, WindowPolicy
from .backends import Usage

__all__ = ["Conversation", "Figures", "Plan"]


@dataclass(frozen=True)
class Plan:
    """What one turn sends."""

    user: MessageDict
    prompt: list[MessageDict]   # system prompt, the history the window allows, the new message
    start: int                  # index in the history where the sent part begins
    trimmed_turns: int          # turns left out of the prompt


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
    turns: int = 0              # assistant replies; kept incrementally (never recounted per turn)
    trimmed_turns: int = 0

    def __post_init__(self) -> None:
        self.turns = sum(1 for m in self.messages if m["role"] == "assistant")

    def replace(self, messages: list[MessageDict], system_prompt: str | None) -> None:
        """Another conversation from now on (resume, clear): its own window and figures."""
        self.messages = messages
        self.system_prompt = system_prompt
        self.turns = sum(1 for m in messages if m["role"] == "assistant")
        self.trimmed_turns = 0
        self.figures = Figures()
        self.policy.reset()

    def system(self) -> list[MessageDict]:
        return [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    def plan(self, text: str) -> Plan:
        """The prompt for a new user message (raises ``SessionError`` if it cannot fit at all)."""
        user: MessageDict = {"role": "user", "content": text}
        history = [] if self.stateless else self.messages
        system = self.system()
        fit: Fit = self.policy.fit(history, system, user)
        self.trimmed_turns += fit.dropped_now  # the start only moves forward: count incrementally
        prefix = self.policy.prefix(system)  # after fit: a compaction may have changed it
        # Backends get plain {role, content}: a marker such as "interrupted" is for the file.
        sent: list[MessageDict] = [m if len(m) == 2 else {"role": m["role"], "content": m["content"]}
                                   for m in history[fit.start:]]
        return Plan(user, [*prefix, *sent, user], fit.start, self.trimmed_turns)

    def warm_prompt(self) -> list[MessageDict]:
        """What the next prompt will start with (for a warm-up after a resume)."""
        plan = self.plan("…")
        return plan.prompt[:-1]

    def commit(self, plan: Plan, reply: MessageDict) -> tuple[int, list[MessageDict]]:
        """Append a completed (or interrupted) turn; returns (start index, messages) to journal."""
        start = len(self.messages)
        new = [plan.user, reply]
        if not self.stateless:
            self.messages.extend(new)  # one extend: a reader never sees half a turn
            self.turns += 1
        return start, new
