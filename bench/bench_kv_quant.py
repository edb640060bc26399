"""Quantised KV cache types for the embedded model: size, speed and answer drift (issue 25; run by hand)

    .venv/bin/python bench/bench_kv_quant.py            # ~5-8 minutes on 2 cores
    .venv/bin/python bench/bench_kv_quant.py --smoke    # a few seconds: every path once, tiny sizes
    .venv/bin/python bench/bench_kv_quant.py [--tokens 2000] [--reps 5] [--types f16,q8_0] [--threads 1]

For each KV cache type of ``LlamaCppBackend(kv_cache_type=...)`` (SmolLM2-135M-Instruct Q4_1,
n_ctx 8192), on the same synthetic conversation of about ``--tokens`` tokens (varied completed
turns, prefilled by the backend's ``warm`` and saved by ``save_state``: a session's own save
path):

* ``.kv`` file bytes, and bytes per token;
* save: ``save_state`` (render, copy the cells out of llama.cpp, write the file with fsync),
  right after a restore;
* restore: ``restore_state`` (read, verify, hand the cells to llama.cpp);
* warm TTFT: the first token of a new question with the history already in the cache
  (measured right after each restore: the cells are then exactly those of a warm session);
* resume TTFT = restore + warm TTFT, against this type's warm TTFT and f16's (the target:
  <= 1.5x a warm in-process turn);
* cold TTFT: the same question with nothing cached (the whole history computed again; once);
* decode: milliseconds per generated token (the drift replies' generation time / tokens);
* drift: greedy replies (temperature 0, ``--reply-tokens``) to ten fixed questions after the
  restored history, compared with f16's: how many replies differ, and the share of f16's reply
  tokens that match before the first difference (100 % = identical).

Rows: ``f16`` (today's default: f16 cells, no flash attention), ``f16+fa`` (f16 cells with
flash attention: separates what flash attention changes from what quantisation does; a
bench-only type), ``q8_0`` and ``q4_0`` (both with flash attention, which llama.cpp needs for
a quantised V cache).  All types are loaded at once and the repetitions interleaved type by
type (so the machine's load hits them alike).  Medians of ``--reps``.  Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from conversation_session.backends import CancelToken, GenerationRequest, _llama_cpp
from conversation_session.backends._llama_cpp import LlamaCppBackend

# f16 cells with flash attention, for this benchmark only: the backend turns flash attention
# on for every type but "f16".
_llama_cpp.KV_CACHE_TYPES.setdefault("f16+fa", _llama_cpp.KV_CACHE_TYPES["f16"])

TARGET = 1.5
TURNS = [
    ("I'm planning a week in Lisbon in May. Where should I stay?",
     "Alfama and Baixa are central and walkable; Príncipe Real is quieter, with gardens and small "
     "restaurants. Belém is further out but close to the monastery and the river."),
    ("What should I eat there?",
     "Try pastéis de nata, grilled sardines in June, bacalhau à brás, bifana sandwiches, and a "
     "glass of vinho verde. The Time Out market gathers many local cooks under one roof."),
    ("How do I get from the airport to the centre?",
     "The red metro line runs from the airport to Saldanha in about twenty minutes, where you "
     "change for the centre; the Aerobus stops at Marquês de Pombal and Rossio."),
    ("Is it worth taking a day trip to Sintra?",
     "Yes: the Pena Palace, the Moorish Castle and Quinta da Regaleira are an hour away by train "
     "from Rossio. Go early on a weekday, and wear good shoes: the paths are steep."),
    ("My daughter is seven. Anything for children?",
     "The Oceanário in Parque das Nações is one of Europe's largest aquariums; the tram 28 ride, "
     "the Pavilhão do Conhecimento science museum and the beach at Cascais are favourites too."),
    ("What about the weather in May?",
     "Mostly sunny, 17 to 24 degrees, with cool evenings by the water and the odd shower. Bring a "
     "light jacket, sunscreen, and shoes with grip: the cobbled streets are slippery."),
    ("Can you suggest a budget for food?",
     "A lunch menu do dia costs 10 to 15 euros, a dinner in a tasca 20 to 30 euros a person, a "
     "coffee and pastry about 3 euros. Tipping is small: round up or leave 5 to 10 percent."),
    ("Which museums are the best?",
     "The Gulbenkian for art from Egypt to Lalique, the National Tile Museum, MAAT by the river, "
     "and the Coach Museum in Belém, which children enjoy. Many are free on Sunday mornings."),
]
QUESTIONS = [
    "Which neighbourhood did you suggest for a quiet stay?",
    "Remind me how to get from the airport to Rossio.",
    "What was the price of a lunch menu?",
    "Which aquarium did you mention?",
    "How long is the train to Sintra?",
    "What should I pack for the weather?",
    "Name two dishes you recommended.",
    "Which museum has art from Egypt?",
    "Summarise my trip plan in one sentence.",
    "What is the tip custom in Lisbon?",
]
NEW_QUESTION = {"role": "user", "content": "And where can I hear fado?"}


def history(backend: LlamaCppBackend, tokens: int) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = [{"role": "system", "content": "You are a helpful travel assistant."}]
    i = 0
    while backend.count_tokens(messages) < tokens:  # type: ignore[arg-type]
        q, a = TURNS[i % len(TURNS)]
        round_ = i // len(TURNS)
        if round_:
            q = f"(Again, for my friend's trip number {round_ + 1}) {q}"
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        i += 1
    return messages


def first_token_s(backend: LlamaCppBackend, messages: list[dict[str, str]], key: object) -> float:
    request = GenerationRequest(messages=[*messages, NEW_QUESTION], max_tokens=1, temperature=0,  # type: ignore[list-item]
                                cache_key=key)
    t0 = time.perf_counter()
    for _ in backend.generate(request):
        break
    return time.perf_counter() - t0


def reply(backend: LlamaCppBackend, messages: list[dict[str, str]], question: str, key: object,
          max_tokens: int) -> tuple[list[int], float, int]:
    request = GenerationRequest(messages=[*messages, {"role": "user", "content": question}],  # type: ignore[list-item]
                                max_tokens=max_tokens, temperature=0, cache_key=key)
    pieces = []
    t1 = None
    for piece in backend.generate(request):
        if t1 is None:
            t1 = time.perf_counter()
        pieces.append(piece)
    decode = time.perf_counter() - t1 if t1 is not None else 0.0
    text = "".join(pieces)
    toks = backend._model.llama.tokenize(text.encode(), add_bos=False, special=False) if text else []
    return list(toks), decode, request.usage.completion_tokens


def prepare(kv_type: str, a: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Load the model with this cell type, prefill the history, save its .kv file."""
    backend = LlamaCppBackend(n_threads=a.threads, kv_cache_type=kv_type)
    messages = history(backend, a.tokens)
    key = object()
    t0 = time.perf_counter()
    backend.warm(messages, CancelToken(), cache_key=key)  # type: ignore[arg-type]
    prefill = time.perf_counter() - t0
    path = root / f"{kv_type}.kv"
    info = backend.save_state(path, messages, cache_key=key)  # type: ignore[arg-type]
    if info.get("kv_save") != "saved":
        raise SystemExit(f"{kv_type}: save_state: {info}")
    backend.forget(key)
    return {"type": kv_type, "backend": backend, "messages": messages, "path": path, "prefill_s": prefill,
            "tokens": backend.count_tokens(messages), "saved_tokens": int(info["kv_saved_tokens"]),  # type: ignore[arg-type]
            "bytes": int(info["kv_saved_bytes"]), "save": [], "restore": [], "warm": [], "cold": []}


def one_rep(r: dict[str, Any], cold: bool) -> None:
    """One save, restore and warm first token (and the cold first token once) of this type."""
    backend, messages, path = r["backend"], r["messages"], r["path"]
    key = object()
    t0 = time.perf_counter()
    info = backend.restore_state(path, messages, 1 << 34, cache_key=key)
    r["restore"].append(time.perf_counter() - t0)
    if not info.get("kv_restored"):
        raise SystemExit(f"{r['type']}: restore refused: {info}")
    r["warm"].append(first_token_s(backend, messages, key))
    info = backend.save_state(path, messages, cache_key=key)
    if info.get("kv_save") != "saved":
        raise SystemExit(f"{r['type']}: save_state: {info}")
    r["save"].append(float(info["kv_save_s"]))
    backend.forget(key)
    if cold:  # once: it is the slow path, for scale only
        cold_key = object()  # nothing cached: a new key starts from empty cells
        r["cold"].append(first_token_s(backend, messages, cold_key))
        backend.forget(cold_key)


def drift(r: dict[str, Any], a: argparse.Namespace) -> None:
    """Greedy replies to every question after the restored history (a resumed session's cells)."""
    backend, messages = r["backend"], r["messages"]
    key = object()
    backend.restore_state(r["path"], messages, 1 << 34, cache_key=key)
    replies, decode_s, decode_n = [], 0.0, 0
    for q in QUESTIONS[:a.questions]:
        toks, d, count = reply(backend, messages, q, key, a.reply_tokens)
        replies.append(toks)
        decode_s += d
        decode_n += max(0, count - 1)  # the first token's time is the prompt's
    backend.forget(key)
    r["replies"] = replies
    r["decode_ms"] = 1000 * decode_s / decode_n if decode_n else float("nan")


def agreement(base: list[int], other: list[int]) -> float:
    """Share of the f16 reply's tokens matched before the first difference."""
    if not base:
        return 1.0 if not other else 0.0
    same = 0
    for x, y in zip(base, other, strict=False):
        if x != y:
            break
        same += 1
    return same / max(len(base), len(other))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few seconds: tiny sizes, one repetition")
    p.add_argument("--tokens", type=int, default=2000, help="history length in tokens (default 2000)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--questions", type=int, default=len(QUESTIONS))
    p.add_argument("--reply-tokens", type=int, default=48)
    p.add_argument("--types", default="f16,f16+fa,q8_0,q4_0")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the library's)")
    a = p.parse_args()
    if a.smoke:
        a.tokens, a.reps, a.questions, a.reply_tokens = 100, 1, 2, 4
        a.types = "f16,q8_0"
    types = a.types.split(",")
    if types[0] != "f16":
        types.insert(0, "f16")  # drift is measured against f16
    started = time.perf_counter()
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        # Every type is loaded at once (its own llama.cpp context) and the repetitions are
        # interleaved type by type, so a change in the machine's load hits them all alike.
        rows = [prepare(t, a, Path(tmp)) for t in types]
        for rep in range(a.reps):
            for r in rows:
                one_rep(r, cold=rep == 0)
            print(f"  rep {rep + 1}/{a.reps}", file=sys.stderr)
        for r in rows:
            drift(r, a)
            for name in ("save", "restore", "warm", "cold"):
                r[f"{name}_s"] = statistics.median(r[name])
    base = rows[0]
    f16_warm = float(base["warm_s"])  # type: ignore[arg-type]
    threads = a.threads or _llama_cpp.default_n_threads()
    print(f"\nMachine: {os.cpu_count()} cores; threads {threads}; load average {load0:.2f} -> "
          f"{os.getloadavg()[0]:.2f}; run took {time.perf_counter() - started:.0f} s; median of {a.reps}; "
          f"history {base['tokens']} tokens ({base['saved_tokens']} saved); {a.questions} questions x "
          f"{a.reply_tokens} tokens\n")
    print("| KV type | file | bytes/token | save | restore | warm TTFT | resume TTFT | resume / warm | "
          "resume / f16 warm | cold TTFT | decode | replies differing from f16 | token agreement |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    verdicts = []
    for r in rows:
        resume = float(r["restore_s"]) + float(r["warm_s"])  # type: ignore[arg-type]
        pairs = list(zip(base["replies"], r["replies"], strict=True))  # type: ignore[call-overload]
        differ = sum(1 for x, y in pairs if x != y)
        agree = statistics.mean(agreement(x, y) for x, y in pairs)
        ratio, ratio16 = resume / float(r["warm_s"]), resume / f16_warm  # type: ignore[arg-type]
        print(f"| {r['type']} | {float(r['bytes']) / 1e6:.1f} MB | {float(r['bytes']) / int(r['saved_tokens']):,.0f} | "  # type: ignore[arg-type]
              f"{float(r['save_s']) * 1000:.0f} ms | {float(r['restore_s']) * 1000:.0f} ms | "  # type: ignore[arg-type]
              f"{float(r['warm_s']) * 1000:.0f} ms | {resume * 1000:.0f} ms | {ratio:.2f}x | {ratio16:.2f}x | "  # type: ignore[arg-type]
              f"{float(r['cold_s']) * 1000:.0f} ms | {float(r['decode_ms']):.1f} ms | "  # type: ignore[arg-type]
              f"{differ} of {len(pairs)} | {agree * 100:.0f} % |")
        verdicts.append(f"{r['type']}: resume/warm {ratio:.2f}x, resume/f16 warm {ratio16:.2f}x -> "
                        f"{'within' if max(ratio, ratio16) <= TARGET else 'OVER'} the {TARGET}x target")
    print()
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
