"""What ``ConversationSession.chat`` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ChatResult"]


@dataclass(frozen=True)
class ChatResult:
    """One completed turn.

    Attributes:
        response: the assistant's reply.
        turn: this turn's number in the session (1-based).
        ttft_s: seconds from ``chat()`` to the first streamed piece (None if the reply was empty).
        total_s: seconds for the whole turn.
        prompt_tokens: tokens in the prompt sent to the model.
        cached_tokens: prompt tokens served from the KV cache instead of being computed.
        completion_tokens: tokens generated.
        saved: the turn is on disk (False: the save failed and was logged; memory keeps it).
        durability: with ``saved``, what the saved turn survives: ``"process"`` (the process
            dying) or ``"power"`` (the machine losing power too); None when not saved.
        finish_reason: ``stop`` (the model ended), ``length`` (hit ``max_tokens``).
        trimmed_turns: oldest turns left out of the prompt to fit the context window.
        tts_first_audio_s: seconds from ``chat()`` to the first audio (speech enabled only).
        interrupted: the turn was interrupted (barge-in): ``response`` is what reached the user,
            saved marked ``"interrupted": true`` (empty, and no turn added, if nothing did).
        heard_fraction: with ``interrupted``, the share of the generated reply that was heard.
        interrupt_to_silence_s: with ``interrupted`` and speech, seconds from the interrupt
            until the audio stopped.
        tool_calls: the tool calls of this turn, in order: ``{"id", "name", "arguments",
            "result" or "error", "duration_s"}`` (empty when the model called none); a call of
            ``client_tools`` is ``{"id", "name", "arguments", "client": True}``, pending, and
            ``finish_reason`` is then ``tool_calls`` (docs/compat.md).
    """

    response: str
    turn: int
    ttft_s: float | None
    total_s: float
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    saved: bool = False
    finish_reason: str | None = None
    trimmed_turns: int = 0
    tts_first_audio_s: float | None = None
    interrupted: bool = False
    heard_fraction: float | None = None
    interrupt_to_silence_s: float | None = None
    durability: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float | None:
        """Generation speed after the first token."""
        if not self.completion_tokens or self.ttft_s is None or self.total_s <= self.ttft_s:
            return None
        return max(self.completion_tokens - 1, 1) / (self.total_s - self.ttft_s)

    def __str__(self) -> str:
        return self.response
