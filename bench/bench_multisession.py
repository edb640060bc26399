"""Eight conversations on one embedded model, interleaved round-robin.

Each of ``--sessions`` keys has a history of about ``--history-tokens`` tokens (computed once,
before measuring).  Then, for ``--rounds`` rounds, each key in turn gets a new ~25-token message
(greedy, ``--max-tokens`` reply).  Measured, as time to the first piece of the reply:

* switch: the model last served another key, so this key's KV state comes back from RAM
  (llama_state_seq_set_data) and the other's goes out;
* warm: the same key asks again at once (its cells are in the context already): the floor;
* re-prefill: the key's cells are dropped first, so the whole history is computed again;
  what a server with one slot (one Ollama runner, ``--parallel 1``) does when several
  conversations take turns.

Target: switch <= 1.5 x warm.

    .venv/bin/python bench/bench_multisession.py [--sessions 8] [--history-tokens 1000] [--rounds 3]
    .venv/bin/python bench/bench_multisession.py --smoke    # 2 sessions of ~150 tokens, 1 round: proves it runs
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

from conversation_session.backends import Backend, CancelToken, GenerationRequest, create_backend

TOPICS = ["tea", "trains", "volcanoes", "jazz", "chess", "gardening", "rockets", "bread", "whales", "castles"]


def history_for(backend: Backend, topic: str, target: int) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = [{"role": "system", "content": f"You are an expert on {topic}."}]
    i = 0
    while backend.count_tokens(messages) < target:
        messages.append({"role": "user", "content": f"Tell me fact number {i} about {topic}, in detail."})
        messages.append({"role": "assistant", "content": f"Fact {i} about {topic}: " + (
            f"{topic} have a long and fascinating history, with many surprising details worth knowing. ") * 3})
        i += 1
    return messages


def first_token(backend: Backend, key: str, messages: list[dict[str, str]], text: str,
                max_tokens: int) -> tuple[float, GenerationRequest]:
    messages.append({"role": "user", "content": text})
    request = GenerationRequest(messages=list(messages), max_tokens=max_tokens, temperature=0, cache_key=key)
    t0 = time.perf_counter()
    ttft = None
    pieces = []
    for piece in backend.generate(request):
        if ttft is None:
            ttft = time.perf_counter() - t0
        pieces.append(piece)
    messages.append({"role": "assistant", "content": "".join(pieces)})
    return (ttft if ttft is not None else time.perf_counter() - t0), request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--history-tokens", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--n-threads", type=int, default=None)
    parser.add_argument("--smoke", action="store_true", help="2 sessions of ~150 tokens, 1 round: proves it runs")
    args = parser.parse_args()
    if args.smoke:
        args.sessions, args.history_tokens, args.rounds = 2, 150, 1

    backend = create_backend("llama-cpp", n_threads=args.n_threads)
    keys = [f"s{i}" for i in range(args.sessions)]
    histories = {k: history_for(backend, TOPICS[i % len(TOPICS)], args.history_tokens) for i, k in enumerate(keys)}
    t0 = time.perf_counter()
    for k in keys:
        backend.warm(histories[k], CancelToken(), cache_key=k)
    setup = time.perf_counter() - t0

    switch, warm, prefill, cached = [], [], [], []
    question = "And what else should I know about it? Please answer briefly and clearly."
    for r in range(args.rounds):
        for k in keys:
            t, req = first_token(backend, k, histories[k], f"{question} ({r})", args.max_tokens)
            switch.append(t)
            cached.append((req.usage.cached_tokens or 0) / (req.usage.prompt_tokens or 1))
            t, _ = first_token(backend, k, histories[k], f"{question} ({r}, again)", args.max_tokens)
            warm.append(t)
        # Re-prefilling, for one key per round (the whole history computed again).
        k = keys[r % len(keys)]
        backend.reset_cache(cache_key=k)
        t, req = first_token(backend, k, histories[k], f"{question} ({r}, from scratch)", args.max_tokens)
        prefill.append(t)

    stats = backend.cache_stats(cache_key=keys[0])
    med = statistics.median
    print(f"{args.sessions} sessions, histories of ~{args.history_tokens} tokens "
          f"(prompt at the end: {req.usage.prompt_tokens} tokens), n_threads={backend.n_threads}, "
          f"{len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.2f}")
    print(f"setup (computing all histories once): {setup:.2f} s; KV state in RAM: "
          f"{stats['model_ram_state_bytes'] / 1e6:.0f} MB for {stats['model_sessions']} sessions")
    print()
    print("| turn | first token, median (s) | p90 (s) | x warm |")
    print("|---|---|---|---|")
    for name, values in (("warm (same session again)", warm), ("switch (another session before)", switch),
                         ("re-prefill (cells dropped)", prefill)):
        p90 = sorted(values)[min(len(values) - 1, math.ceil(len(values) * 0.9) - 1)]  # nearest rank
        print(f"| {name} | {med(values):.3f} | {p90:.3f} | {med(values) / med(warm):.2f} |")
    print()
    print(f"share of the prompt served from the session's own cells after a switch: median {med(cached):.1%}")


if __name__ == "__main__":
    main()
