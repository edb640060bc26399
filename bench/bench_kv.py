"""KV-cache benchmarks for the embedded model (run by hand; results go into BENCHMARKS.md).

    .venv/bin/python bench/bench_kv.py            # all four, ~5 minutes on 2 cores
    .venv/bin/python bench/bench_kv.py --quick    # fewer repetitions
    (plots need matplotlib: .venv/bin/pip install matplotlib)

1. resume: time to first token after a restart vs history length, restoring the saved KV
   cache vs prefilling the history again, against a warm in-process turn.
2. reuse: tokens prefilled per turn over 20 turns, with the KV cache reused vs not.
3. timeout: from SessionTimeoutError to the next turn's first token, vs a fresh session's.
4. overhead: ConversationSession.chat() vs calling the backend directly with the same prompts.

A "restart" here is a new ConversationSession in the same process after the shared model's
KV cache has been emptied: what a new process sees, minus loading the model (which is the
same 0.2 s either way and is reported separately by `stats`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from conversation_session import ConversationSession, SessionTimeoutError
from conversation_session.backends import CancelToken, GenerationRequest
from conversation_session.backends._llama_cpp import LlamaCppBackend

RESULTS = Path(__file__).parent / "results"
PLOTS = Path(__file__).parent / "plots"
FILLER_Q = "Tell me more about the history of the city and the people who lived there."
FILLER_A = (
    "The city grew around a river port. Merchants traded wool, salt and timber, and the "
    "old market square still shows the guild houses they built. "
)


def history_of(backend: LlamaCppBackend, tokens: int) -> list[dict[str, str]]:
    """Synthetic completed turns whose rendered prompt is about ``tokens`` long."""
    messages: list[dict[str, str]] = []
    while backend.count_tokens(messages) < tokens:
        messages += [{"role": "user", "content": FILLER_Q}, {"role": "assistant", "content": FILLER_A * 2}]
    return messages


def bench_session(backend, sessions_dir, *, max_tokens: int, persist_kv_cache: bool = True) -> ConversationSession:
    """The benchmarks' session: greedy, no time limit."""
    return ConversationSession(
        backend=backend,
        timeout=None,
        sessions_dir=sessions_dir,
        max_tokens=max_tokens,
        temperature=0,
        persist_kv_cache=persist_kv_cache,
    )


def seed_session(sessions: Path, backend: LlamaCppBackend, messages) -> str:
    """A saved session with ``messages`` and its KV cache on disk (as after a real turn)."""
    with ConversationSession(backend=backend, timeout=None, sessions_dir=sessions, max_tokens=1, temperature=0) as s:
        s._messages.extend(messages)  # a benchmark fixture: skip generating the filler turns
        s._writer.commit()
        s.chat("ok")
        return s.session_id


def ttft(session: ConversationSession, text: str) -> tuple[float, object]:
    t0 = time.perf_counter()
    first: list[float] = []
    result = session.chat(text, on_token=lambda _p: first or first.append(time.perf_counter() - t0))
    return (first[0] if first else result.total_s), result


def fresh_copy(base: Path) -> Path:
    """The seeded sessions folder, copied, so every repetition resumes the very same state."""
    dest = Path(tempfile.mkdtemp(dir=base.parent))
    shutil.copytree(base, dest, dirs_exist_ok=True)
    return dest


def bench_resume(backend, lengths, reps, root):
    rows = []
    for n in lengths:
        base = root / f"resume_{n}"
        sid = seed_session(base, backend, history_of(backend, n))
        cases = {}
        for label, persist in (("restore", True), ("re-prefill", False)):
            times = []
            for _ in range(reps):
                backend.reset_cache()
                with bench_session(backend, fresh_copy(base), max_tokens=4, persist_kv_cache=persist) as s:
                    t0 = time.perf_counter()
                    s.load_history(sid)
                    first, result = ttft(s, "And the river?")
                    times.append(time.perf_counter() - t0 - (result.total_s - first))
                    restored = s.get_cache_stats().get("kv_restored")
            cases[label] = (statistics.median(times), restored)
        warm = []
        with bench_session(backend, fresh_copy(base), max_tokens=4, persist_kv_cache=False) as s:
            s.load_history(sid)
            ttft(s, "And the river?")
            for _ in range(reps):
                warm.append(ttft(s, "And the bridges?")[0])
        prompt = backend.count_tokens(history_of(backend, n))
        rows.append(
            {
                "history_tokens": prompt,
                "restore_s": cases["restore"][0],
                "reprefill_s": cases["re-prefill"][0],
                "warm_turn_s": statistics.median(warm),
                "restored": cases["restore"][1],
            }
        )
        print(
            f"  resume {prompt:>5} tokens: restore {cases['restore'][0] * 1000:7.1f} ms, re-prefill "
            f"{cases['re-prefill'][0] * 1000:8.1f} ms, warm turn {statistics.median(warm) * 1000:6.1f} ms",
            file=sys.stderr,
        )
    return rows


def bench_reuse(backend, sessions, turns=20):
    out = {}
    for label, reuse in (("reuse", True), ("none", False)):
        backend.reset_cache()
        per_turn = []
        with ConversationSession(
            backend=backend, timeout=None, sessions_dir=sessions, max_tokens=32, temperature=0, persist_kv_cache=False
        ) as s:
            for i in range(turns):
                if not reuse:
                    backend.reset_cache()
                first, r = ttft(s, f"Question {i + 1}: tell me something about the number {i + 1}.")
                per_turn.append(
                    {
                        "turn": i + 1,
                        "prompt": r.prompt_tokens,
                        "prefilled": r.prompt_tokens - r.cached_tokens,
                        "ttft_s": first,
                    }
                )
        out[label] = per_turn
    return out


def bench_timeout(backend, root, reps):
    base = root / "timeout"
    sid = seed_session(base, backend, history_of(backend, 1000))
    recover, fresh = [], []
    for _ in range(reps):
        with bench_session(backend, fresh_copy(base), max_tokens=4000, persist_kv_cache=False) as s:
            s.timeout = 0.5
            s.load_history(sid)
            try:
                s.chat("Write a very long story about a dragon and a knight.")
            except SessionTimeoutError:
                t_err = time.perf_counter()
            s.timeout, s.max_tokens = 60, 4
            first, result = ttft(s, "And the river?")
            recover.append(time.perf_counter() - t_err - (result.total_s - first))
        backend.reset_cache()
        with bench_session(backend, fresh_copy(base), max_tokens=4, persist_kv_cache=False) as s:
            s.load_history(sid)
            s._stop_warmup()  # a fresh session that has not prefilled anything yet
            backend.reset_cache()
            fresh.append(ttft(s, "And the river?")[0])
    return {"recover_s": statistics.median(recover), "fresh_s": statistics.median(fresh)}


def bench_overhead(backend, sessions, turns, reps):
    prompts = [f"Give me a short fact number {i}." for i in range(turns)]
    direct_t, session_t, session_kv_t = [], [], []
    for _ in range(reps):
        backend.reset_cache()
        messages = []
        t0 = time.perf_counter()
        for p in prompts:
            req = GenerationRequest(
                messages=[*messages, {"role": "user", "content": p}], max_tokens=24, temperature=0, cancel=CancelToken()
            )
            reply = "".join(backend.generate(req))
            messages += [{"role": "user", "content": p}, {"role": "assistant", "content": reply}]
        direct_t.append(time.perf_counter() - t0)
        for persist, bucket in ((False, session_t), (True, session_kv_t)):
            backend.reset_cache()
            with bench_session(backend, sessions, max_tokens=24, persist_kv_cache=persist) as s:
                t0 = time.perf_counter()
                for p in prompts:
                    s.chat(p)
                bucket.append(time.perf_counter() - t0)
    d, s1, s2 = (statistics.median(x) for x in (direct_t, session_t, session_kv_t))
    return {"direct_s": d, "session_s": s1, "session_kv_s": s2, "overhead": s1 / d - 1, "overhead_kv": s2 / d - 1}


def plot(resume_rows, reuse):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plots)", file=sys.stderr)
        return
    PLOTS.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["history_tokens"] for r in resume_rows]
    ax.plot(xs, [r["reprefill_s"] * 1000 for r in resume_rows], "o-", label="re-prefill (other tools)")
    ax.plot(xs, [r["restore_s"] * 1000 for r in resume_rows], "o-", label="KV restore (this project)")
    ax.plot(xs, [r["warm_turn_s"] * 1000 for r in resume_rows], "o--", label="warm in-process turn")
    ax.set_xlabel("history tokens")
    ax.set_ylabel("time to first token after restart (ms)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Resume after restart, SmolLM2-135M, 2 cores")
    fig.tight_layout()
    fig.savefig(PLOTS / "kv_resume.png", dpi=110)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in reuse.items():
        ax.plot(
            [r["turn"] for r in rows],
            [r["prefilled"] for r in rows],
            "o-",
            label="KV cache reused" if label == "reuse" else "no reuse",
        )
    ax.set_xlabel("turn")
    ax.set_ylabel("prompt tokens computed")
    ax.legend()
    ax.set_title("Prompt tokens prefilled per turn")
    fig.tight_layout()
    fig.savefig(PLOTS / "kv_reuse.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    reps = 2 if args.quick else 5
    backend = LlamaCppBackend()
    with tempfile.TemporaryDirectory() as tmp:
        sessions = Path(tmp)
        resume = bench_resume(backend, [250, 500, 1000, 2000], reps, sessions)
        reuse = bench_reuse(backend, sessions)
        timeout = bench_timeout(backend, sessions, max(2, reps // 2))
        overhead = bench_overhead(backend, sessions, 8, reps + 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kv.json").write_text(
        json.dumps({"resume": resume, "reuse": reuse, "timeout": timeout, "overhead": overhead}, indent=2)
    )
    plot(resume, reuse)

    print("### 1. Time to first token after a restart\n")
    print(
        "| history tokens | KV restore | re-prefill | warm in-process turn | re-prefill / restore "
        "| restore / warm turn |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for r in resume:
        print(
            f"| {r['history_tokens']} | {r['restore_s'] * 1000:.0f} ms | {r['reprefill_s'] * 1000:.0f} ms "
            f"| {r['warm_turn_s'] * 1000:.0f} ms | {r['reprefill_s'] / r['restore_s']:.1f}x "
            f"| {r['restore_s'] / r['warm_turn_s']:.2f}x |"
        )
    print("\n### 2. Prompt tokens prefilled per turn (20 turns)\n")
    print("| turn | prompt tokens | prefilled, KV reused | prefilled, no reuse | TTFT reused | TTFT no reuse |")
    print("|---:|---:|---:|---:|---:|---:|")
    for a, b in zip(reuse["reuse"], reuse["none"], strict=True):
        if a["turn"] in (1, 2, 5, 10, 15, 20):
            print(
                f"| {a['turn']} | {a['prompt']} | {a['prefilled']} | {b['prefilled']} | {a['ttft_s'] * 1000:.0f} ms "
                f"| {b['ttft_s'] * 1000:.0f} ms |"
            )
    tot_a = sum(r["prefilled"] for r in reuse["reuse"])
    tot_b = sum(r["prefilled"] for r in reuse["none"])
    print(f"| total | | {tot_a} | {tot_b} | | |")
    print("\n### 3. Timeout recovery (1,000-token history)\n")
    print("| from SessionTimeoutError to next first token | fresh session's first token | ratio |")
    print("|---:|---:|---:|")
    print(
        f"| {timeout['recover_s'] * 1000:.0f} ms | {timeout['fresh_s'] * 1000:.0f} ms "
        f"| {timeout['fresh_s'] / timeout['recover_s']:.1f}x faster |"
    )
    print("\n### 4. Session-layer overhead (8 turns, 24 tokens each, greedy)\n")
    print("| backend directly | chat(), no KV file | chat(), KV file saved | overhead | overhead with KV file |")
    print("|---:|---:|---:|---:|---:|")
    print(
        f"| {overhead['direct_s']:.2f} s | {overhead['session_s']:.2f} s | {overhead['session_kv_s']:.2f} s "
        f"| {overhead['overhead'] * 100:+.1f} % | {overhead['overhead_kv'] * 100:+.1f} % |"
    )


if __name__ == "__main__":
    main()
