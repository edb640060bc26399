"""Make the embedded model's next reply begin with chosen tokens (bytes that are not valid UTF-8,
say), as a model sometimes samples them; the real model evaluates them and goes on from there."""

from __future__ import annotations

from typing import Any

import pytest

from conversation_session.backends._llama_cpp import LlamaCppBackend


def byte_token(backend: LlamaCppBackend, byte: int) -> int:
    """The token that stands for one raw byte (SmolLM2 has one for each)."""
    llama = backend._model.llama
    return next(t for t in range(llama.n_vocab()) if llama.detokenize([t]) == bytes([byte]))


def text_tokens(backend: LlamaCppBackend, text: str) -> list[int]:
    return backend._model.llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)


class _Forced:
    """A request's real sampler, whose first picks are replaced by ``tokens`` (it still samples
    each time, so its random state and repeat-penalty history advance as usual)."""

    def __init__(self, real: Any, tokens: list[int]):
        self.real = real
        self.tokens = list(tokens)

    def sample(self, ctx: Any, idx: int) -> int:
        tok = int(self.real.sample(ctx, idx))
        return self.tokens.pop(0) if self.tokens else tok

    def close(self) -> None:
        self.real.close()


def force_next_reply(monkeypatch: pytest.MonkeyPatch, backend: LlamaCppBackend, tokens: list[int]) -> None:
    """The next reply ``backend`` generates begins with ``tokens``; later ones are left alone."""
    real = LlamaCppBackend._sampler.__get__(backend)
    pending = [list(tokens)]

    def sampler(request: Any, *args: Any) -> Any:  # args: the grammar of a forced tool call
        return _Forced(real(request, *args), pending.pop() if pending else [])

    monkeypatch.setattr(backend, "_sampler", sampler)
