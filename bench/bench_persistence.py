"""Persistence benchmarks: what saving a turn and loading a session cost, next to LangChain and llm.

Run by hand (the test suite runs only ``--smoke``).  Everything runs in ONE process, in ONE
run, with the contenders interleaved block by block, so that the ratios hold even on a noisy
shared machine.

Setup (once; a separate venv, so LangChain never becomes a dependency of the project)::

    # from the repository root
    python3.11 -m venv bench/.venv
    bench/.venv/bin/pip install langchain-community langchain-core "sqlalchemy[asyncio]" \\
        matplotlib "llm==0.36" httpx pyinstrument

The project itself is NOT installed in that venv: this script puts ``<repo>/src`` first on
``sys.path``, so it always measures the working tree (its only runtime need here is httpx).

Run (4-6 minutes on 2 shared cores; ``--quick`` for a ~1 minute run)::

    bench/.venv/bin/python bench/bench_persistence.py
    bench/.venv/bin/python bench/bench_persistence.py --quick --no-plot
    bench/.venv/bin/python bench/bench_persistence.py --profile     # where an append's time goes
    .venv/bin/python bench/bench_persistence.py --smoke             # ~10 s, no peers needed (CI runs it)

A contender whose library is not installed (LangChain, llm) is left out, and the output says
so: the project's own columns are measured with nothing but the project.

Output: Markdown tables on stdout, ``bench/results/persistence-<time>.json`` (gitignored) and
``bench/plots/persistence.png`` (save cost per turn) + ``bench/plots/persistence_load.png``.

What is measured (all times are wall clock, ``time.perf_counter_ns``):

Save cost per turn (the contender's own work once the reply is known; the model is instant):

* ``conversation_session``: ``SessionWriter.append()`` (the journal append) timed *inside* a
  real ``ConversationSession.chat()`` call with ``FakeBackend``, on a session resumed with
  ``load_history()`` from a file holding N messages.  The session is given the file store
  through its public ``store=`` argument, wrapped so that the writer it opens times its own
  ``append`` (``TimedStore``): no private attribute is touched.  "idle": between turns the
  background snapshot is allowed to finish (``writer.flush()``; a person types between turns, a
  local model takes far longer than a snapshot).  "back-to-back": no pause, so the snapshot
  thread competes for the GIL and the disk (worst case, scripted use).  The durability level is
  set on each session (docs/durability.md): ``process`` (the line is written before ``append``
  returns: it survives ``kill -9``) and ``power`` (also flushed to the disk, through group
  commit: like for like with SQLite, which syncs every commit; the library's default).
  "direct loop": ``append()`` on a writer from ``HistoryStore.open()`` at ``process``, called in
  a tight loop (the algorithmic cost).
  We time ``append()`` rather than subtracting an ``enable_cache=False`` loop: that loop sends
  no history, so the prompt building and the fake model's work would differ by O(N) and the
  difference would not be the save cost.
* LangChain ``FileChatMessageHistory.add_messages([human, ai])`` (langchain_community): what
  ``RunnableWithMessageHistory`` calls once per turn; it re-reads and re-writes the whole file
  for each message.
* LangChain ``SQLChatMessageHistory.add_messages([human, ai])`` on a SQLite file
  (SQLAlchemy; one transaction per call).
* simonw/llm: ``Response.log_to_db(db)`` on a ``sqlite_utils.Database`` (what ``llm chat``
  runs after each reply), for a ``Conversation`` resumed with ``llm.cli.load_conversation``,
  using a minimal echo ``llm.Model`` registered as a plugin.  ``response.text()`` (the model)
  is outside the timing.

Each block starts from a fresh copy of an N-message session and runs at most
``max(1, min(50, N // 20))`` turns, so the history stays within 10 % of N.

Background snapshot (information): ``SessionWriter.write_snapshot()`` (encode + temp file +
fsync + rename + fsync of the folder) on the live writer, and the snapshot's size.

The N-message sessions are written with ``conversation_session.testing.seed_session`` (the
store's ``import_record``).  Load cost: ``HistoryStore.load(id)`` and
``ConversationSession.load_history(id)`` on a clean session (snapshot only) and on a "crashed"
one (snapshot of N-4 messages + 2 turns in the journal: a child process appends the two turns
with the real writer and is killed with ``kill -9`` before its background snapshot lands);
LangChain ``FileChatMessageHistory(path).messages``
and ``SQLChatMessageHistory(id, connection=url).messages`` (engine creation included, as at a
program's start); llm ``load_conversation(id, database=path)``.  The OS page cache is warm for
all of them.

Messages: ~200-character user messages and ~600-character assistant replies, one turn in
three in Chinese, generated deterministically.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import importlib.metadata
import io
import json
import os
import platform
import pstats
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(REPO / "src"))
warnings.filterwarnings("ignore", message=".*langchain-community. is being sunset", category=DeprecationWarning)

DEFAULT_SIZES = (10, 100, 1000, 5000)
TARGET_SAVE_MS = 0.2
TARGET_LOAD_MS = 25.0

# --------------------------------------------------------------------------------------------
# realistic messages

_EN_WORDS = (
    "the model context window cache token prompt reply session history memory file journal "
    "snapshot because when while after before could would should please explain how why what "
    "python function error timeout restart server local machine small quick careful example "
    "question answer summary detail step first second then finally also however therefore"
).split()
_ZH_SENTENCES = (
    "我想了解一下这个模型的上下文窗口有多大。", "请帮我解释为什么会出现超时错误。",
    "重启之后对话历史还在吗？", "这个问题的关键在于缓存是否仍然有效。",
    "首先我们需要检查会话文件是否完整。", "然后再看看日志里有没有警告信息。",
    "如果磁盘满了，回复仍然会返回，但不会保存。", "最后请总结一下刚才讨论的内容。",
    "本地运行的小模型速度很快，但能力有限。", "每一轮对话结束后都会写入日志文件。",
)


def _text(rng: random.Random, chars: int, chinese: bool) -> str:
    out: list[str] = []
    n = 0
    while n < chars:
        piece = rng.choice(_ZH_SENTENCES) if chinese else rng.choice(_EN_WORDS) + " "
        out.append(piece)
        n += len(piece)
    return "".join(out)[:chars].strip() or "?"


def make_turns(count: int, seed: int = 1) -> list[tuple[str, str]]:
    """``count`` (user, assistant) pairs: ~200 and ~600 characters, one in three Chinese."""
    rng = random.Random(seed)
    turns = []
    for i in range(count):
        zh = i % 3 == 2
        turns.append((_text(rng, rng.randint(170, 230), zh), _text(rng, rng.randint(500, 700), zh)))
    return turns


def make_messages(n: int, seed: int = 1) -> list[dict[str, str]]:
    msgs: list[dict[str, str]] = []
    for user, reply in make_turns((n + 1) // 2, seed):
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return msgs[:n]


# --------------------------------------------------------------------------------------------
# statistics


def summarize(samples_ns: list[int]) -> dict[str, Any]:
    if not samples_ns:
        return {"n": 0}
    s = sorted(samples_ns)
    p99 = s[min(len(s) - 1, max(0, -(-99 * len(s) // 100) - 1))]  # nearest rank
    return {
        "n": len(s),
        "median_ms": statistics.median(s) / 1e6,
        "p99_ms": p99 / 1e6,
        "mean_ms": statistics.fmean(s) / 1e6,
        "min_ms": s[0] / 1e6,
        "max_ms": s[-1] / 1e6,
    }


def fmt_ms(x: float | None) -> str:
    if x is None:
        return "–"
    if x < 0.01:
        return f"{x * 1000:.1f} µs"
    if x < 0.1:
        return f"{x * 1000:.0f} µs"
    if x < 10:
        return f"{x:.2f} ms"
    if x < 1000:
        return f"{x:.1f} ms"
    return f"{x / 1000:.2f} s"


def cell(st: dict[str, Any] | None) -> str:
    if not st or not st.get("n"):
        return "–"
    return f"{fmt_ms(st['median_ms'])} / {fmt_ms(st['p99_ms'])}"


# --------------------------------------------------------------------------------------------
# contenders: each runs blocks of turns from a fresh N-message state


@dataclass
class Contender:
    key: str
    label: str
    setup: Callable[[int, Path], Any]            # (n, workdir) -> state
    turn: Callable[[Any, str, str], int]         # (state, user, reply) -> ns spent saving
    teardown: Callable[[Any], None]
    samples: dict[int, list[int]] = field(default_factory=dict)
    first: dict[int, list[int]] = field(default_factory=dict)
    extra: dict[int, dict[str, list[int]]] = field(default_factory=dict)
    budget_factor: float = 1.0  # the project's own variants get more time: they are the subject


def block_turns(n: int) -> int:
    return max(1, min(50, n // 20))


def template_sizes(sizes: list[int]) -> list[int]:
    """Each size, and two messages less: a block resumes at N-2 and runs one untimed first turn."""
    return sorted(set(sizes) | {n - 2 for n in sizes if n >= 4})


# -- conversation_session ----------------------------------------------------------------------

# A writer in a second process that appends turns and dies by kill -9 right after: what a
# crash leaves (the turns in the journal, not yet in the snapshot).  Public interfaces only.
CRASH_CHILD = r"""
import json, os, signal, sys
from conversation_session import HistoryStore
store = HistoryStore(sys.argv[1])
writer, record = store.open(sys.argv[2])
at = len(record.messages)
for pair in json.loads(sys.stdin.read()):
    if not writer.append(at, pair):
        sys.exit(f"append failed: {writer.last_error}")
    at += len(pair)
os.kill(os.getpid(), signal.SIGKILL)  # no close(), no final snapshot
"""


def snapshot_messages(path: Path) -> int:
    """How many messages a session's ``.json`` holds (the seed's file format)."""
    return len(json.loads(path.read_bytes())["conversation_history"])


def seed_crashed(store: Any, sid: str, msgs: list[dict[str, str]], kept: int, attempts: int = 10) -> None:
    """``sid`` with ``msgs[:kept]`` in its snapshot and the rest (whole turns) in its journal."""
    from conversation_session.testing import seed_session

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"),
                                                                     os.environ.get("PYTHONPATH")]))}
    turns = [msgs[i:i + 2] for i in range(kept, len(msgs), 2)]
    for _ in range(attempts):
        seed_session(store, msgs[:kept], session_id=sid, llm_model="fake-model")
        proc = subprocess.run([sys.executable, "-c", CRASH_CHILD, str(store.directory), sid], input=json.dumps(turns),
                              capture_output=True, text=True, timeout=120, env=env)
        if proc.returncode != -signal.SIGKILL:
            raise SystemExit(f"the crashing writer failed ({proc.returncode}): {proc.stderr.strip()}")
        # Its background snapshot may, rarely, have landed before the kill: then try again.
        if snapshot_messages(store.snapshot_path(sid)) == kept and len(store.load(sid).messages) == len(msgs):
            return
        store.delete(sid)
    raise SystemExit(f"could not leave {sid} with turns in its journal after {attempts} attempts")


class CS:
    """Templates of sessions of N messages, written through the project's public interfaces."""

    def __init__(self, root: Path, sizes: list[int]):
        from conversation_session import HistoryStore
        from conversation_session.testing import seed_session

        self.root = root
        self.tpl = root / "cs_templates"
        store = HistoryStore(self.tpl)
        for n in template_sizes(sizes):
            msgs = make_messages(n)
            seed_session(store, msgs, session_id=self.sid(n), llm_model="fake-model")
            if n in sizes:
                if n >= 8:
                    seed_crashed(store, self.sid(n, True), msgs, n - 4)
                else:  # too short to leave two turns out of the snapshot
                    seed_session(store, msgs, session_id=self.sid(n, True), llm_model="fake-model")

    @staticmethod
    def sid(n: int, crashed: bool = False) -> str:
        return f"bench_{n}_crashed" if crashed else f"bench_{n}"

    def restore(self, n: int, dest: Path, crashed: bool = False) -> str:
        sid = self.sid(n, crashed)
        dest.mkdir(mode=0o700, parents=True, exist_ok=True)
        for ext in ("json", "journal"):
            src, dst = self.tpl / f"{sid}.{ext}", dest / f"{sid}.{ext}"
            with contextlib.suppress(FileNotFoundError):
                dst.unlink()
            if src.exists():
                shutil.copyfile(src, dst)
        return sid


def settle(writer: Any) -> None:
    """Wait until every background snapshot asked for has been written (untimed 'think time')."""
    if not writer.flush(60):
        raise SystemExit(f"the background snapshot of {writer.session_id} did not finish in 60 s")


class TimedWriter:
    """A store writer whose ``append`` (what ``chat()`` saves a turn with) times itself."""

    def __init__(self, inner: Any, times: list[int]):
        self._inner = inner
        self._times = times

    def append(self, start: int, messages: list[Any], meta: dict[str, Any] | None = None) -> bool:
        t0 = time.perf_counter_ns()
        ok = self._inner.append(start, messages, meta)
        self._times.append(time.perf_counter_ns() - t0)
        return bool(ok)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # The session sets the writer's durability level: that belongs to the real writer.
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._inner, name, value)


class TimedStore:
    """The file store, handed to a session through its public ``store=`` argument; the writers
    it opens time their appends into ``times``."""

    def __init__(self, directory: Path):
        from conversation_session import HistoryStore

        self._inner = HistoryStore(directory)
        self.times: list[int] = []
        self.writer: TimedWriter | None = None

    def _wrap(self, writer: Any) -> TimedWriter:
        self.writer = TimedWriter(writer, self.times)
        return self.writer

    def create(self, llm_model: str, *, session_id: str | None = None) -> TimedWriter:
        return self._wrap(self._inner.create(llm_model, session_id=session_id))

    def open(self, session_id: str) -> tuple[TimedWriter, Any]:
        writer, record = self._inner.open(session_id)
        return self._wrap(writer), record

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def cs_contender(cs: CS, key: str, label: str, *, idle: bool, level: str) -> Contender:
    from conversation_session import ConversationSession, FakeBackend

    def setup(n: int, work: Path) -> Any:
        d = work / key
        sid = cs.restore(n, d)
        fake = FakeBackend()
        store = TimedStore(d)
        session = ConversationSession(backend=fake, store=store, timeout=None,  # type: ignore[arg-type]
                                      durability=level)
        assert session.load_history(sid) and len(session.history) == n
        writer = store.writer
        assert writer is not None and writer.session_id == sid and writer.durability == level
        if idle:
            settle(writer)
        return {"session": session, "fake": fake, "writer": writer, "times": store.times, "chat": []}

    def turn(st: Any, user: str, reply: str) -> int:
        st["fake"].enqueue(reply)
        t0 = time.perf_counter_ns()
        result = st["session"].chat(user)
        st["chat"].append(time.perf_counter_ns() - t0)
        assert result.saved and st["times"], "chat() did not save through the timed writer"
        if idle:
            settle(st["writer"])
        return st["times"][-1]

    def teardown(st: Any) -> None:
        st["session"].close()

    return Contender(key, label, setup, turn, teardown, budget_factor=2.0)


def cs_direct_contender(cs: CS) -> Contender:
    """``append()`` of a turn called directly on the writer: no chat(), no pause, warm caches."""
    from conversation_session import HistoryStore

    def setup(n: int, work: Path) -> Any:
        d = work / "cs_direct"
        sid = cs.restore(n, d)
        writer, record = HistoryStore(d, durability="process").open(sid)
        assert len(record.messages) == n
        return {"writer": writer, "at": n}

    def turn(st: Any, user: str, reply: str) -> int:
        pair = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        t0 = time.perf_counter_ns()
        assert st["writer"].append(st["at"], pair)
        dt = time.perf_counter_ns() - t0
        st["at"] += 2
        return dt

    return Contender("cs_direct", "conversation_session append() direct loop, process", setup, turn,
                     lambda st: st["writer"].close())


# -- LangChain -------------------------------------------------------------------------------


def lc_messages(msgs: list[dict[str, str]]) -> list[Any]:
    from langchain_core.messages import AIMessage, HumanMessage

    return [HumanMessage(m["content"]) if m["role"] == "user" else AIMessage(m["content"]) for m in msgs]


def lc_file_contender(root: Path, sizes: list[int]) -> Contender:
    from langchain_community.chat_message_histories import FileChatMessageHistory
    from langchain_core.messages import AIMessage, HumanMessage, messages_to_dict

    tpl = root / "lc_file_templates"
    tpl.mkdir()
    for n in template_sizes(sizes):  # exactly what FileChatMessageHistory writes (ensure_ascii=True)
        (tpl / f"{n}.json").write_text(json.dumps(messages_to_dict(lc_messages(make_messages(n)))))

    def setup(n: int, work: Path) -> Any:
        path = work / "lc_file" / "history.json"
        path.parent.mkdir(exist_ok=True)
        shutil.copyfile(tpl / f"{n}.json", path)
        return FileChatMessageHistory(str(path))

    def turn(hist: Any, user: str, reply: str) -> int:
        pair = [HumanMessage(user), AIMessage(reply)]
        t0 = time.perf_counter_ns()
        hist.add_messages(pair)
        return time.perf_counter_ns() - t0

    c = Contender("lc_file", "LangChain FileChatMessageHistory", setup, turn, lambda h: None)
    c.templates = tpl  # type: ignore[attr-defined]
    return c


def lc_sql_contender(root: Path, sizes: list[int]) -> Contender:
    from langchain_community.chat_message_histories import SQLChatMessageHistory
    from langchain_core.messages import AIMessage, HumanMessage

    tpl = root / "lc_sql_templates"
    tpl.mkdir()
    for n in template_sizes(sizes):
        h = SQLChatMessageHistory("bench", connection=f"sqlite:///{tpl / f'{n}.db'}")
        h.add_messages(lc_messages(make_messages(n)))
        h.engine.dispose()

    def setup(n: int, work: Path) -> Any:
        path = work / "lc_sql" / "history.db"
        path.parent.mkdir(exist_ok=True)
        shutil.copyfile(tpl / f"{n}.db", path)
        return SQLChatMessageHistory("bench", connection=f"sqlite:///{path}")

    def turn(hist: Any, user: str, reply: str) -> int:
        pair = [HumanMessage(user), AIMessage(reply)]
        t0 = time.perf_counter_ns()
        hist.add_messages(pair)
        return time.perf_counter_ns() - t0

    c = Contender("lc_sql", "LangChain SQLChatMessageHistory (SQLite)", setup, turn, lambda h: h.engine.dispose())
    c.templates = tpl  # type: ignore[attr-defined]
    return c


# -- simonw/llm ------------------------------------------------------------------------------


def llm_contender(root: Path, sizes: list[int]) -> Contender:
    os.environ["LLM_USER_PATH"] = str(root / "llm_user")  # keep ~/.config untouched
    import llm
    import sqlite_utils
    from llm.cli import load_conversation
    from llm.parts import Message, TextPart

    class Echo(llm.Model):
        model_id = "bench-echo"
        can_stream = True
        next_reply = "ok"

        def execute(self, prompt: Any, stream: Any, response: Any, conversation: Any) -> Any:
            yield self.next_reply

    echo = Echo()

    class Plugin:
        @llm.hookimpl
        def register_models(self, register: Any) -> None:
            register(echo)

    llm.plugins.pm.register(Plugin(), name="bench-echo")
    model = llm.get_model("bench-echo")
    tpl = root / "llm_templates"
    tpl.mkdir()
    ids: dict[int, str] = {}
    for n in template_sizes(sizes):
        msgs = make_messages(n)
        conv = model.conversation()
        conv.loaded_messages = [Message(role=m["role"], parts=[TextPart(text=m["content"])]) for m in msgs[:-2]]
        echo.next_reply = msgs[-1]["content"]
        response = conv.prompt(msgs[-2]["content"])
        response.text()
        db = sqlite_utils.Database(tpl / f"{n}.db")
        response.log_to_db(db)  # stores the whole chain: N messages, one thread, one turn
        db.close()
        ids[n] = conv.id

    def setup(n: int, work: Path) -> Any:
        path = work / "llm" / "logs.db"
        path.parent.mkdir(exist_ok=True)
        shutil.copyfile(tpl / f"{n}.db", path)
        conv = load_conversation(ids[n], database=str(path))
        assert conv is not None and len(conv.loaded_messages or []) == n
        return {"conv": conv, "db": sqlite_utils.Database(path)}

    def turn(st: Any, user: str, reply: str) -> int:
        echo.next_reply = reply
        response = st["conv"].prompt(user)
        response.text()
        t0 = time.perf_counter_ns()
        response.log_to_db(st["db"])
        return time.perf_counter_ns() - t0

    c = Contender("llm", "llm (Response.log_to_db)", setup, turn, lambda st: st["db"].close())
    c.templates = tpl  # type: ignore[attr-defined]
    c.ids = ids  # type: ignore[attr-defined]
    c.load_conversation = load_conversation  # type: ignore[attr-defined]
    return c


# --------------------------------------------------------------------------------------------
# the runs


def run_save(contenders: list[Contender], sizes: list[int], work: Path, *, budget_s: float,
             max_turns: int, min_turns: int) -> None:
    """Interleave blocks of turns across contenders, size by size."""
    turns = make_turns(400, seed=7)
    for n in sizes:
        spent = {c.key: 0.0 for c in contenders}
        for c in contenders:
            c.samples[n], c.first[n] = [], []
            c.extra[n] = {"chat": []}
        k = 0
        active = list(contenders)
        while active:
            for c in list(active):
                t0 = time.perf_counter()
                # Resume at N-2 messages and run one turn (timed apart: it may start threads or
                # connections), so the block's timed turns start at exactly N messages.
                st = c.setup(n - 2 if n >= 4 else n, work)
                # Flush what setup (and the previous contender) left dirty, so that no contender's
                # fsync pays for another's file copies (ext4 commits them in the same journal).
                os.sync()
                try:
                    user, reply = turns[k % len(turns)]
                    k += 1
                    c.first[n].append(c.turn(st, user, reply))
                    if isinstance(st, dict) and "chat" in st:
                        st["chat"].clear()
                    for _ in range(block_turns(n)):
                        user, reply = turns[k % len(turns)]
                        k += 1
                        c.samples[n].append(c.turn(st, user, reply))
                        over = spent[c.key] + time.perf_counter() - t0 >= budget_s * c.budget_factor
                        if over and len(c.samples[n]) >= min_turns:
                            break  # the slow contenders: stop mid-block once they have enough
                finally:
                    if isinstance(st, dict) and "chat" in st:
                        c.extra[n]["chat"] += st["chat"]
                    c.teardown(st)
                spent[c.key] += time.perf_counter() - t0
                got = len(c.samples[n])
                if got >= max_turns or (spent[c.key] >= budget_s * c.budget_factor and got >= min_turns):
                    active.remove(c)
        msg = ", ".join(f"{c.key} {len(c.samples[n])} turns/{spent[c.key]:.1f}s" for c in contenders)
        print(f"  save, {n} messages: {msg}", file=sys.stderr, flush=True)


def repeat(fn: Callable[[], Any], *, budget_s: float, max_reps: int, min_reps: int,
           before: Callable[[], Any] | None = None, after: Callable[[Any], None] | None = None) -> list[int]:
    out: list[int] = []
    t_end = time.perf_counter() + budget_s
    while len(out) < max_reps and (len(out) < min_reps or time.perf_counter() < t_end):
        arg = before() if before else None
        t0 = time.perf_counter_ns()
        res = fn() if arg is None else fn(arg)  # type: ignore[call-arg]
        out.append(time.perf_counter_ns() - t0)
        if after:
            after(res)
    return out


def run_snapshot(cs: CS, sizes: list[int], work: Path, *, budget_s: float,
                 min_reps: int = 10) -> dict[int, dict[str, Any]]:
    """``write_snapshot()`` of the live writer of a resumed session (what the background job runs)."""
    from conversation_session import HistoryStore

    out = {}
    for n in sizes:
        d = work / "snap"
        sid = cs.restore(n, d)
        store = HistoryStore(d)
        writer, _record = store.open(sid)
        try:
            full = repeat(writer.write_snapshot, budget_s=budget_s, max_reps=300, min_reps=min_reps)
        finally:
            writer.close()
        out[n] = {"bytes": store.snapshot_path(sid).stat().st_size, "write_snapshot": summarize(full)}
        print(f"  snapshot, {n} messages: {len(full)} reps", file=sys.stderr, flush=True)
    return out


def run_load(cs: CS, others: dict[str, Contender], sizes: list[int], work: Path, *,
             budget_s: float, max_reps: int = 300, min_reps: int = 8) -> dict[int, dict[str, Any]]:
    """Each loader once per round, round after round, so machine noise hits them all alike."""
    from conversation_session import ConversationSession, FakeBackend, HistoryStore

    out: dict[int, dict[str, Any]] = {}
    store = HistoryStore(cs.tpl)
    for n in sizes:
        # name -> (prepare (untimed) -> arg, timed(arg) -> result, cleanup(result) (untimed))
        loaders: dict[str, tuple[Callable[[], Any], Callable[[Any], Any], Callable[[Any], None]]] = {}
        for crashed in (False, True):
            sid = cs.sid(n, crashed)
            assert len(store.load(sid).messages) == n
            tag = "crashed" if crashed else "clean"
            d = work / f"load_{tag}"

            def fresh(n: int = n, d: Path = d, crashed: bool = crashed) -> Any:
                sid = cs.restore(n, d, crashed)
                return ConversationSession(backend=FakeBackend(), sessions_dir=d, timeout=None), sid

            def load(arg: Any, n: int = n) -> Any:
                s, sid = arg
                assert s.load_history(sid) and len(s.history) == n
                return s

            loaders[f"store_load_{tag}"] = (lambda sid=sid: sid, store.load, lambda r: None)
            loaders[f"load_history_{tag}"] = (fresh, load, lambda s: s.close())

        if "lc_file" in others:
            from langchain_community.chat_message_histories import FileChatMessageHistory

            path = str(others["lc_file"].templates / f"{n}.json")  # type: ignore[attr-defined]
            assert len(FileChatMessageHistory(path).messages) == n
            loaders["lc_file"] = (lambda p=path: p, lambda p: FileChatMessageHistory(p).messages, lambda r: None)
        if "lc_sql" in others:
            from langchain_community.chat_message_histories import SQLChatMessageHistory

            url = f"sqlite:///{others['lc_sql'].templates / f'{n}.db'}"  # type: ignore[attr-defined]

            def lc_sql_load(url: str, n: int = n) -> Any:
                h = SQLChatMessageHistory("bench", connection=url)
                assert len(h.messages) == n
                return h

            loaders["lc_sql"] = (lambda url=url: url, lc_sql_load, lambda h: h.engine.dispose())
        if "llm" in others:
            c = others["llm"]
            path = str(c.templates / f"{n}.db")  # type: ignore[attr-defined]
            cid = c.ids[n]  # type: ignore[attr-defined]

            def llm_load(cid: str, n: int = n, c: Contender = c, path: str = path) -> Any:
                conv = c.load_conversation(cid, database=path)  # type: ignore[attr-defined]
                assert len(conv.loaded_messages) == n
                return conv

            loaders["llm"] = (lambda cid=cid: cid, llm_load, lambda r: None)

        samples: dict[str, list[int]] = {k: [] for k in loaders}
        spent = dict.fromkeys(loaders, 0.0)
        active = list(loaders)
        while active:
            for k in list(active):
                prepare, timed, cleanup = loaders[k]
                arg = prepare()
                t0 = time.perf_counter_ns()
                res = timed(arg)
                dt = time.perf_counter_ns() - t0
                cleanup(res)
                samples[k].append(dt)
                spent[k] += dt / 1e9
                got = len(samples[k])
                if got >= max_reps or (spent[k] >= budget_s and got >= min_reps):
                    active.remove(k)
        out[n] = {k: summarize(v) for k, v in samples.items()}
        print(f"  load, {n} messages: " + ", ".join(f"{k} {len(v)}" for k, v in samples.items()),
              file=sys.stderr, flush=True)
    return out


def run_profile(cs: CS, work: Path, n: int, turns: int, budget_s: float = 1.0) -> str:
    """cProfile of ``turns`` appends on an N-message session (each after the previous
    snapshot), then the steps of an append and of a load timed alone."""
    from conversation_session import HistoryStore, SessionRecord

    d = work / "profile"
    sid = cs.restore(n, d)
    prof = cProfile.Profile()
    pairs = make_turns(turns, seed=11)
    writer, record = HistoryStore(d, durability="process").open(sid)
    at = len(record.messages)
    try:
        for user, reply in pairs:
            pair = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
            prof.enable()
            writer.append(at, pair)
            prof.disable()
            at += 2
            settle(writer)
    finally:
        writer.close()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(25)

    # The steps of an append without the profiler's overhead, one at a time (median of many).
    def stamp() -> str:
        return datetime.now(timezone.utc).astimezone().isoformat(timespec="microseconds")

    pair = [{"role": "user", "content": pairs[0][0]}, {"role": "assistant", "content": pairs[0][1]}]
    fd = os.open(d / "scratch.journal", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    line = json.dumps({"start": n, "messages": pair, "updated_at": stamp()}, ensure_ascii=False).encode() + b"\n"

    def write() -> None:
        os.write(fd, line)
        if os.fstat(fd).st_size > 1 << 20:
            os.ftruncate(fd, 0)

    steps = {
        "datetime.now(utc).astimezone().isoformat() (the time stamp)": stamp,
        "time.strftime('%Y-%m-%dT%H:%M:%S') (alternative)": lambda: time.strftime("%Y-%m-%dT%H:%M:%S"),
        "json.dumps(journal line, ensure_ascii=False).encode()": lambda: json.dumps(
            {"start": n, "messages": pair, "updated_at": "2025-01-01T00:00:00"}, ensure_ascii=False).encode(),
        f"os.write(journal, {len(line)} bytes)": write,
        "os.fsync(journal) (not done by append)": lambda: os.fsync(fd),
    }
    buf.write("\nsteps of append(), timed alone (median / p99 over many calls):\n")
    for name, fn in steps.items():
        reps = 200 if "fsync" in name else 5000
        buf.write(f"  {name}: {cell(summarize(repeat(fn, budget_s=budget_s, max_reps=reps, min_reps=20)))}\n")
    os.close(fd)

    # Loading: HistoryStore.load of the N-message session, profiled, then its steps timed alone.
    store = HistoryStore(cs.tpl)
    sid = cs.sid(n)
    prof = cProfile.Profile()
    for _ in range(20):
        prof.enable()
        store.load(sid)
        prof.disable()
    buf.write(f"\nHistoryStore.load({sid!r}) x20, cProfile:\n")
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
    path = store.snapshot_path(sid)
    raw = path.read_bytes()
    text = raw.decode()
    data = json.loads(text)
    load_steps = {
        "HistoryStore.load (all)": lambda: store.load(sid),
        f"Path.read_bytes ({len(raw) / 1024:,.0f} KiB)": path.read_bytes,
        "bytes.decode('utf-8')": raw.decode,
        "json.loads(str)": lambda: json.loads(text),
        "SessionRecord.from_dict (validation)": lambda: SessionRecord.from_dict(data),
    }
    with contextlib.suppress(ImportError):
        import orjson

        load_steps["orjson.loads(bytes) (alternative, not a dependency)"] = lambda: orjson.loads(raw)
    buf.write("steps of load, timed alone (median / p99):\n")
    for name, fn in load_steps.items():
        buf.write(f"  {name}: {cell(summarize(repeat(fn, budget_s=2 * budget_s, max_reps=200, min_reps=5)))}\n")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# reporting


def machine_info(work: Path) -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    fs = "?"
    with contextlib.suppress(OSError):
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            _dev, mnt, typ, *_ = line.split()
            if str(work).startswith(mnt) and len(mnt) > len(best):
                best, fs = mnt, typ
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg(),
        "workdir": str(work),
        "workdir_fs": fs,
        "sqlite": sqlite3.sqlite_version,
        "versions": {d: version(d) for d in ("langchain-core", "langchain-community", "SQLAlchemy", "llm",
                                              "sqlite-utils", "matplotlib")},
    }


def print_tables(res: dict[str, Any], labels: dict[str, str]) -> None:
    sizes = res["sizes"]
    save = res["save"]
    keys = [k for k in labels if k in save]
    print("\n### Save cost per turn (median / p99)\n")
    print("| history (messages) | " + " | ".join(labels[k] for k in keys) + " |")
    print("|---:|" + "---:|" * len(keys))
    for n in sizes:
        print(f"| {n:,} | " + " | ".join(cell(save[k].get(str(n))) for k in keys) + " |")
    print("\nTurns measured per cell: " + "; ".join(
        f"{labels[k]}: " + "/".join(str(save[k][str(n)]["n"]) for n in sizes) for k in keys))

    first = res["first_turn"]
    print("\n### First turn after resuming a session (median / p99; not in the table above)\n")
    print("| history (messages) | " + " | ".join(labels[k] for k in keys) + " |")
    print("|---:|" + "---:|" * len(keys))
    for n in sizes:
        print(f"| {n - 2 if n >= 4 else n:,} | " + " | ".join(cell(first[k].get(str(n))) for k in keys) + " |")

    base = "cs_idle"
    if base in save:
        print("\n### Save cost ratio to conversation_session (idle), medians\n")
        others = [k for k in keys if k != base]
        print("| history (messages) | " + " | ".join(labels[k] for k in others) + " |")
        print("|---:|" + "---:|" * len(others))
        for n in sizes:
            b = save[base][str(n)]["median_ms"]
            print(f"| {n:,} | " + " | ".join(f"{save[k][str(n)]['median_ms'] / b:,.1f}×" for k in others) + " |")

        print("\n### conversation_session: the whole chat() turn with FakeBackend, and the background "
              "snapshot (median / p99)\n")
        print("| history (messages) | chat() total (idle) | append share | snapshot size | "
              "write_snapshot (encode+fsync+rename) |")
        print("|---:|---:|---:|---:|---:|")
        for n in sizes:
            ch = res["chat_total"][str(n)]
            sn = res["snapshot"][str(n)]
            share = save[base][str(n)]["median_ms"] / ch["median_ms"] * 100
            print(f"| {n:,} | {cell(ch)} | {share:.0f} % | {sn['bytes'] / 1024:,.0f} KiB | "
                  f"{cell(sn['write_snapshot'])} |")

    load = res["load"]
    cols = [("store_load_clean", "HistoryStore.load (clean)"),
            ("store_load_crashed", "HistoryStore.load (+2 turns in journal)"),
            ("load_history_clean", "load_history() (clean)"),
            ("load_history_crashed", "load_history() (+2 turns in journal)"),
            ("lc_file", "LangChain File .messages"), ("lc_sql", "LangChain SQL .messages"),
            ("llm", "llm load_conversation")]
    cols = [(k, v) for k, v in cols if k in load[str(sizes[0])]]
    print("\n### Load cost (median / p99)\n")
    print("| history (messages) | " + " | ".join(v for _, v in cols) + " |")
    print("|---:|" + "---:|" * len(cols))
    for n in sizes:
        print(f"| {n:,} | " + " | ".join(cell(load[str(n)][k]) for k, _ in cols) + " |")


def plot(res: dict[str, Any], labels: dict[str, str], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = res["sizes"]
    styles = {"cs_idle": ("C0", "o", "-"), "cs_b2b": ("C0", "s", "--"), "cs_power": ("C0", "^", ":"),
              "cs_direct": ("C4", "v", "-."),
              "lc_file": ("C1", "o", "-"), "lc_sql": ("C2", "o", "-"), "llm": ("C3", "o", "-")}
    paths = []

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for k, (color, marker, ls) in styles.items():
        if k not in res["save"]:
            continue
        med = [res["save"][k][str(n)]["median_ms"] for n in sizes]
        p99 = [res["save"][k][str(n)]["p99_ms"] for n in sizes]
        ax.plot(sizes, med, color=color, marker=marker, ls=ls, label=f"{labels[k]} (median)")
        ax.plot(sizes, p99, color=color, marker=marker, ls="none", alpha=0.35, markersize=4)
    ax.axhline(TARGET_SAVE_MS, color="grey", ls="--", lw=1)
    ax.text(sizes[0], TARGET_SAVE_MS * 1.1, f"target {TARGET_SAVE_MS} ms", color="grey", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("history length (messages)")
    ax.set_ylabel("save cost per turn (ms, log)")
    ax.set_title(f"Save cost per turn (faint markers: p99) · {res['machine']['nproc']} cores, "
                 f"Python {res['machine']['python']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out_dir / "persistence.png"
    fig.savefig(p, dpi=120)
    paths.append(p)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5.5))
    load_styles = {"store_load_clean": ("C0", "o", "-", "HistoryStore.load"),
                   "load_history_clean": ("C0", "s", "--", "ConversationSession.load_history"),
                   "lc_file": ("C1", "o", "-", labels.get("lc_file", "")),
                   "lc_sql": ("C2", "o", "-", labels.get("lc_sql", "")),
                   "llm": ("C3", "o", "-", "llm load_conversation")}
    for k, (color, marker, ls, label) in load_styles.items():
        if k not in res["load"][str(sizes[0])]:
            continue
        ax.plot(sizes, [res["load"][str(n)][k]["median_ms"] for n in sizes], color=color, marker=marker, ls=ls,
                label=label)
    ax.axhline(TARGET_LOAD_MS, color="grey", ls="--", lw=1)
    ax.text(sizes[0], TARGET_LOAD_MS * 1.1, f"target {TARGET_LOAD_MS:g} ms", color="grey", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("history length (messages)")
    ax.set_ylabel("load time, median (ms, log)")
    ax.set_title("Load cost")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out_dir / "persistence_load.png"
    fig.savefig(p, dpi=120)
    paths.append(p)
    plt.close(fig)
    return paths


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=list(DEFAULT_SIZES),
                    help="history lengths in messages (default 10,100,1000,5000)")
    ap.add_argument("--quick", action="store_true", help="short budgets: a run of about a minute")
    ap.add_argument("--smoke", action="store_true",
                    help="sizes 10,100 and tiny budgets (~10 s): proves the script runs; no JSON, no plots")
    ap.add_argument("--skip", default="", help="comma-separated contenders to skip: lc_file,lc_sql,llm")
    ap.add_argument("--dir", type=Path, default=None, help="working folder (default: a temporary one in $TMPDIR)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-json", action="store_true")
    ap.add_argument("--profile", action="store_true", help="only profile append() at the largest size (cProfile)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.sizes, args.no_plot, args.no_json = [10, 100], True, True
    sizes = sorted(args.sizes)
    skip = set(filter(None, args.skip.split(",")))
    scale = 0.02 if args.smoke else 0.15 if args.quick else 1.0

    work = Path(tempfile.mkdtemp(prefix="bench_persistence_", dir=args.dir))
    try:
        t_start = time.perf_counter()
        print(f"working in {work}", file=sys.stderr)
        cs = CS(work, sizes)
        if args.profile:
            print(run_profile(cs, work, sizes[-1], 20 if args.smoke else 500, budget_s=0.05 if args.smoke else 1.0))
            return 0
        contenders = [
            cs_contender(cs, "cs_idle", "conversation_session append(), process (idle)", idle=True, level="process"),
            cs_contender(cs, "cs_b2b", "conversation_session append(), process (back-to-back)", idle=False,
                         level="process"),
            cs_contender(cs, "cs_power", "conversation_session append(), power (idle)", idle=True, level="power"),
            cs_direct_contender(cs),
        ]
        others: dict[str, Contender] = {}
        left_out: dict[str, str] = {}
        builders = {"lc_file": lc_file_contender, "lc_sql": lc_sql_contender, "llm": llm_contender}
        for key, build in builders.items():
            if key in skip:
                left_out[key] = "--skip"
                continue
            try:
                others[key] = build(work, sizes)
            except ImportError as exc:  # a peer library is not installed: leave its columns out, say so
                left_out[key] = f"{exc.name or exc} is not installed"
                print(f"{key}: left out ({left_out[key]})", file=sys.stderr)
                continue
            contenders.append(others[key])
        labels = {c.key: c.label for c in contenders}
        info = machine_info(work)
        print(f"setup done in {time.perf_counter() - t_start:.1f} s", file=sys.stderr, flush=True)

        run_save(contenders, sizes, work / "run", budget_s=6 * scale,
                 max_turns=5 if args.smoke else 150 if args.quick else 1000,
                 min_turns=2 if args.smoke else 5 if args.quick else 20)
        gc.collect()
        snapshot = run_snapshot(cs, sizes, work, budget_s=4 * scale, min_reps=2 if args.smoke else 10)
        load = run_load(cs, others, sizes, work, budget_s=3 * scale, min_reps=2 if args.smoke else 8)
        info["loadavg_end"] = os.getloadavg()
        info["runtime_s"] = round(time.perf_counter() - t_start, 1)
        res = {
            "sizes": sizes,
            "machine": info,
            "targets": {"save_ms": TARGET_SAVE_MS, "load_ms_5000": TARGET_LOAD_MS},
            "labels": labels,
            "save": {c.key: {str(n): summarize(c.samples[n]) for n in sizes} for c in contenders},
            "first_turn": {c.key: {str(n): summarize(c.first[n]) for n in sizes} for c in contenders},
            "chat_total": {str(n): summarize(contenders[0].extra[n]["chat"]) for n in sizes},
            "snapshot": {str(n): v for n, v in snapshot.items()},
            "load": {str(n): v for n, v in load.items()},
            "left_out": left_out,
        }
        print(f"\n## Persistence benchmark ({time.strftime('%Y-%m-%d %H:%M')})\n")
        m = info
        print(f"Machine: {m['nproc']} cores ({m['cpu']}), Python {m['python']}, {m['platform']}, files on "
              f"{m['workdir_fs']}, SQLite {m['sqlite']}; load average {m['loadavg_start'][0]:.2f} → "
              f"{m['loadavg_end'][0]:.2f}; run took {m['runtime_s']} s.")
        print("Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v))
        print_tables(res, labels)
        if left_out:
            print("\nLeft out: " + "; ".join(f"{k} ({why})" for k, why in left_out.items()))
        if not args.no_json:
            out = BENCH / "results" / f"persistence-{time.strftime('%Y%m%d-%H%M%S')}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=1))
            print(f"\nresults: {out.relative_to(REPO)}", file=sys.stderr)
        if not args.no_plot:
            try:
                paths = plot(res, labels, BENCH / "plots")
            except ImportError:
                paths = []
                print("matplotlib is not installed: no plots", file=sys.stderr)
            for p in paths:
                print(f"plot: {p.relative_to(REPO)}", file=sys.stderr)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
