"""KV-cache benchmarks for the embedded model (run by hand; results go into BENCHMARKS.md).

    .venv/bin/python bench/bench_kv.py            # all four, 6-13 minutes on 2 shared cores
    .venv/bin/python bench/bench_kv.py --quick    # fewer repetitions
    .venv/bin/python bench/bench_kv.py --smoke    # tiny sizes, ~15 s: proves it runs (CI does)
    (plots need matplotlib: .venv/bin/pip install matplotlib)

1. resume: time to first token after a restart vs history length, restoring the saved KV
   cache vs prefilling the history again, against a warm in-process turn.
2. reuse: tokens prefilled per turn over 20 turns, with the KV cache reused vs not.
3. timeout: from SessionTimeoutError to the next turn's first token, vs a fresh session's.
4. overhead: ConversationSession.chat() vs calling the backend directly with the same prompts.

A "restart" here is a new ConversationSession in the same process: each session has its own
cache key on the shared model, so a new one starts with none of the old one's cells, as a new
process would, minus loading the model (which is the same 0.2 s either way and is reported
separately by `stats`).

Only public interfaces: the saved histories are written with
``conversation_session.testing.seed_session`` (the store's ``import_record``), then resumed
and given one real turn so the session saves its KV file, as after a real conversation.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # measure the working tree

from conversation_session import ConversationSession, SessionTimeoutError
from conversation_session.backends import Backend, CancelToken, GenerationRequest, create_backend
from conversation_session.testing import seed_session as seed_history

RESULTS = Path(__file__).parent / "results"
PLOTS = Path(__file__).parent / "plots"
FILLER_Q = "Tell me more about the history of the city and the people who lived there."
FILLER_A = (
    "The city grew around a river port. Merchants traded wool, salt and timber, and the "
    "old market square still shows the guild houses they built. "
)


def history_of(backend: Backend, tokens: int) -> list[dict[str, str]]:
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


def seed_session(sessions: Path, backend: Backend, messages) -> str:
    """A saved session with ``messages`` and its KV cache on disk (as after a real turn): the
    filler turns are written through the store (not generated), then one real turn computes
    them all and saves the KV file."""
    sid = seed_history(sessions, messages, llm_model="bench")
    with ConversationSession(backend=backend, timeout=None, sessions_dir=sessions, max_tokens=1, temperature=0) as s:
        if not s.load_history(sid):
            raise SystemExit(f"the seeded session {sid} did not resume")
        s.chat("ok")
    return sid


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
                # A new session: a new cache key, none of the cells of the sessions before.
                with bench_session(backend, fresh_copy(base), max_tokens=4, persist_kv_cache=persist) as s:
                    t0 = time.perf_counter()
                    s.load_history(sid)
                    first, result = ttft(s, "And the river?")
                    times.append(time.perf_counter() - t0 - (result.total_s - first))
                    restored = s.get_cache_stats().get("kv_restored")
            if persist and not restored:
                raise SystemExit(f"the KV file of the {n}-token session was not restored: that is a re-prefill")
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


def reuse_question(i: int) -> str:
    return f"Question {i + 1}: tell me something about the number {i + 1}."


def bench_reuse(backend, sessions, turns=20, max_tokens=32):
    """Tokens computed per turn: a session (its KV cells kept between turns) against the same
    conversation sent to the backend with a new cache key every turn (nothing reused: what a
    tool that re-sends the history to a fresh context pays)."""
    per_turn = []
    with ConversationSession(
        backend=backend, timeout=None, sessions_dir=sessions, max_tokens=max_tokens, temperature=0,
        persist_kv_cache=False,
    ) as s:
        for i in range(turns):
            first, r = ttft(s, reuse_question(i))
            per_turn.append(
                {"turn": i + 1, "prompt": r.prompt_tokens, "prefilled": r.prompt_tokens - r.cached_tokens,
                 "ttft_s": first}
            )
    none = []
    messages: list[dict[str, str]] = []
    for i in range(turns):
        key = object()  # a key the model has never seen: every prompt token is computed
        request = GenerationRequest(
            messages=[*messages, {"role": "user", "content": reuse_question(i)}],  # type: ignore[list-item]
            max_tokens=max_tokens, temperature=0, cancel=CancelToken(), cache_key=key,
        )
        t0 = time.perf_counter()
        first_s: float | None = None
        pieces = []
        for piece in backend.generate(request):
            if first_s is None:
                first_s = time.perf_counter() - t0
            pieces.append(piece)
        backend.forget(key)
        u = request.usage
        none.append(
            {"turn": i + 1, "prompt": u.prompt_tokens, "prefilled": u.prompt_tokens - (u.cached_tokens or 0),
             "ttft_s": first_s if first_s is not None else time.perf_counter() - t0}
        )
        messages += [{"role": "user", "content": reuse_question(i)}, {"role": "assistant", "content": "".join(pieces)}]
    return {"reuse": per_turn, "none": none}


def wait_warm(session: ConversationSession, limit_s: float = 600) -> None:
    """Until the background warm-up that load_history() started is over (its public status)."""
    end = time.monotonic() + limit_s
    while session.get_cache_stats().get("warmup") == "running":
        if time.monotonic() > end:
            raise SystemExit(f"the warm-up did not finish in {limit_s:g} s")
        time.sleep(0.01)


def bench_timeout(backend, root, reps, tokens=1000):
    base = root / "timeout"
    sid = seed_session(base, backend, history_of(backend, tokens))
    recover, fresh = [], []
    for _ in range(reps):
        with bench_session(backend, fresh_copy(base), max_tokens=4000, persist_kv_cache=False) as s:
            s.load_history(sid)
            wait_warm(s)  # the user typed meanwhile: the timeout is to cut the reply, not the warm-up
            s.timeout = 0.5
            try:
                s.chat("Write a very long story about a dragon and a knight.")
            except SessionTimeoutError:
                t_err = time.perf_counter()
            else:
                raise SystemExit("the long reply finished within timeout=0.5 s: nothing to recover from")
            s.timeout, s.max_tokens = 60, 4
            first, result = ttft(s, "And the river?")
            recover.append(time.perf_counter() - t_err - (result.total_s - first))
        # A fresh session (new cache key: none of the cells above) that must compute the same
        # history: from load_history() to its first token, with no KV file to restore.
        with bench_session(backend, fresh_copy(base), max_tokens=4, persist_kv_cache=False) as s:
            t0 = time.perf_counter()
            s.load_history(sid)
            first, result = ttft(s, "And the river?")
            fresh.append(time.perf_counter() - t0 - (result.total_s - first))
    return {"history_tokens": tokens, "recover_s": statistics.median(recover), "fresh_s": statistics.median(fresh)}


def bench_overhead(backend, sessions, turns, reps, max_tokens=24):
    prompts = [f"Give me a short fact number {i}." for i in range(turns)]
    direct_t, session_t, session_kv_t = [], [], []
    for _ in range(reps):
        backend.reset_cache()  # the direct calls' key (None): start from an empty context
        messages = []
        t0 = time.perf_counter()
        for p in prompts:
            req = GenerationRequest(
                messages=[*messages, {"role": "user", "content": p}], max_tokens=max_tokens, temperature=0,
                cancel=CancelToken(),
            )
            reply = "".join(backend.generate(req))
            messages += [{"role": "user", "content": p}, {"role": "assistant", "content": reply}]
        direct_t.append(time.perf_counter() - t0)
        for persist, bucket in ((False, session_t), (True, session_kv_t)):
            with bench_session(backend, sessions, max_tokens=max_tokens, persist_kv_cache=persist) as s:
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
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes, one repetition: proves the script runs (no results file, no plots)")
    args = ap.parse_args()
    reps = 1 if args.smoke else 2 if args.quick else 5
    lengths = [60] if args.smoke else [250, 500, 1000, 2000]
    reuse_turns, overhead_turns = (3, 2) if args.smoke else (20, 8)
    timeout_tokens = 60 if args.smoke else 1000
    reply_tokens = 8 if args.smoke else 24
    backend = create_backend("llama-cpp")
    with tempfile.TemporaryDirectory() as tmp:
        sessions = Path(tmp)
        t0 = time.perf_counter()
        resume = bench_resume(backend, lengths, reps, sessions)
        t1 = time.perf_counter()
        reuse = bench_reuse(backend, sessions, reuse_turns, reply_tokens + 8)
        t2 = time.perf_counter()
        timeout = bench_timeout(backend, sessions, 1 if args.smoke else max(2, reps // 2), timeout_tokens)
        t3 = time.perf_counter()
        overhead = bench_overhead(backend, sessions, overhead_turns, reps + (0 if args.smoke else 1), reply_tokens)
        print(f"  took: resume {t1 - t0:.0f} s, reuse {t2 - t1:.0f} s, timeout {t3 - t2:.0f} s, "
              f"overhead {time.perf_counter() - t3:.0f} s", file=sys.stderr)
    if not args.smoke:  # a smoke run's figures mean nothing: keep the last real ones
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
    print(f"\n### 2. Prompt tokens prefilled per turn ({len(reuse['reuse'])} turns)\n")
    print("| turn | prompt tokens | prefilled, KV reused | prefilled, no reuse | TTFT reused | TTFT no reuse |")
    print("|---:|---:|---:|---:|---:|---:|")
    for a, b in zip(reuse["reuse"], reuse["none"], strict=True):
        if a["turn"] in (1, 2, 5, 10, 15, 20) or len(reuse["reuse"]) < 5:
            print(
                f"| {a['turn']} | {a['prompt']} | {a['prefilled']} | {b['prefilled']} | {a['ttft_s'] * 1000:.0f} ms "
                f"| {b['ttft_s'] * 1000:.0f} ms |"
            )
    tot_a = sum(r["prefilled"] for r in reuse["reuse"])
    tot_b = sum(r["prefilled"] for r in reuse["none"])
    print(f"| total | | {tot_a} | {tot_b} | | |")
    print(f"\n### 3. Timeout recovery ({timeout['history_tokens']:,}-token history)\n")
    print("| from SessionTimeoutError to next first token | fresh session's first token | ratio |")
    print("|---:|---:|---:|")
    print(
        f"| {timeout['recover_s'] * 1000:.0f} ms | {timeout['fresh_s'] * 1000:.0f} ms "
        f"| {timeout['fresh_s'] / timeout['recover_s']:.1f}x faster |"
    )
    print(f"\n### 4. Session-layer overhead ({overhead_turns} turns, {reply_tokens} tokens each, greedy)\n")
    print("| backend directly | chat(), no KV file | chat(), KV file saved | overhead | overhead with KV file |")
    print("|---:|---:|---:|---:|---:|")
    print(
        f"| {overhead['direct_s']:.2f} s | {overhead['session_s']:.2f} s | {overhead['session_kv_s']:.2f} s "
        f"| {overhead['overhead'] * 100:+.1f} % | {overhead['overhead_kv'] * 100:+.1f} % |"
    )


if __name__ == "__main__":
    main()
