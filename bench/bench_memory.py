"""Memory beyond the context window: ``memory="trim"`` vs ``memory="summary"``.

Part 1 (default): the embedded model, a long conversation with a small window.
    A scripted conversation of ``--turns`` turns (default 300) with a 2,048-token window on
    SmolLM2-135M (``max_tokens=24``, greedy): a few facts are planted in the first turns, then
    ordinary chat.  For each memory mode it reports, per turn:

    * the share of turns whose prompt was served from the KV cache except for the new message
      (uncached tokens <= the new message's own tokens + 12 for the template and the previous
      reply's last token, which is sampled, never evaluated);
    * first-token time p50 / p99;
    * how many of the planted facts are still in the prompt at the end (verbatim in the
      history sent, or in the summary) -- a 135M model's summaries are poor, so this counts
      what the *prompt* carries, not what the model answers.

Part 2 (``--ollama URL --model NAME``): a small LoCoMo-style harness for a user with a real
    model.  Facts are planted early in a long conversation and asked for late; answers are
    scored by token F1 against the gold answer (the way LoCoMo scores), for ``trim``,
    ``summary`` and full context (a window large enough to hold everything).

Run:  .venv/bin/python bench/bench_memory.py [--turns 300]      # ~30 minutes on 2 cores
      .venv/bin/python bench/bench_memory.py --smoke             # 9 turns in a 384-token window: proves it runs
      .venv/bin/python bench/bench_memory.py --ollama http://127.0.0.1:11434 --model qwen2.5:3b
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from conversation_session import ConversationSession  # noqa: E402

FACTS = [
    ("My name is Alice Martin.", "What is my name?", "Alice Martin"),
    ("My dog is called Rex and he is a beagle.", "What is my dog called?", "Rex"),
    ("I live in Lyon, in France.", "Which city do I live in?", "Lyon"),
    ("My favourite colour is teal.", "What is my favourite colour?", "teal"),
    ("My sister's birthday is on the 14th of March.", "When is my sister's birthday?", "14th of March"),
]
FILLER = [
    "Tell me something interesting about the weather today.",
    "What is a good recipe for a quick dinner?",
    "Give me one tip to sleep better.",
    "What should I read next? Something short.",
    "How do I keep a plant alive on a windowsill?",
    "Suggest a short walk I could take this evening.",
    "What's a fun fact about octopuses?",
    "How can I learn a few words of Italian?",
]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def script(turns: int) -> list[str]:
    out = [fact for fact, _, _ in FACTS]
    i = 0
    while len(out) < turns:
        out.append(FILLER[i % len(FILLER)])
        i += 1
    return out


def run_embedded(memory: str, turns: int, n_ctx: int = 2048) -> dict[str, float]:
    from conversation_session.backends import create_backend

    backend = create_backend("llama-cpp", n_ctx=n_ctx)
    warm, ttfts = 0, []
    with tempfile.TemporaryDirectory() as folder, ConversationSession(
            backend=backend, sessions_dir=folder, memory=memory, max_tokens=24, temperature=0,
            timeout=None, persist_kv_cache=False, system_prompt="You are a helpful assistant.") as s:
        t0 = time.perf_counter()
        for i, text in enumerate(script(turns)):
            turn = s.stream(text)
            for _ in turn:
                pass
            r = turn.result()
            new_tokens = s._core.policy.tokens.of({"role": "user", "content": text})
            if i and r.prompt_tokens is not None and r.cached_tokens is not None \
                    and r.prompt_tokens - r.cached_tokens <= new_tokens + 12:
                warm += 1
            if r.ttft_s is not None:
                ttfts.append(r.ttft_s)
            if memory == "summary":
                s._core.policy.wait_idle(120)  # each summary lands before the next turn (a person types slower)
        elapsed = time.perf_counter() - t0
        last_prompt = s._core.conversation.plan("?").prompt
        stats = s.get_cache_stats()
    prompt_text = "\n".join(m["content"] for m in last_prompt).lower()
    kept = sum(1 for _, _, gold in FACTS if gold.lower() in prompt_text)
    return {"warm_share": warm / (turns - 1), "ttft_p50": statistics.median(ttfts), "ttft_p99": pct(ttfts, 0.99),
            "facts_in_prompt": kept, "compactions": stats.get("compactions", 0),
            "trimmed": stats.get("trimmed_turns", 0), "elapsed": elapsed}


def token_f1(answer: str, gold: str) -> float:
    def toks(t: str) -> list[str]:
        return re.findall(r"\w+", t.lower())
    a, g = toks(answer), toks(gold)
    common = sum((Counter(a) & Counter(g)).values())
    if not common:
        return 0.0
    precision, recall = common / len(a), common / len(g)
    return 2 * precision * recall / (precision + recall)


def run_ollama(url: str, model: str, turns: int, num_ctx: int) -> None:
    from conversation_session.backends._ollama import OllamaBackend

    modes = [("trim", num_ctx), ("summary", num_ctx), ("full context", 32768)]
    print(f"LoCoMo-style recall on {model}: {len(FACTS)} facts planted in the first turns, "
          f"{turns} turns, asked at the end; token F1 (mean)")
    for name, ctx in modes:
        backend = OllamaBackend(model, base_url=url, num_ctx=ctx)
        with tempfile.TemporaryDirectory() as folder, ConversationSession(
                backend=backend, sessions_dir=folder, memory="summary" if name == "summary" else "trim",
                max_tokens=64, temperature=0, timeout=None) as s:
            for text in script(turns):
                s.chat(text)
                if name == "summary":
                    s._core.policy.wait_idle(300)
            scores = [token_f1(s.chat(question + " Answer in a few words.").response, gold)
                      for _, question, gold in FACTS]
        print(f"  {name:<13} F1 {statistics.mean(scores):.2f}  ({', '.join(f'{x:.2f}' for x in scores)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=300)
    ap.add_argument("--ollama", help="an Ollama server URL: run the recall harness instead")
    ap.add_argument("--model", default="qwen2.5:3b")
    ap.add_argument("--num-ctx", type=int, default=2048, help="the window (Ollama's num_ctx, the embedded n_ctx)")
    ap.add_argument("--smoke", action="store_true",
                    help="9 turns in a 384-token window (so both modes drop turns): proves the script runs")
    ap.add_argument("--memory", choices=("trim", "summary"), action="append",
                    help="run only this mode (repeatable; default: both)")
    args = ap.parse_args()
    if args.smoke:
        args.turns, args.num_ctx = 9, 384
    if args.ollama:
        run_ollama(args.ollama, args.model, args.turns, args.num_ctx)
        return
    print(f"embedded SmolLM2-135M, n_ctx {args.num_ctx}, {args.turns} turns, max_tokens 24, greedy")
    print(f"{'memory':<9}{'warm turns':>11}{'ttft p50':>10}{'ttft p99':>10}{'facts kept':>11}"
          f"{'compactions':>12}{'trimmed':>9}{'wall s':>8}")
    for memory in args.memory or ("trim", "summary"):
        r = run_embedded(memory, args.turns, args.num_ctx)
        print(f"{memory:<9}{r['warm_share']:>10.0%}{r['ttft_p50'] * 1e3:>8.0f}ms{r['ttft_p99'] * 1e3:>8.0f}ms"
              f"{r['facts_in_prompt']:>8}/{len(FACTS)}{r['compactions']:>12}{r['trimmed']:>9}{r['elapsed']:>8.0f}",
              flush=True)


if __name__ == "__main__":
    main()
