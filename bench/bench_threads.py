"""How the embedded model's speed depends on ``n_threads`` when other processes want the CPU.

For each thread count (1, 2, ..., all cores) and each number of competing busy processes
(0, 1), a fresh process loads the bundled SmolLM2 and answers the same prompt a few times
(greedy, 128 tokens, a new conversation key each time so the prompt is computed again):
first-token time (prompt of ~250 tokens) and generation speed.  The busy processes are plain
``while True: pass`` loops, i.e. another program using a core.

    .venv/bin/python bench/bench_threads.py [--reps 3] [--max-tokens 128]
    .venv/bin/python bench/bench_threads.py --smoke    # 1 thread, 8 tokens, once: proves it runs

Prints a Markdown table; the default ``n_threads`` (``default_n_threads()``) is chosen from it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
from conversation_session.backends import GenerationRequest, create_backend
n_threads, reps, max_tokens = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
backend = create_backend("llama-cpp", n_threads=n_threads)
prompt = ("You are a careful assistant. Here are some notes about the history of computing: " * 12
          + "Summarise them in a long answer.")
out = []
for rep in range(reps + 1):
    request = GenerationRequest(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                temperature=0, cache_key=f"rep{rep}")
    t0 = time.perf_counter()
    first = None
    for _ in backend.generate(request):
        if first is None:
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    u = request.usage
    if rep:  # the first one warms the process up
        out.append({"ttft": first, "tok_s": (u.completion_tokens - 1) / (total - first),
                    "prompt_tokens": u.prompt_tokens, "tokens": u.completion_tokens})
    backend.forget(f"rep{rep}")
print(json.dumps(out))
"""


def run(n_threads: int, busy: int, reps: int, max_tokens: int) -> list[dict[str, float]]:
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        time.sleep(0.5)
        proc = subprocess.run([sys.executable, "-c", CHILD, str(n_threads), str(reps), str(max_tokens)],
                              capture_output=True, text=True, timeout=1800, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--smoke", action="store_true",
                        help="1 thread only, 1 repetition of 8 tokens, with and without a busy process: proves it runs")
    args = parser.parse_args()
    if args.smoke:
        args.reps, args.max_tokens = 1, 8
    cores = len(os.sched_getaffinity(0))
    counts = [1] if args.smoke else sorted({1, 2, cores})
    print(f"{cores} cores; load average before: {os.getloadavg()[0]:.2f}\n")
    print("| n_threads | busy processes | first token (s), median | tok/s, median | tok/s, min |")
    print("|---|---|---|---|---|")
    for busy in (0, 1):
        for n in counts:
            rows = run(n, busy, args.reps, args.max_tokens)
            ttft = statistics.median(r["ttft"] for r in rows)
            speeds = [r["tok_s"] for r in rows]
            print(f"| {n} | {busy} | {ttft:.3f} | {statistics.median(speeds):.1f} | {min(speeds):.1f} |", flush=True)


if __name__ == "__main__":
    main()
