"""Resume and per-turn cost against history length, with window trimming active.

The configuration users run: a long-lived assistant whose history is far larger than the
context window (4,096 tokens for Ollama, 2,048 for the embedded model here), so every prompt is
fitted to the window.  The earlier persistence benchmark never had trimming on, which is how a
quadratic fitting step (66 s to resume 2,500 turns) went unnoticed.

For each history length (10 / 100 / 1,000 / 5,000 messages, ~200-character user messages and
~400-character replies, one turn in three in Chinese) and each backend:

* ``load_history()``: median and p99 over repeated resumes of the same session (each resume
  opens the session, fits the window for the warm-up, starts the warm-up in the background);
* ``chat()`` session overhead: the turn's wall time minus the time spent inside the backend's
  ``generate`` (measured by wrapping it), median and p99 over 30 turns;

next to the same measurements **without** a window (``FakeBackend`` with no context limit: the
baseline the target is stated against, measured in the same run).

Backends: Ollama through the Ollama-API test server (``tests/ollama_api_server.py``, num_ctx
4096, estimated token counts), the embedded SmolLM2 (n_ctx 2048, exact token counts through
its tokenizer; ``max_tokens=1`` so the model's own time stays small), and ``FakeBackend`` with a
4,096-word window (exact counts, no model).  The OpenAI-compatible backend fits the window with
the same estimate as Ollama, so its figures match Ollama's (its server is not started here).

Run:  .venv/bin/python bench/bench_window.py [--quick]    # ~10 minutes on 2 cores (--quick: ~4)
      .venv/bin/python bench/bench_window.py --smoke      # 10 and 40 messages, 2 resumes, 2 turns
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from conversation_session import ConversationSession, FakeBackend, HistoryStore  # noqa: E402
from conversation_session.backends import Backend, GenerationRequest  # noqa: E402


def make_history(n_messages: int) -> list[dict[str, str]]:
    out = []
    for i in range(n_messages // 2):
        if i % 3 == 2:
            user = f"第{i}轮：请告诉我关于长期记忆和语音助手的一些事情，" + "我们继续聊。" * 12
            reply = "好的。" + "语音助手需要可靠地保存每一轮对话，" * 10
        else:
            user = f"Turn {i}: tell me something about long-term memory in voice assistants. " * 3
            reply = f"Reply {i}: a voice assistant keeps every completed turn on disk, " * 6
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return out


class Timed(Backend):
    """Delegates to a backend and adds up the time spent inside ``generate``."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]
        self.model_name = inner.model_name
        self.exact_token_count = inner.exact_token_count  # type: ignore[misc]
        self.can_warm = inner.can_warm  # type: ignore[misc]
        self.can_persist_state = False  # type: ignore[misc]
        self.backend_s = 0.0

    def generate(self, request: GenerationRequest) -> Iterator[str]:
        t0 = time.perf_counter()
        try:
            yield from self.inner.generate(request)
        finally:
            self.backend_s += time.perf_counter() - t0

    def context_length(self, timeout: float | None = None) -> int | None:
        return self.inner.context_length()

    def count_tokens(self, messages: Any) -> int:
        return self.inner.count_tokens(messages)

    def warm(self, messages: Any, cancel: Any, **kw: Any) -> dict[str, Any]:
        return {}  # the warm-up runs in the background; not part of what is measured here


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def measure(make_backend, n: int, folder: Path, resumes: int, turns: int) -> dict[str, float]:
    store = HistoryStore(folder)
    writer = store.create("bench")
    history = make_history(n)
    writer.append(0, history) if hasattr(writer, "append") else None
    sid = writer.session_id
    writer.close()
    backend = Timed(make_backend())
    loads = []
    for _ in range(resumes):
        with ConversationSession(backend=backend, sessions_dir=folder, max_tokens=16, timeout=None) as s:
            t0 = time.perf_counter()
            assert s.load_history(sid)
            loads.append(time.perf_counter() - t0)
    overheads = []
    with ConversationSession(backend=backend, sessions_dir=folder, max_tokens=16, timeout=None) as s:
        s.load_history(sid)
        for i in range(turns):
            before = backend.backend_s
            t0 = time.perf_counter()
            s.chat(f"question {i}: what did we talk about? " * 2)
            overheads.append(time.perf_counter() - t0 - (backend.backend_s - before))
        trimmed = s.get_cache_stats()["trimmed_turns"]
    return {"load_p50": statistics.median(loads) * 1e3, "load_p99": pct(loads, 0.99) * 1e3,
            "turn_p50": statistics.median(overheads) * 1e3, "turn_p99": pct(overheads, 0.99) * 1e3,
            "trimmed": trimmed}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="10 and 40 messages, 2 resumes, 2 turns, embedded n_ctx 512: proves it runs")
    args = ap.parse_args()
    sizes = [10, 40] if args.smoke else [10, 100, 1000, 5000]
    resumes, turns = (2, 2) if args.smoke else (5, 10) if args.quick else (15, 30)
    from ollama_api_server import OllamaAPIServer

    server = OllamaAPIServer().start()
    contenders: list[tuple[str, Any]] = [
        ("no window (baseline)", lambda: FakeBackend()),
        ("fake, 4,096-word window", lambda: FakeBackend(context_length=4096)),
        ("ollama, num_ctx 4096", lambda: _ollama(server.url)),
    ]
    try:
        import llama_cpp  # noqa: F401

        n_ctx = 512 if args.smoke else 2048  # smoke: a quarter of the prefill once the window is full
        contenders.append((f"embedded, n_ctx {n_ctx}", lambda: _embedded(n_ctx)))
    except ImportError:
        print("(embedded model not installed: skipped)")
    print(f"{'backend':<26}{'messages':>9}{'load p50':>10}{'load p99':>10}{'turn p50':>10}{'turn p99':>10}"
          f"{'trimmed':>9}   (ms; turn = session overhead)")
    try:
        for name, make in contenders:
            for n in sizes:
                with tempfile.TemporaryDirectory() as tmp:
                    r = measure(make, n, Path(tmp), resumes, turns)
                print(f"{name:<26}{n:>9}{r['load_p50']:>10.2f}{r['load_p99']:>10.2f}{r['turn_p50']:>10.2f}"
                      f"{r['turn_p99']:>10.2f}{r['trimmed']:>9}", flush=True)
    finally:
        server.stop()


def _ollama(url: str) -> Backend:
    from conversation_session.backends import create_backend

    return create_backend("ollama", base_url=url, num_ctx=4096)


_EMBEDDED: Backend | None = None


def _embedded(n_ctx: int) -> Backend:
    global _EMBEDDED
    if _EMBEDDED is None:
        from conversation_session.backends import create_backend

        _EMBEDDED = create_backend("llama-cpp", n_ctx=n_ctx)
    return _EMBEDDED


if __name__ == "__main__":
    main()
