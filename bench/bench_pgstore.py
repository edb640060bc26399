"""PostgreSQL persistence: this store vs LangChain's PostgresChatMessageHistory and LangGraph's
PostgresSaver, on the same throwaway server, in the same run.

    # the competitors live only in a throwaway venv, never in the project's:
    python3 -m venv /tmp/benchvenv
    /tmp/benchvenv/bin/pip install 'psycopg[binary]' psycopg-pool langchain-postgres \
        langgraph-checkpoint-postgres httpx prompt_toolkit 'ollama<0.7'
    PYTHONPATH=src /tmp/benchvenv/bin/python bench/bench_pgstore.py [--url postgresql://...]
    .venv/bin/python bench/bench_pgstore.py --smoke    # 10 / 100 messages, a few saves: proves it runs (~10 s)

LangChain and LangGraph are optional: when they are not importable their rows say so.

Without ``--url`` it starts its own PostgreSQL (tests/pg_server.py: loopback, fsync on).
Measured per history length (10 / 100 / 1,000 / 5,000 messages): the save of one turn (a user
and an assistant message; median of 50) and a load of the whole history (median of 20); then
sustained turns per second with 100 concurrent sessions on one store (a pool of 20).

The machine is shared (2 cores, other test suites running), so absolute milliseconds move with
its load: the load averages are printed, and our load is also timed against a baseline in the
same run, interleaved with it: the previous release's load (the server builds the history as
one JSON text, parsed by the C json module), on a connection of its own (the store's pool is
private).  The ratio is what a noisy machine cannot fake.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from conversation_session import PostgresStore, SessionRecord  # noqa: E402

SIZES = [10, 100, 1000, 5000]
SAVES = 50
LOADS = 20


def history(n: int) -> list[dict[str, str]]:
    out = []
    for i in range(n // 2):
        out.append({"role": "user", "content": f"问题 {i}: " + "how do I keep a conversation's memory? " * 2})
        out.append({"role": "assistant", "content": f"回答 {i}: " + "save every completed turn durably. " * 8})
    return out


def turn(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"new question {i} " + "x" * 80},
            {"role": "assistant", "content": f"new answer {i} " + "y" * 300}]


def ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1000


# The previous release's load statement (one statement: the session's fields and the history
# built as one JSON text on the server), and its parse.
OLD_LOAD = """SELECT created_at, updated_at, llm_model, system_prompt, title, summary, message_count,
    (SELECT coalesce(string_agg('{{"role":"' || m.role || '","content":' ||
        CASE WHEN m.content_is_json THEN m.content ELSE to_json(m.content)::text END ||
        CASE WHEN m.interrupted THEN ',"interrupted":true}}' ELSE '}}' END, ',' ORDER BY m.idx), '')
     FROM {s}.messages m WHERE m.session_id = x.id)
FROM {s}.sessions x WHERE x.id = %s"""


def old_load(conn: object, schema: str, sid: str) -> list[dict[str, str]]:
    row = conn.execute(OLD_LOAD.format(s=f'"{schema}"'), (sid,)).fetchone()  # type: ignore[attr-defined]
    return json.loads(f"[{row[7]}]") if row[7] else []


BASELINE: dict[int, tuple[float, float]] = {}  # n -> (our load ms, previous release's load ms), interleaved


def bench_ours(url: str) -> dict[int, tuple[float, float]]:
    import psycopg

    out = {}
    store = PostgresStore(url, schema="bench_ours")
    baseline_conn = psycopg.connect(url, autocommit=True)
    for n in SIZES:
        sid = store.import_record(SessionRecord(session_id=f"bench_{n}", llm_model="m", messages=history(n)))
        w, rec = store.open(sid)
        saves = []
        at = len(rec.messages)
        for i in range(SAVES):
            t0 = time.perf_counter()
            assert w.append(at, turn(i))
            saves.append(time.perf_counter() - t0)
            at += 2
        w.close()
        # On one open connection, as the store's pool hands one out (its checkout costs microseconds).
        def previous() -> list[dict[str, str]]:
            return old_load(baseline_conn, "bench_ours", sid)  # noqa: B023

        loads = []
        olds = []
        for _ in range(5):  # warm both (psycopg prepares a statement on its 5th run)
            store.load(sid)
            previous()
        for _ in range(LOADS):
            t0 = time.perf_counter()
            rec = store.load(sid)
            loads.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            before = previous()
            olds.append(time.perf_counter() - t0)
        assert len(rec.messages) == n + 2 * SAVES and before == rec.messages
        out[n] = (ms(saves), ms(loads))
        BASELINE[n] = (ms(loads), ms(olds))
    baseline_conn.close()
    store.close()
    return out


def bench_langchain(url: str) -> dict[int, tuple[float, float]] | str:
    try:
        import psycopg
        from langchain_core.messages import AIMessage, HumanMessage
        from langchain_postgres import PostgresChatMessageHistory
    except ImportError as exc:
        return f"not installed ({exc.name})"
    conn = psycopg.connect(url, autocommit=True)
    PostgresChatMessageHistory.create_tables(conn, "lc_history")
    out = {}

    def as_lc(msgs: list[dict[str, str]]) -> list[object]:
        return [HumanMessage(m["content"]) if m["role"] == "user" else AIMessage(m["content"]) for m in msgs]

    for n in SIZES:
        h = PostgresChatMessageHistory("lc_history", str(uuid.uuid4()), sync_connection=conn)
        h.add_messages(as_lc(history(n)))
        saves = []
        for i in range(SAVES):
            msgs = as_lc(turn(i))
            t0 = time.perf_counter()
            h.add_messages(msgs)
            saves.append(time.perf_counter() - t0)
        loads = []
        for _ in range(LOADS):
            t0 = time.perf_counter()
            got = h.messages
            loads.append(time.perf_counter() - t0)
        assert len(got) == n + 2 * SAVES
        out[n] = (ms(saves), ms(loads))
    conn.close()
    return out


def bench_langgraph(url: str) -> dict[int, tuple[float, float]] | str:
    try:
        from langchain_core.messages import AIMessage, HumanMessage
        from langgraph.checkpoint.base import empty_checkpoint
        from langgraph.checkpoint.postgres import PostgresSaver
    except ImportError as exc:
        return f"not installed ({exc.name})"
    out = {}
    with PostgresSaver.from_conn_string(url) as saver:
        saver.setup()
        for n in SIZES:
            # What a graph with a `messages` channel (add_messages reducer) stores per step: the
            # channel's whole new value, as one blob version per checkpoint.
            msgs = [HumanMessage(m["content"]) if m["role"] == "user" else AIMessage(m["content"])
                    for m in history(n)]
            config = {"configurable": {"thread_id": str(uuid.uuid4()), "checkpoint_ns": ""}}
            version = 1
            cp = empty_checkpoint()
            cp["channel_values"] = {"messages": msgs}
            cp["channel_versions"] = {"messages": version}
            config = saver.put(config, cp, {"source": "loop", "step": 0}, {"messages": version})
            saves = []
            for i in range(SAVES):
                t = turn(i)
                msgs = [*msgs, HumanMessage(t[0]["content"]), AIMessage(t[1]["content"])]
                t0 = time.perf_counter()
                version += 1
                cp = empty_checkpoint()
                cp["channel_values"] = {"messages": msgs}
                cp["channel_versions"] = {"messages": version}
                config = saver.put(config, cp, {"source": "loop", "step": i + 1}, {"messages": version})
                saves.append(time.perf_counter() - t0)
            loads = []
            for _ in range(LOADS):
                t0 = time.perf_counter()
                got = saver.get_tuple({"configurable": {"thread_id": config["configurable"]["thread_id"],
                                                        "checkpoint_ns": ""}})
                loads.append(time.perf_counter() - t0)
            assert got is not None and len(got.checkpoint["channel_values"]["messages"]) == n + 2 * SAVES
            out[n] = (ms(saves), ms(loads))
    return out


def bench_concurrent(url: str, sessions: int = 100, seconds: float = 5.0) -> tuple[float, float]:
    store = PostgresStore(url, schema="bench_concurrent", pool_size=20)
    writers = [store.create("m") for _ in range(sessions)]
    counts = [0] * sessions
    stop = time.monotonic() + seconds
    latencies: list[float] = []

    def run(k: int) -> None:
        w = writers[k]
        i = 0
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            assert w.append(2 * i, turn(i))
            latencies.append(time.perf_counter() - t0)
            i += 1
        counts[k] = i

    threads = [threading.Thread(target=run, args=(k,)) for k in range(sessions)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    for w in writers:
        w.close()
    store.close()
    return sum(counts) / elapsed, ms(latencies)


def table(name: str, results: dict[int, tuple[float, float]] | str) -> str:
    if isinstance(results, str):
        return f"| {name} | {results} |" + " |" * (2 * len(SIZES) - 1)
    cells = [f"{results[n][0]:.2f}" for n in SIZES] + [f"{results[n][1]:.2f}" for n in SIZES]
    return f"| {name} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an existing PostgreSQL database (default: start a throwaway server)")
    parser.add_argument("--ours-only", action="store_true", help="skip LangChain, LangGraph and the 100 sessions")
    parser.add_argument("--smoke", action="store_true",
                        help="10 / 100 messages, 3 saves and loads, 5 sessions for 1 s: proves the script runs")
    args = parser.parse_args()
    global SIZES, SAVES, LOADS
    sessions, seconds = 100, 5.0
    if args.smoke:
        SIZES, SAVES, LOADS, sessions, seconds = [10, 100], 3, 3, 5, 1.0
    load_before = os.getloadavg()
    server = None
    url = args.url
    if url is None:
        from pg_server import PgServer, find_pg_bin

        bindir = find_pg_bin()
        if bindir is None:
            if args.smoke:  # nothing to measure here without them; the smoke run says so and passes
                print("PostgreSQL's binaries are missing (Debian package 'postgresql'): skipped")
                return
            sys.exit("PostgreSQL's binaries are missing (Debian package 'postgresql')")
        server = PgServer(bindir)
        server.start()
        url = server.url(server.create_database())
    try:
        ours = bench_ours(url)
        lc: dict[int, tuple[float, float]] | str = "skipped (--ours-only)"
        lg: dict[int, tuple[float, float]] | str = "skipped (--ours-only)"
        rate = p50 = float("nan")
        if not args.ours_only:
            lc = bench_langchain(url)
            lg = bench_langgraph(url)
            rate, p50 = bench_concurrent(url, sessions, seconds)
    finally:
        if server is not None:
            server.close()
    head = ("| store | " + " | ".join(f"save @{n}" for n in SIZES) + " | "
            + " | ".join(f"load {n}" for n in SIZES) + " |")
    print("Per-turn save and whole-history load, median ms (same server, same run):\n")
    print(head)
    print("|" + "---|" * (1 + 2 * len(SIZES)))
    print(table("conversation_session PostgresStore", ours))
    print(table("LangChain PostgresChatMessageHistory", lc))
    print(table("LangGraph PostgresSaver", lg))
    print("\nOur load against the previous release's (server-built JSON), interleaved, median ms:\n")
    print("| history | load (this release) | load (previous release) | ratio |")
    print("|---:|---:|---:|---:|")
    for n in SIZES:
        new, old = BASELINE[n]
        print(f"| {n:,} (+{2 * SAVES}) | {new:.2f} | {old:.2f} | {new / old:.2f} |")
    if not args.ours_only:
        print(f"\nSustained: {rate:,.0f} turns/s with {sessions} concurrent sessions on one store "
              f"(pool of 20; median save {p50:.2f} ms under that load)")
    load_after = os.getloadavg()
    print(f"\nLoad average (1/5/15 min): before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in load_after)}; {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
