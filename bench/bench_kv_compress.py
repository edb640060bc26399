"""Does lossless compression of the ``.kv`` files pay?  (issue 16, defect 13; run by hand)

    .venv/bin/python bench/bench_kv_compress.py [--reps 5] [--threads 1] [--long-tokens 4000]
    .venv/bin/python bench/bench_kv_compress.py --smoke    # 1 rep, a ~300-token file: proves it runs

Two real KV files from the embedded model (SmolLM2-135M-Instruct Q4_1, n_ctx 8192):

* a short chat: three real turns through ``ConversationSession`` (the file the session saves);
* a ~4,000-token conversation: synthetic completed turns prefilled by the backend
  (``warm``) and saved by ``save_state``, the same code path a session's save takes.

Each file is compressed whole (header + payload) with zlib levels 1, 6 and 9, lzma presets 0
and 6, and zstd / lz4 when importable (they are not dependencies).  Reported: size ratio,
compress time, and decompress time (read from disk + decompress, page cache warm, as a
restore right after a save), against the uncompressed restore (``restore_state``: read,
verify, hand the cells to llama.cpp).

The resume target (README / BENCHMARKS.md) is: time to first token after a restart with the
KV restore <= 1.5x a warm in-process turn.  Here, per file:

* warm TTFT: the first token of a new question when the cache already holds the history
  (measured right after each restore: the cells are then exactly those of a warm session);
* resume TTFT: restore + warm TTFT;
* resume TTFT compressed: resume TTFT - read(uncompressed) + read(compressed) + decompress.

Medians of ``--reps``.  Prints a Markdown table (for BENCHMARKS.md) and a verdict per codec.
"""

from __future__ import annotations

import argparse
import lzma
import os
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from conversation_session import ConversationSession
from conversation_session.backends import Backend, CancelToken, GenerationRequest, create_backend

FILLER_Q = "Tell me more about the history of the city and the people who lived there."
FILLER_A = ("The city grew around a river port. Merchants traded wool, salt and timber, and the "
            "old market square still shows the guild houses they built. ")
SHORT_CHAT = ["Hello! What is a good name for a cat?", "Why that one?", "And for a dog?"]
QUESTION = {"role": "user", "content": "And the river?"}
TARGET = 1.5  # resume TTFT with restore <= 1.5x a warm in-process turn
SMOKE_CODECS: set[str] = set()  # --smoke: one fast codec of each kind (lzma-6 alone takes seconds)


def codecs() -> dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]]:
    out: dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]] = {}
    for level in (1, 6, 9):
        out[f"zlib-{level}"] = (lambda b, lv=level: zlib.compress(b, lv), zlib.decompress)
    for preset in (0, 6):
        out[f"lzma-{preset}"] = (lambda b, p=preset: lzma.compress(b, preset=p), lzma.decompress)
    try:
        import zstandard

        for level in (1, 3, 9):
            out[f"zstd-{level}"] = (lambda b, lv=level: zstandard.ZstdCompressor(level=lv).compress(b),
                                    lambda b: zstandard.ZstdDecompressor().decompress(b))
    except ImportError:
        print("zstandard not importable: zstd skipped", file=sys.stderr)
    try:
        import lz4.frame

        out["lz4"] = (lz4.frame.compress, lz4.frame.decompress)
    except ImportError:
        print("lz4 not importable: lz4 skipped", file=sys.stderr)
    return out


def long_history(backend: Backend, tokens: int) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    while backend.count_tokens(messages) < tokens:
        messages += [{"role": "user", "content": FILLER_Q}, {"role": "assistant", "content": FILLER_A * 2}]
    return messages


def short_chat_file(backend: Backend, root: Path) -> tuple[Path, list[dict[str, str]]]:
    """A real session of three turns; its .kv file as the session saved it on close."""
    with ConversationSession(backend=backend, sessions_dir=root, timeout=None, max_tokens=48,
                             temperature=0) as s:
        for text in SHORT_CHAT:
            s.chat(text)
        sid = s.session_id
        messages = [{"role": m["role"], "content": m["content"]} for m in s.history]
        store = s.store
    path = Path(store.kv_path(sid))  # type: ignore[attr-defined]
    if not path.is_file():
        raise SystemExit(f"the session saved no KV file at {path}")
    return path, messages


def long_file(backend: Backend, root: Path, tokens: int) -> tuple[Path, list[dict[str, str]]]:
    messages = long_history(backend, tokens)
    key = object()
    t0 = time.perf_counter()
    backend.warm(messages, CancelToken(), cache_key=key)
    print(f"  prefilled {backend.count_tokens(messages)} tokens in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    path = root / "long.kv"
    info = backend.save_state(path, messages, cache_key=key)
    if info.get("kv_save") != "saved":
        raise SystemExit(f"save_state: {info}")
    backend.forget(key)
    return path, messages


def first_token_s(backend: Backend, messages: list[dict[str, str]], key: object) -> float:
    request = GenerationRequest(messages=[*messages, QUESTION], max_tokens=1, temperature=0,  # type: ignore[list-item]
                                cache_key=key)
    t0 = time.perf_counter()
    for _ in backend.generate(request):
        return time.perf_counter() - t0
    return time.perf_counter() - t0


def read_s(path: Path) -> float:
    t0 = time.perf_counter()
    path.read_bytes()
    return time.perf_counter() - t0


def measure(backend: Backend, label: str, path: Path, messages: list[dict[str, str]],
            reps: int) -> list[dict[str, object]]:
    raw = path.read_bytes()
    restore, warm, read_raw = [], [], []
    for _ in range(reps):
        key = object()
        backend.reset_cache()
        read_raw.append(read_s(path))
        t0 = time.perf_counter()
        info = backend.restore_state(path, messages, len(raw) + 1, cache_key=key)  # type: ignore[arg-type]
        restore.append(time.perf_counter() - t0)
        if not info.get("kv_restored"):
            raise SystemExit(f"restore refused: {info}")
        warm.append(first_token_s(backend, messages, key))
        backend.forget(key)
    base = {"file": label, "tokens": backend.count_tokens(messages), "bytes": len(raw),  # type: ignore[arg-type]
            "restore_s": statistics.median(restore), "warm_ttft_s": statistics.median(warm),
            "read_s": statistics.median(read_raw)}
    rows: list[dict[str, object]] = [{**base, "codec": "none", "ratio": 1.0, "compress_s": 0.0,
                                      "decompress_s": 0.0, "read_compressed_s": base["read_s"]}]
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        for name, (compress, decompress) in codecs().items():
            if SMOKE_CODECS and name not in SMOKE_CODECS:
                continue
            comp_t, dec_t, read_c = [], [], []
            packed = b""
            for _ in range(reps):
                t0 = time.perf_counter()
                packed = compress(raw)
                comp_t.append(time.perf_counter() - t0)
            cpath = Path(tmp) / f"{name}.kv.z"
            cpath.write_bytes(packed)
            for _ in range(reps):
                t0 = time.perf_counter()
                data = decompress(cpath.read_bytes())
                dec_t.append(time.perf_counter() - t0)
                read_c.append(read_s(cpath))
                assert data == raw, name  # lossless, or the codec is out
            rows.append({**base, "codec": name, "ratio": len(raw) / len(packed),
                         "compress_s": statistics.median(comp_t),
                         "decompress_s": statistics.median(dec_t) - statistics.median(read_c),
                         "read_compressed_s": statistics.median(read_c)})
    for r in rows:
        resume = float(r["restore_s"]) + float(r["warm_ttft_s"])  # type: ignore[arg-type]
        if r["codec"] != "none":
            resume += float(r["read_compressed_s"]) - float(r["read_s"]) + float(r["decompress_s"])  # type: ignore[arg-type]
        r["resume_ttft_s"] = resume
        r["resume_vs_warm"] = resume / float(r["warm_ttft_s"])  # type: ignore[arg-type]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the library's)")
    p.add_argument("--long-tokens", type=int, default=4000)
    p.add_argument("--smoke", action="store_true", help="1 repetition, a ~300-token long file: proves the script runs")
    a = p.parse_args()
    if a.smoke:
        a.reps, a.long_tokens = 1, 300
        SMOKE_CODECS.update({"zlib-1", "lzma-0", "zstd-1", "lz4"})
    started = time.perf_counter()
    load0 = os.getloadavg()[0]
    backend = create_backend("llama-cpp", n_threads=a.threads)
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path, messages = short_chat_file(backend, root / "sessions")
        rows += measure(backend, "short chat (3 turns)", path, messages, a.reps)
        path, messages = long_file(backend, root, a.long_tokens)
        rows += measure(backend, f"~{a.long_tokens:,} tokens", path, messages, a.reps)
    print(f"\nMachine: {os.cpu_count()} cores; threads {backend.n_threads}; load average {load0:.2f} -> "
          f"{os.getloadavg()[0]:.2f}; run took {time.perf_counter() - started:.0f} s; median of {a.reps}\n")
    print("| file | tokens | codec | size | ratio | compress | decompress | restore (+decompress) | "
          "warm TTFT | resume TTFT | resume / warm |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        size = int(r["bytes"]) / float(r["ratio"])  # type: ignore[arg-type]
        restore = float(r["resume_ttft_s"]) - float(r["warm_ttft_s"])  # type: ignore[arg-type]
        print(f"| {r['file']} | {r['tokens']} | {r['codec']} | {size / 1e6:.1f} MB | {float(r['ratio']):.2f}x | "  # type: ignore[arg-type]
              f"{float(r['compress_s']) * 1000:.0f} ms | {float(r['decompress_s']) * 1000:.0f} ms | "  # type: ignore[arg-type]
              f"{restore * 1000:.0f} ms | {float(r['warm_ttft_s']) * 1000:.0f} ms | "  # type: ignore[arg-type]
              f"{float(r['resume_ttft_s']) * 1000:.0f} ms | {float(r['resume_vs_warm']):.2f}x |")  # type: ignore[arg-type]
    print()
    for name in dict.fromkeys(str(r["codec"]) for r in rows if r["codec"] != "none"):
        mine = [r for r in rows if r["codec"] == name]
        ok = all(float(r["resume_vs_warm"]) <= TARGET for r in mine)  # type: ignore[arg-type]
        worst = max(float(r["resume_vs_warm"]) for r in mine)  # type: ignore[arg-type]
        print(f"{name}: resume/warm worst {worst:.2f}x -> {'within' if ok else 'OVER'} the {TARGET}x target")
    base = [r for r in rows if r["codec"] == "none"]
    print("uncompressed: resume/warm " + ", ".join(f"{float(r['resume_vs_warm']):.2f}x" for r in base))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
