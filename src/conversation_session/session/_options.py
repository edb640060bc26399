"""A session's options: one frozen object, checked once, when it is made.

The drivers' shared constructor (``SessionView.__init__``) is the one signature users read;
it hands its arguments over as a ``SessionOptions``, and ``SessionCore`` reads them from there.
``tests/test_options.py`` checks that the signature and these fields agree (names, defaults),
as a generated twin is checked against its source.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..backends import Backend
from ..memory._kvcache import KV_CACHE_MAX_BYTES
from ..stores._api import StoreAPI
from ..stores._durability import resolve_durability
from ._limits import DEFAULT_TIMEOUT_S, DEFAULT_TOOL_ROUNDS, check_max_tokens, check_timeout, check_tool_rounds

__all__ = ["MEMORY_KINDS", "SessionOptions"]

MEMORY_KINDS = ("trim", "summary")


@dataclass(frozen=True)
class SessionOptions:
    """Every option of ``ConversationSession`` / ``AsyncConversationSession`` (see their docs)."""

    llm_model: str | os.PathLike[str] | None = None
    backend: str | Backend = "llama-cpp"
    base_url: str | None = None
    enable_cache: bool = True
    timeout: float | None = DEFAULT_TIMEOUT_S
    tts_wait_timeout: float | None = 30.0
    tts: Any = None
    sessions_dir: str | os.PathLike[str] | None = None
    system_prompt: str | None = None
    max_tokens: int = 512
    temperature: float = 0.7
    backend_options: dict[str, Any] | None = None
    persist_kv_cache: bool = True
    kv_cache_max_bytes: int = KV_CACHE_MAX_BYTES
    tts_output_dir: str | os.PathLike[str] | None = None
    tts_options: dict[str, Any] | None = None
    store: StoreAPI | str | None = None
    memory: str = "trim"
    summarizer: Backend | None = None
    durability: str | None = None
    tools: Sequence[Callable[..., Any]] | None = None
    max_tool_rounds: int = DEFAULT_TOOL_ROUNDS
    encryption_key: bytes | str | os.PathLike[str] | None = None
    approve: Callable[[dict[str, Any]], Any] | None = None
    keystore: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        # Every rule in its own function (session/_limits.py, stores/_durability.py), so the
        # setters and the command lines apply the same ones.
        set_ = object.__setattr__
        set_(self, "timeout", check_timeout(self.timeout))
        set_(self, "tts_wait_timeout", check_timeout(self.tts_wait_timeout, "tts_wait_timeout"))
        set_(self, "max_tokens", check_max_tokens(self.max_tokens))
        set_(self, "max_tool_rounds", check_tool_rounds(self.max_tool_rounds))
        if self.approve is not None and not callable(self.approve):
            raise TypeError(f"approve must be a function of the call, not {type(self.approve).__name__}")
        if self.memory not in MEMORY_KINDS:
            raise ValueError(f"memory must be 'trim' or 'summary', not {self.memory!r}")
        if self.durability is not None:
            set_(self, "durability", resolve_durability(self.durability))
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise TypeError(f"system_prompt must be a str or None, not {type(self.system_prompt).__name__}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))
