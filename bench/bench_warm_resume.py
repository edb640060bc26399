"""Time to first token of the first turn after a restart, with and without the warm-up.

A restart is a new ``ConversationSession`` + ``load_history()`` of a saved ~1,000-token
conversation, against ``python -m llama_cpp.server`` (bundled SmolLM2) through the OpenAI
backend.  Before each trial the server's prompt cache is given an unrelated prompt, so the
restored history is not in it (as after a server restart or another user's requests).

* cold: the warm-up is off (a backend with ``can_warm = False``); the user types for
  ``--pause`` seconds, then the first turn computes the whole history.
* warm: ``load_history`` starts the warm-up in the background while the user types.
* warm, no pause: the first message is sent at once; the turn waits for the warm-up.

Run by hand:  .venv/bin/python bench/bench_warm_resume.py [--trials 3] [--pause 2] [--threads 1]
              .venv/bin/python bench/bench_warm_resume.py --smoke   # 2 turns, 1 trial: proves it runs

Needs llama-cpp-python's server (``pip install 'llama-cpp-python[server]'``, in the dev extras).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from conversation_session import ConversationSession, FakeBackend
from conversation_session.backends import Backend, create_backend
from conversation_session.backends._llama_cpp import bundled_model_path

TOPICS = ["the tides", "bread baking", "the history of the bicycle", "how bees find flowers",
          "learning the cello", "volcanic islands", "winter gardening", "old lighthouses"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, threads: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(bundled_model_path()), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "4096", "--n_threads", str(threads), "--n_threads_batch", str(threads)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llama_cpp.server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("llama_cpp.server did not start")


def make_history(directory: Path, topics: list[str]) -> str:
    """A saved session of about 1,000 tokens (written with the fake backend: no model needed)."""
    fake = FakeBackend()
    with ConversationSession(backend=fake, sessions_dir=directory) as s:
        for topic in topics:
            question = (f"Tell me about {topic}. I would like to know how it works, why it matters, what "
                        f"people usually get wrong about it, and one surprising fact about {topic}.")
            answer = (f"{topic.capitalize()} is a subject with a long story. In short, it depends on a few "
                      "simple forces acting together over time, and most of the interesting details come "
                      "from how those forces meet local conditions. People often think it is simpler than "
                      "it is, or that it never changes; in fact it keeps changing, slowly, every year. A "
                      f"surprising fact: the oldest written notes on {topic} are far older than most expect.")
            fake.enqueue(answer)
            s.chat(question)
        return s.session_id


def evict(url: str) -> None:
    """Fill the server's prompt cache with something unrelated to the saved conversation."""
    httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "Name three colours of the rainbow."}], "max_tokens": 1})


def trial(url: str, template: Path, session_id: str, *, warm: bool, pause: float) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        sessions = Path(tmp) / "sessions"
        shutil.copytree(template, sessions)
        evict(url)
        backend: Backend = create_backend("openai", base_url=url, context_length=4096)
        if not warm:
            backend.can_warm = False  # type: ignore[misc]  # this one backend never warms up
        with ConversationSession(backend=backend, sessions_dir=sessions, max_tokens=8, temperature=0,
                                 timeout=120) as s:
            assert s.load_history(session_id)
            time.sleep(pause)  # the user typing the first message
            result = s.chat("Which of these topics did I ask about first?")
            stats = s.get_cache_stats()
        assert result.ttft_s is not None
        return result.ttft_s, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--pause", type=float, default=2.0, help="seconds the user 'types' (default 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="server threads (default 1: llama.cpp's spinning threads suffer on a shared machine)")
    parser.add_argument("--smoke", action="store_true",
                        help="a 2-turn conversation, one trial, pause 0.5 s: proves the script runs")
    args = parser.parse_args()
    topics = TOPICS[:2] if args.smoke else TOPICS
    if args.smoke:
        args.trials, args.pause = 1, 0.5

    if importlib.util.find_spec("llama_cpp.server") is None or importlib.util.find_spec("uvicorn") is None:
        print("llama-cpp-python's server is not installed (pip install 'llama-cpp-python[server]'): skipped")
        sys.exit(0 if args.smoke else 1)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(port, args.threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            template = Path(tmp) / "sessions"
            session_id = make_history(template, topics)
            cases = {"cold (no warm-up)": (False, args.pause), "warm": (True, args.pause),
                     "warm, no pause": (True, 0.0)}
            ttfts: dict[str, list[float]] = {name: [] for name in cases}
            warm_stats: list[dict] = []
            for _ in range(args.trials):  # interleaved, so drift in machine load hits every case
                for name, (warm, pause) in cases.items():
                    ttft, stats = trial(url, template, session_id, warm=warm, pause=pause)
                    ttfts[name].append(ttft)
                    if warm and pause:
                        warm_stats.append(stats)
    finally:
        proc.terminate()
        proc.wait(10)

    cold = statistics.median(ttfts["cold (no warm-up)"])
    print(f"\nFirst turn after load_history() of a {len(topics)}-turn conversation "
          f"({warm_stats[0].get('warmup_prompt_tokens')} prompt tokens as the server counts them), "
          f"llama_cpp.server with SmolLM2-135M-Instruct Q4_1, {args.threads} thread(s), "
          f"{args.trials} trials, pause {args.pause:g} s:\n")
    print("| case | TTFT median (s) | min (s) | max (s) | cold / this |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, values in ttfts.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {min(values):.3f} | {max(values):.3f} | {cold / median:.1f}x |")
    warm_s = statistics.median(s["warmup_s"] for s in warm_stats)
    print(f"\nwarm-up (background, during the pause): median {warm_s:.3f} s; "
          f"status {', '.join(sorted({s['warmup'] for s in warm_stats}))}")


if __name__ == "__main__":
    main()
