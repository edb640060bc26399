"""Every benchmark in ``bench/`` still runs: each script's ``--smoke`` mode (tiny sizes, seconds),
as a real process, must exit 0 and print its table.  Nothing about speed is asserted (the
targets live in BENCHMARKS.md); what this catches is a benchmark that a refactor broke, which
used to go unnoticed until someone tried to re-measure a figure.

Also the seam the benchmarks seed their sessions with, ``conversation_session.testing``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conversation_session import (
    ConversationSession,
    FakeBackend,
    HistoryStore,
    SessionFormatError,
)
from conversation_session.speech import EspeakEngine
from conversation_session.testing import seed_session
from pg_server import find_pg_bin

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
TIMEOUT_S = 300  # generous: the machine is shared; a smoke run takes seconds when it is quiet

needs_espeak = pytest.mark.skipif(not EspeakEngine.available(), reason="espeak-ng is not installed")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def _persistence_peers() -> list[str]:
    """Each peer's column when its library is installed, else the line saying it is left out."""
    out = []
    if _installed("langchain_community"):
        out += ["LangChain FileChatMessageHistory", "LangChain SQLChatMessageHistory (SQLite)"]
    else:
        out += ["lc_file (langchain_community is not installed)", "lc_sql (langchain_community is not installed)"]
    out.append("llm (Response.log_to_db)" if _installed("llm") else "llm (llm is not installed)")
    return out


def _pgstore_expected() -> list[str]:
    if find_pg_bin() is None:
        return ["PostgreSQL's binaries are missing (Debian package 'postgresql'): skipped"]
    return ["| conversation_session PostgresStore |", "Our load against the previous release's",
            "LangChain PostgresChatMessageHistory", "LangGraph PostgresSaver"]


def _crash_states_expected() -> list[str]:
    if shutil.which("strace") is None:
        return ["strace is not installed (Debian package 'strace'): skipped"]
    return [re.compile(r"^\| power \| 1 \| \d+ \| \d+ \| 0 \| 0 \|", re.M),  # power: nothing lost, no failure
            re.compile(r"^\| process \| 1 \| \d+ \| \d+ \| \d+ \| 0 \|", re.M),
            re.compile(r"^\| no-folder-fsync \| \d+ \| [1-9]\d* \|", re.M)]  # a planted defect is caught


def _warm_resume_expected() -> list[str]:
    if not (_installed("llama_cpp.server") and _installed("uvicorn")):
        return ["llama-cpp-python's server is not installed"]
    return ["| cold (no warm-up) |", "| warm, no pause |", "status done"]


# (command line after the interpreter, what its output must contain: plain text or re.compile)
CASES: dict[str, tuple[list[str], list[object]]] = {
    "bench_async": (["bench/bench_async.py"], ["session-layer overhead per turn: p50", "threads: at most"]),
    "bench_compat": (["bench/bench_compat.py"], ["### Per-request overhead: the compat endpoints vs the native API",
                                                 "| Ollama `/api/chat` (Home Assistant) |",
                                                 "### First token of a conversation's second request"]),
    "bench_crash_states": (["bench/bench_crash_states.py"], _crash_states_expected()),
    "bench_durability": (["bench/bench_durability.py"], ["| sessions at once | level |", "| 10 | power |",
                                                         "| 10 | power, no group commit |"]),
    "bench_barge_in": (["bench/bench_barge_in.py"], [re.compile(r"^complete\s+\d+ms", re.M),
                                                      re.compile(r"^interrupted\s+\d+ms", re.M)]),
    "bench_encryption": (["bench/bench_encryption.py"], ["| | plain | encrypted | ratio |",
                                                         "| load 200 messages + 2 journal lines |"]),
    "bench_interrupt": (["bench/bench_interrupt.py"], ["| setting | interrupted while playing |",
                                                       "| silent sink |", "| device stand-in (sleep process) |"]),
    "bench_kv": (["bench/bench_kv.py"], ["### 1. Time to first token after a restart", "### 2. Prompt tokens",
                                         "### 3. Timeout recovery", "### 4. Session-layer overhead"]),
    "bench_kv_compress": (["bench/bench_kv_compress.py"], ["| file | tokens | codec |", "| short chat (3 turns) |",
                                                           "uncompressed: resume/warm"]),
    "bench_kv_quant": (["bench/bench_kv_quant.py"], ["| KV type | file | bytes/token |", "| q8_0 |",
                                                     "f16: resume/warm"]),
    "bench_listing": (["bench/bench_listing.py"], ["first (no cache)", re.compile(r"^this tree\s+10 x 20", re.M)]),
    "bench_memory": (["bench/bench_memory.py"], [re.compile(r"^trim\s+\d+%", re.M),
                                                 re.compile(r"^summary\s+\d+%", re.M)]),
    "bench_multisession": (["bench/bench_multisession.py"], ["| switch (another session before) |",
                                                             "| re-prefill (cells dropped) |"]),
    "bench_persistence": (["bench/bench_persistence.py"], ["### Save cost per turn (median / p99)",
                                                           "conversation_session append(), process (idle)",
                                                           "conversation_session append(), power (idle)",
                                                           "### Load cost (median / p99)", *_persistence_peers()]),
    "bench_persistence_profile": (["bench/bench_persistence.py", "--profile"], ["steps of append(), timed alone",
                                                                                "steps of load, timed alone"]),
    "bench_pg_encryption": (["bench/bench_pg_encryption.py"], ["| PostgreSQL | plain | encrypted | ratio |",
                                                               "| load 200 messages |"]),
    "bench_pgstore": (["bench/bench_pgstore.py"], _pgstore_expected()),
    "bench_service": (["bench/bench_service.py"], ['"killed_worker": {', "OK: no turn lost, duplicated or reordered"]),
    "bench_service_audio": (["bench/bench_service_audio.py"], ["with ?audio=wav",
                                                               re.compile(r"audio frames: [1-9]")]),
    "bench_threads": (["bench/bench_threads.py"], ["| n_threads | busy processes |", "| 1 | 0 |", "| 1 | 1 |"]),
    "bench_tools": (["bench/bench_tools.py"], ["| direct call `set_light(**args)` |",
                                               "| turn, 4 call(s), durability power |"]),
    "bench_tts": (["bench/bench_tts.py"], ["| reply | sentences |", "| English | 2 |", "| Chinese | 2 |"]),
    "bench_warm_resume": (["bench/bench_warm_resume.py"], _warm_resume_expected()),
    "bench_window": (["bench/bench_window.py"], [re.compile(r"^no window \(baseline\)\s+40 ", re.M),
                                                 re.compile(r"^ollama, num_ctx 4096\s+40 ", re.M),
                                                 re.compile(r"^embedded, n_ctx 512\s+40 ", re.M)]),
    # Two processes killed with kill -9 again and again: all 160 turns on disk, none lost or corrupt.
    # (A kill that lands between a save and its acknowledgement leaves a turn saved and never acked.)
    "soak_tools": (["bench/soak_tools.py"], ["| kills | 8 |", "| duplicate runs | 0 |",
                                             "| acknowledged turns lost | 0 |"]),
    "soak": (["bench/soak.py"],
             [re.compile(r"\| 2 \| 80 \| [1-4] \| \d+ \| \d+ \| \d+ \| 160 \| 0 \| 0 \| \d+ \|")]),
}

SPEECH = {"bench_interrupt", "bench_tts", "bench_service_audio"}
MODEL = {"bench_barge_in", "bench_compat", "bench_kv", "bench_kv_compress", "bench_kv_quant", "bench_memory",
         "bench_multisession", "bench_threads", "bench_warm_resume", "bench_window"}


# Over 20 s on the shared 2-core machine (16-43 s: the model computes prompts again, or writes
# summaries); the others take 1-18 s.
SLOW = {"bench_kv", "bench_memory", "bench_warm_resume"}


def _params() -> list[object]:
    out = []
    for name in CASES:
        marks = [needs_espeak] if name in SPEECH else []
        if name in MODEL:
            marks.append(pytest.mark.model)
        if name in SLOW:
            marks.append(pytest.mark.slow)
        out.append(pytest.param(name, id=name, marks=marks))
    return out


def test_every_bench_script_has_a_smoke_case():
    scripts = {p.stem for p in BENCH.glob("*.py")}
    covered = {Path(argv[0]).stem for argv, _ in CASES.values()}
    assert scripts == covered, f"scripts without a smoke case: {sorted(scripts - covered)}"


@pytest.mark.parametrize("name", _params())
def test_bench_smoke(name: str):
    argv, expected = CASES[name]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT / "tests"),
                                                                       os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, *argv, "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    report = f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, report
    for want in expected:
        if isinstance(want, re.Pattern):
            assert want.search(proc.stdout), f"{want.pattern!r} not in the output\n{report}"
        else:
            assert want in proc.stdout, f"{want!r} not in the output\n{report}"


# -- the seeding seam ---------------------------------------------------------------------------


def _turns(n: int) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        out += [{"role": "user", "content": f"question {i} 你好"}, {"role": "assistant", "content": f"answer {i}"}]
    return out


def test_seed_session_writes_a_session_that_resumes_like_a_chatted_one(tmp_path):
    history = _turns(50)
    sid = seed_session(tmp_path, history, session_id="seeded_one", system_prompt="Be brief.", title="Seeded")
    assert sid == "seeded_one"
    info = HistoryStore(tmp_path).list_sessions()[0]
    assert (info.session_id, info.turns, info.total_messages, info.title) == ("seeded_one", 50, 100, "Seeded")
    fake = FakeBackend()
    with ConversationSession(backend=fake, sessions_dir=tmp_path, timeout=None) as s:
        assert s.load_history(sid)
        assert s.history == history and s.system_prompt == "Be brief."
        assert s.chat("and now?").saved
    assert len(HistoryStore(tmp_path).load(sid).messages) == 102


def test_seed_session_refuses_an_existing_id_an_empty_history_and_a_bad_message(tmp_path):
    store = HistoryStore(tmp_path)
    sid = seed_session(store, _turns(1))
    assert sid.startswith("seeded_")
    with pytest.raises(ValueError, match="already exists"):
        seed_session(store, _turns(2), session_id=sid)
    assert len(store.load(sid).messages) == 2  # untouched
    with pytest.raises(ValueError, match="at least one message"):
        seed_session(store, [])
    with pytest.raises(SessionFormatError):
        seed_session(store, [{"role": "user", "content": 42}])  # type: ignore[list-item]
    assert [i.session_id for i in store.list_sessions()] == [sid]  # nothing half-written
