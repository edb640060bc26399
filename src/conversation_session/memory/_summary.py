"""Memory beyond the context window: a running summary that keeps the KV cache warm.

``SummaryPolicy`` is the window policy of ``memory="summary"``.  Where ``TrimPolicy`` simply
leaves the oldest turns out of the prompt, this one folds them into a running summary that
sits right after the system prompt, so the assistant still knows the user's name three
hundred turns later.

How it keeps the prompt prefix (and the backend's KV cache) stable:

* **Compaction ahead of need, in batches.**  When the history sent reaches seven eighths of the
  budget, a summary of the turns that will have to leave (a quarter of the window's worth, as
  trimming frees) is made in the background, merged with the previous summary.
* **One prefix change per compaction.**  The new summary is not used as soon as it is ready but
  when the window is actually full: then the summary and the new start switch together, once,
  and the prefix stays byte-identical until the next compaction.
* **Never delaying a reply.**  If the window is full before the summary is ready (a slow or
  failed summariser), the turn trims exactly as ``TrimPolicy`` does, with the previous summary;
  the summary is used from the next compaction on.  A summariser that fails is retried at the
  next compaction point, after a pause; no turn is ever lost (the history is never changed).

**What the user says about themselves is kept verbatim.**  A summariser can drop a fact (a
small model often does: SmolLM2-135M kept none of five planted facts in 300 turns), so the
user's own statements about themselves in the folded turns ("My name is Alice Martin.", "I live
in Lyon.", "我叫小明") are carried word for word in a notes block after the summary, within an
eighth of the window (the oldest notes give way first, and stay in the model's summary).  They
are found by a small first-person rule (English and Chinese), never by the model, so no
summariser can lose them; only the prose part is rewritten at each compaction.

The summary text (prose and notes), the number of messages it covers and the model that wrote
it are persisted with the session (journaled like a turn), so ``load_history()`` restores them
without recomputing anything.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from ..stores._record import MessageDict
from ._window import Fit, TrimPolicy

__all__ = ["Summarizer", "SummaryPolicy", "SummaryState", "join_summary", "personal_statements", "split_summary",
           "summary_prompt"]

logger = logging.getLogger("conversation_session")

# Seconds to wait before trying again after the summariser failed.
RETRY_AFTER_S = 30.0
# The summary's length limit, and what its instructions and the previous summary take.
SUMMARY_MAX_TOKENS = 256
SUMMARY_OVERHEAD_TOKENS = 320
SUMMARY_HEADER = "Summary of the earlier conversation (older turns, kept as memory):"

NOTES_HEADER = "What the user said about themselves (verbatim):"
NOTE_MAX_CHARS = 300

Summarizer = Callable[[list[MessageDict]], str]

# A statement of the user's about themselves: first person, not a question.  Deliberately
# narrow: a note that should not be there costs prompt room on every turn.
_FIRST_PERSON = re.compile(
    r"\b(my|mine|i am|i'm|im|i live|i work|i have|i've|i like|i love|i prefer|i hate|i don't like|"
    r"i was born|i study|i speak|i own|call me)\b"
    r"|我(叫|是|的|住|在|家|有|喜欢|不喜欢|爱|讨厌|今年|出生|工作|养了?)",
    re.IGNORECASE)


def personal_statements(messages: list[MessageDict]) -> list[str]:
    """The user's statements about themselves in ``messages``, verbatim, in order."""
    out: list[str] = []
    for m in messages:
        if m["role"] != "user":
            continue
        text = " ".join(m["content"].split())
        if not text or len(text) > NOTE_MAX_CHARS or text.endswith(("?", "？", "吗")):
            continue
        if _FIRST_PERSON.search(text):
            out.append(text)
    return out


def split_summary(text: str) -> tuple[str, list[str]]:
    """A stored summary's prose and its verbatim notes."""
    prose, marker, notes = text.partition(f"\n\n{NOTES_HEADER}\n")
    if not marker and text.startswith(f"{NOTES_HEADER}\n"):
        prose, notes = "", text[len(NOTES_HEADER) + 1:]
    return prose, [line[2:] for line in notes.splitlines() if line.startswith("- ")]


def join_summary(prose: str, notes: list[str]) -> str:
    if not notes:
        return prose
    block = f"{NOTES_HEADER}\n" + "\n".join(f"- {n}" for n in notes)
    return f"{prose}\n\n{block}" if prose else block


@dataclass(frozen=True)
class SummaryState:
    """A summary as persisted: its text, how many leading history messages it covers, and the
    model that wrote it."""

    text: str
    covers: int
    model: str

    def to_meta(self) -> dict[str, Any]:
        return {"text": self.text, "covers": self.covers, "model": self.model}

    @classmethod
    def from_meta(cls, data: Any) -> SummaryState | None:
        if not isinstance(data, dict):
            return None
        text, covers, model = data.get("text"), data.get("covers"), data.get("model", "")
        if not isinstance(text, str) or not isinstance(covers, int) or isinstance(covers, bool) or covers < 0:
            return None
        return cls(text, covers, model if isinstance(model, str) else "")


def _line(m: MessageDict) -> str:
    """One message of the summary's input; tool calls and results read as what was done."""
    if m["role"] == "tool":
        return f"tool {m.get('name', '')} returned: {m['content']}"
    calls = "; ".join(f"{c['function']['name']}({json.dumps(c['function']['arguments'], ensure_ascii=False)})"
                      for c in m.get("tool_calls", []))
    text = m["content"]
    return f"{m['role']}: {text}{' ' if text and calls else ''}{'[called ' + calls + ']' if calls else ''}"


def summary_prompt(previous: str | None, messages: list[MessageDict]) -> list[MessageDict]:
    """The request that folds ``messages`` into ``previous``: facts first (names, preferences,
    decisions, open questions), short, in the conversation's language."""
    lines = [_line(m) for m in messages]
    parts = []
    if previous:
        parts.append(f"Summary so far:\n{previous}\n")
    parts.append("Conversation to add:\n" + "\n".join(lines))
    return [
        {"role": "system", "content": (
            "You keep the long-term memory of a conversation. Update the summary with the new turns. "
            "Keep every fact about the user (name, preferences, plans, numbers, decisions) and what was "
            "agreed or asked; drop small talk. Write at most 120 words, in the language of the conversation, "
            "as plain sentences.")},
        {"role": "user", "content": "\n".join(parts)},
    ]


class SummaryPolicy(TrimPolicy):
    """Trimming plus a running summary (see the module docstring).

    Args:
        summarize: makes a summary from a prompt (``summary_prompt``); runs on the shared pool.
        model_name: recorded with each summary.
        run: submits background work (the process's shared pool).
        on_compaction: called with the new ``SummaryState`` when one is adopted (to persist it).
    """

    def __init__(self, context_length: Callable[[], int | None], max_tokens: Callable[[], int],
                 count: Callable[[list[MessageDict]], int], exact: bool, *, summarize: Summarizer,
                 model_name: str, run: Callable[[Callable[[], Any], str], Future[Any]],
                 on_compaction: Callable[[SummaryState], None] | None = None):
        super().__init__(context_length, max_tokens, count, exact)
        self._summarize = summarize
        self._model_name = model_name
        self._run = run
        self.on_compaction = on_compaction
        self.state: SummaryState | None = None
        self._ready: SummaryState | None = None   # made, waiting for the window to fill
        self._job: Future[Any] | None = None
        self._job_lock = threading.Lock()
        self._failed_at = 0.0
        self.compactions = 0
        self._epoch = 0   # bumped when the history is cut: a summary job under way is for another one
        self.last_error: str | None = None

    # -- what the conversation asks -----------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self.state = None
        self._ready = None
        self._job = None  # a running job's result is dropped: it is for another conversation
        self._epoch += 1

    def truncated(self, n: int) -> None:
        """An undo cut the history to ``n`` messages: a summary covering any withdrawn message no
        longer applies (the store drops it too); one being made is dropped."""
        super().truncated(n)
        with self._job_lock:
            self._epoch += 1
            self._ready = None
        if self.state is not None and self.state.covers > n:
            self.state = None
            self.start = min(self.start, n)

    def restore(self, state: SummaryState | None, history_len: int) -> None:
        """A resumed session's persisted summary (ignored if it covers more than the history)."""
        if state is not None and state.covers <= history_len:
            self.state = state
            self.start = state.covers

    def summary_text(self) -> str | None:
        return self.state.text if self.state else None

    def wait_idle(self, timeout: float | None = None) -> None:
        """Wait for a running summary job (tests, benchmarks and close)."""
        job = self._job
        if job is not None:
            job.result(timeout)

    # -- fitting ------------------------------------------------------------------------------
    def prefix(self, system: list[MessageDict]) -> list[MessageDict]:
        """The system part of the prompt: the system prompt with the summary appended to it
        (one system message: every chat template accepts that)."""
        if self.state is None:
            return system
        block = f"{SUMMARY_HEADER}\n{self.state.text}"
        if system:
            return [{"role": "system", "content": f"{system[0]['content']}\n\n{block}"}, *system[1:]]
        return [{"role": "system", "content": block}]

    def fit(self, history: list[MessageDict], system: list[MessageDict], user: MessageDict) -> Fit:
        n_ctx = self._context_length()
        if n_ctx is None:
            return Fit(self.start, 0)
        budget = n_ctx - self._max_tokens()
        prefix = self.prefix(system)
        fixed = self.tokens.base() + sum(self.tokens.of(m) for m in (*prefix, user))
        sent = self._sent_tokens(history, fixed, budget)
        if sent is not None and sent <= budget - n_ctx // 8:
            return Fit(self.start, 0)  # room left: nothing changes
        ready = self._ready
        if sent is None and ready is not None:
            # The window is full and a summary is ready: switch prefix and start together, once.
            # The turns that arrived while it was being made (and the summary's own length) may
            # not fit beside it: then the start moves on to the first turn that leaves the
            # usual quarter of the window free, as trimming would; the next compaction folds
            # those turns into the summary.
            new_prefix = self.prefix_for(system, ready)
            new_fixed = self.tokens.base() + sum(self.tokens.of(m) for m in (*new_prefix, user))
            start = max(ready.covers, self.start)
            if self._sent_tokens_from(history, start, new_fixed, budget) is None:
                start = max(start, self._cut_for(history, new_fixed, budget - n_ctx // 4))
            if start < len(history):
                dropped = sum(1 for m in history[self.start:start] if m["role"] == "user")
                self._adopt(ready, start)
                return Fit(self.start, dropped)
            self._ready = None  # the summary alone leaves no room: trim, and fold again later
        fit = super().fit(history, prefix, user) if sent is None else Fit(self.start, 0)
        self._maybe_start_job(history, fixed, budget, n_ctx)
        return fit

    def prefix_for(self, system: list[MessageDict], state: SummaryState) -> list[MessageDict]:
        saved, self.state = self.state, state
        try:
            return self.prefix(system)
        finally:
            self.state = saved

    def _adopt(self, state: SummaryState, start: int) -> None:
        self.state = state
        self.start = start
        self._ready = None
        self.compactions += 1
        logger.info("memory: compacted the conversation: %d messages now in the summary (%d characters)",
                    state.covers, len(state.text))
        if self.on_compaction is not None:
            self.on_compaction(state)

    def _sent_tokens(self, history: list[MessageDict], fixed: int, budget: int) -> int | None:
        return self._sent_tokens_from(history, self.start, fixed, budget)

    def _sent_tokens_from(self, history: list[MessageDict], start: int, fixed: int, budget: int) -> int | None:
        """Tokens of the prompt from ``start`` (walking back from the newest), or None if over ``budget``."""
        total = fixed
        for i in range(len(history) - 1, start - 1, -1):
            total += self.tokens.at(history, i)
            if total > budget:
                return None
        return total

    def _cut_for(self, history: list[MessageDict], fixed: int, target: int) -> int:
        """The earliest turn start whose suffix fits ``target`` (walking back from the newest)."""
        total, best, i = fixed, len(history), len(history)
        while i > 0:
            i -= 1
            total += self.tokens.at(history, i)
            if total > target:
                break
            if history[i]["role"] == "user":
                best = i
        return best

    # -- the background job -------------------------------------------------------------------
    def _notes(self, previous: list[str], batch: list[MessageDict], n_ctx: int) -> list[str]:
        """The previous notes plus the batch's statements, deduplicated, within an eighth of the
        window (the oldest give way first)."""
        notes = list(previous)
        for line in personal_statements(batch):
            if line not in notes:
                notes.append(line)
        room = n_ctx // 8
        while notes and sum(self.tokens.of({"role": "user", "content": n}) for n in notes) > room:
            notes.pop(0)
        return notes

    def _maybe_start_job(self, history: list[MessageDict], fixed: int, budget: int, n_ctx: int) -> None:
        with self._job_lock:
            if self._job is not None and not self._job.done():
                return
            if self._ready is not None or time.monotonic() - self._failed_at < RETRY_AFTER_S:
                return
            # Fold what must leave so that the rest fits a quarter of the window below the
            # budget (as trimming frees), with a margin for the summary growing.
            cut = self._cut_for(history, fixed, budget - n_ctx // 4 - n_ctx // 16)
            if cut <= (self.state.covers if self.state else 0):
                return
            covered = self.state.covers if self.state else 0
            previous, old_notes = split_summary(self.state.text) if self.state else ("", [])
            batch = history[covered:cut]
            if not batch:
                return
            notes = self._notes(old_notes, batch, n_ctx)
            # The summariser sees its instructions, the previous summary and the batch: a batch
            # larger than its window is folded in chunks, oldest first.
            room = max(n_ctx - SUMMARY_MAX_TOKENS - SUMMARY_OVERHEAD_TOKENS, n_ctx // 4)
            chunks: list[list[MessageDict]] = [[]]
            used = 0
            for i in range(covered, cut):
                share = self.tokens.at(history, i)
                if chunks[-1] and used + share > room:
                    chunks.append([])
                    used = 0
                chunks[-1].append(history[i])
                used += share
            generation = self.compactions
            epoch = self._epoch

            def job() -> None:
                try:
                    text = previous
                    for chunk in chunks:
                        text = self._summarize(summary_prompt(text or None, chunk)).strip()
                        if not text:
                            raise ValueError("the summariser returned nothing")
                    text = join_summary(text, notes)
                except Exception as exc:  # noqa: BLE001 - a failed summary only means trimming
                    self._failed_at = time.monotonic()
                    self.last_error = str(exc)
                    logger.warning("memory: the summary could not be made (%s); trimming instead, "
                                   "retrying in %.0f s", exc, RETRY_AFTER_S)
                    return
                if generation == self.compactions and epoch == self._epoch and \
                        (self.state is None or self.state.covers == covered):
                    self._ready = SummaryState(text, cut, self._model_name)
                    self.last_error = None

            self._job = self._run(job, "summary")
