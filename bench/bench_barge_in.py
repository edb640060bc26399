"""The turn after a barge-in: first-token time after an interrupted turn vs after a complete one.

On the embedded model (SmolLM2-135M, greedy, ``max_tokens=64``), a conversation alternates
pairs of turns: a long reply that is either completed or interrupted after 16 pieces
(``turn.interrupt()``: the reply is kept cut to what was streamed), then a short question whose
first-token time and uncached prompt tokens are measured.  The KV cache keeps the history as
saved, so after an interrupt the next turn should compute only what follows the cut, as after a
complete turn.  Both kinds interleave in one run (the machine is noisy), ``--pairs`` of each.

Run:  .venv/bin/python bench/bench_barge_in.py [--pairs 20]     # ~2 minutes on 2 cores
      .venv/bin/python bench/bench_barge_in.py --smoke     # one pair: proves it runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from conversation_session import ConversationSession  # noqa: E402


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="one pair of each kind: proves the script runs")
    args = ap.parse_args()
    if args.smoke:
        args.pairs = 1
    after: dict[str, list[tuple[float, int]]] = {"complete": [], "interrupted": []}
    with tempfile.TemporaryDirectory() as folder, ConversationSession(
            sessions_dir=folder, max_tokens=64, temperature=0, timeout=None, persist_kv_cache=False) as s:
        s.chat("Hello!")
        for i in range(2 * args.pairs):
            kind = "interrupted" if i % 2 else "complete"
            with s.stream(f"Tell me a long story about animal number {i}.") as turn:
                for n, _piece in enumerate(turn, 1):
                    if kind == "interrupted" and n == 16:
                        turn.interrupt()
                turn.result()
            r = s.chat(f"Thanks. One word: what colour is the sky? ({i})")
            after[kind].append((r.ttft_s or 0.0, (r.prompt_tokens or 0) - (r.cached_tokens or 0)))
    print(f"embedded SmolLM2-135M, {args.pairs} pairs of each kind, interleaved")
    print(f"{'next turn after':<18}{'ttft p50':>10}{'ttft p99':>10}{'uncached p50':>14}{'uncached max':>14}")
    for kind, rows in after.items():
        ttft = [t for t, _ in rows]
        unc = [u for _, u in rows]
        print(f"{kind:<18}{statistics.median(ttft) * 1e3:>8.0f}ms{pct(ttft, 0.99) * 1e3:>8.0f}ms"
              f"{statistics.median(unc):>14.0f}{max(unc):>14}")


if __name__ == "__main__":
    main()
