"""One embedded model (llama.cpp, SmolLM2) serving several conversations, from threads and an
event loop: each ``cache_key`` keeps its own KV cells, generations interleave, cancellation
stops the decoding within a token, and a reply is never cut inside a character."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from conversation_session.backends import CancelToken, GenerationRequest
from conversation_session.backends._llama_cpp import LlamaCppBackend
from forced_tokens import byte_token, force_next_reply, text_tokens

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def backend():
    b = LlamaCppBackend()
    yield b
    for key in ("A", "B", "C", "cut", "async", None):
        b.forget(key)


def _turn(backend: LlamaCppBackend, key: str, history: list, text: str, max_tokens: int = 12) -> GenerationRequest:
    history.append({"role": "user", "content": text})
    request = GenerationRequest(messages=list(history), max_tokens=max_tokens, temperature=0, cache_key=key)
    reply = "".join(backend.generate(request))
    history.append({"role": "assistant", "content": reply})
    return request


def test_two_sessions_alternating_each_continue_with_their_own_cache(backend):
    a: list = [{"role": "system", "content": "You are a helpful assistant. " * 20}]
    b: list = [{"role": "system", "content": "You answer in French. " * 20}]
    a1 = _turn(backend, "A", a, "My name is Ada and I like tea.")
    b1 = _turn(backend, "B", b, "Je m'appelle Bruno.")
    switches = backend._model.switches
    a2 = _turn(backend, "A", a, "What is my name?")
    b2 = _turn(backend, "B", b, "Comment je m'appelle ?")
    assert backend._model.switches >= switches + 2  # the context really went back and forth
    # After each switch the session's own conversation came back from RAM, not recomputed.
    assert a2.usage.cached_tokens >= a1.usage.prompt_tokens
    assert b2.usage.cached_tokens >= b1.usage.prompt_tokens
    assert a2.usage.prompt_tokens - a2.usage.cached_tokens < 30
    stats_a, stats_b = backend.cache_stats(cache_key="A"), backend.cache_stats(cache_key="B")
    assert stats_a["tokens_in_cache"] > a2.usage.prompt_tokens and stats_a["state_bytes"] > 0
    assert stats_b["tokens_in_cache"] > b2.usage.prompt_tokens and stats_b["state_bytes"] > 0
    assert stats_a["model_sessions"] >= 2

    # One session's clear never touches the other's cells.
    backend.reset_cache(cache_key="A")
    assert backend.cache_stats(cache_key="A")["tokens_in_cache"] == 0
    b3 = _turn(backend, "B", b, "Merci.")
    assert b3.usage.cached_tokens >= b2.usage.prompt_tokens
    a3 = _turn(backend, "A", a, "Thanks.")
    assert a3.usage.cached_tokens == 0  # A starts over (its cells were dropped)


def test_generations_interleave_instead_of_waiting_for_each_other(backend):
    histories = {"A": [{"role": "user", "content": "Write a very long story about a dragon and a knight."}],
                 "B": [{"role": "user", "content": "Write a very long story about a princess and a wizard."}]}
    times: dict[str, list[float]] = {"A": [], "B": []}
    requests: dict[str, GenerationRequest] = {}
    start = threading.Barrier(2)

    def run(key: str) -> None:
        request = GenerationRequest(messages=histories[key], max_tokens=60, temperature=0, cache_key=key)
        requests[key] = request
        start.wait()
        for _ in backend.generate(request):
            times[key].append(time.monotonic())

    threads = [threading.Thread(target=run, args=(k,)) for k in ("A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(times["A"]) > 20 and len(times["B"]) > 20
    # Each one produced pieces while the other was still producing: they shared the model.
    assert times["B"][0] < times["A"][-1] and times["A"][0] < times["B"][-1]
    first_half_a = times["A"][len(times["A"]) // 2]
    assert any(t < first_half_a for t in times["B"][: len(times["B"]) // 2])
    for key in ("A", "B"):
        assert requests[key].usage.completion_tokens == 60 and requests[key].usage.finish_reason == "length"


def test_async_cancel_stops_the_decoding_within_a_token_and_the_next_request_is_served(backend):
    history = [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]

    async def main() -> GenerationRequest:
        request = GenerationRequest(messages=history, max_tokens=2000, temperature=0, cache_key="async")
        pieces: list[str] = []

        async def consume() -> None:
            async for piece in backend.agenerate(request):
                pieces.append(piece)

        task = asyncio.create_task(consume())
        while len(pieces) < 5:
            await asyncio.sleep(0.01)
        lag = []
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        lag.append(time.monotonic() - t0)
        assert lag[0] < 0.1  # the loop is not held while the thread stops
        assert request.cancel.cancelled
        return request

    request = asyncio.run(main())
    time.sleep(0.3)  # the thread has noticed by now
    n1 = backend.cache_stats(cache_key="async")["tokens_in_cache"]
    time.sleep(0.3)
    assert backend.cache_stats(cache_key="async")["tokens_in_cache"] == n1  # decoding really stopped
    assert n1 < request.usage.prompt_tokens + 60
    assert request.usage.finish_reason == "cancelled"
    after = GenerationRequest(messages=[*history[:1], {"role": "assistant", "content": "Once"},
                                        {"role": "user", "content": "Shorter, please."}],
                              max_tokens=4, temperature=0, cache_key="async")
    assert asyncio.run(_collect(backend, after))
    assert after.usage.cached_tokens > 5  # the first message's cells were kept


async def _collect(backend: LlamaCppBackend, request: GenerationRequest) -> str:
    return "".join([p async for p in backend.agenerate(request)])


def test_a_reply_cut_by_max_tokens_never_ends_in_a_broken_character(backend):
    """SmolLM2 spells most Chinese characters as two or three byte tokens, so some token
    limits fall inside a character: its bytes are dropped, never shown as U+FFFD."""
    messages = [{"role": "user", "content": "请用中文写一首关于春天的短诗。"}]
    texts = []
    for max_tokens in range(1, 16):
        request = GenerationRequest(messages=messages, max_tokens=max_tokens, temperature=0, cache_key="cut")
        text = "".join(backend.generate(request))
        assert "\ufffd" not in text, (max_tokens, text)
        if request.usage.completion_tokens == max_tokens:
            assert request.usage.finish_reason == "length"
        texts.append(text)
    # Greedy decoding: each reply extends the previous one.  Some limit produced no new text
    # (it ended inside a character): the case this test is about did occur.
    assert any(texts[i] == texts[i - 1] for i in range(1, len(texts)))
    assert any(ord(ch) > 0x2E80 for ch in texts[-1])


def test_kv_file_saved_and_restored_while_another_session_has_the_model(backend, tmp_path):
    """Saving a session whose cells wait in RAM uses that copy (the active session keeps the
    model); restoring while another session has the model parks the cells in RAM until the
    session's first step."""
    c: list = [{"role": "system", "content": "You remember everything about cheese. " * 15}]
    d: list = [{"role": "system", "content": "You are terse. " * 15}]
    _turn(backend, "C", c, "I like Comté.")
    _turn(backend, "D", d, "Hello.")  # C's cells go to RAM
    assert backend._model.active == "D"
    figures = backend.save_state(tmp_path / "c.kv", c, cache_key="C")
    assert figures["kv_save"] == "saved" and figures["kv_saved_tokens"] > 100
    assert backend._model.active == "D"  # D kept the model
    backend.forget("C")
    restored = backend.restore_state(tmp_path / "c.kv", c, max_bytes=1 << 30, cache_key="C2")
    assert restored["kv_restored"] is True and backend._model.active == "D"
    assert backend.cache_stats(cache_key="C2")["tokens_in_cache"] == restored["kv_restore_tokens"]
    again = _turn(backend, "C2", c, "Which cheese do I like?")
    assert again.usage.cached_tokens >= restored["kv_restore_tokens"]
    backend.forget("C2")
    backend.forget("D")


def test_sampling_seed_and_per_request_options(backend):
    messages = [{"role": "user", "content": "Tell me a short story about a cat."}]

    def reply(temperature: float, **options) -> str:
        request = GenerationRequest(messages=messages, max_tokens=16, temperature=temperature, cache_key="C",
                                    options=options)
        return "".join(backend.generate(request))

    assert reply(1.0, seed=42) == reply(1.0, seed=42)  # a seed makes sampling repeatable
    assert reply(1.0, top_k=1) == reply(0.0)  # top_k=1 leaves only the greedy choice
    backend.forget("C")


def test_a_seeded_reply_is_the_same_on_every_path_to_its_prompts_cells(backend, tmp_path):
    """With a seed, a sampled reply (temperature 1.0) is the same whether the prompt's cells were
    computed now, kept with the reply after them, kept under a longer conversation, copied to
    RAM and back, restored from a KV file or prefilled by a warm-up.  Each path leaves the same
    cells before the prompt's last token and evaluates that token alone: the same kernels on
    the same batch shapes, so the same logits on any CPU (not only on this one's rounding)."""
    # 69 tokens: a batch of 64, one of 4, then the last token.  (On an AVX-512 EPYC this last
    # token's logits, computed in a batch of several, differ from those computed alone.)
    prompt = [{"role": "system", "content": "You are a helpful assistant who likes cats. " * 5},
              {"role": "user", "content": "Tell me a short story about a cat."}]

    def reply(key: str) -> tuple[str, GenerationRequest]:
        request = GenerationRequest(messages=prompt, max_tokens=24, temperature=1.0, cache_key=key,
                                    options={"seed": 42})
        return "".join(backend.generate(request)), request

    backend.reset_cache(cache_key="S")
    cold, first = reply("S")
    assert first.usage.cached_tokens == 0 and first.usage.prompt_tokens > 64
    again, second = reply("S")  # the prompt's cells, and the first reply's after them
    assert second.usage.cached_tokens == second.usage.prompt_tokens - 1
    assert again == cold

    # Two more turns: the prompt is now the start of a longer conversation in the cells.
    history = list(prompt)
    for text in ("And then?", "How does it end?"):
        history += [{"role": "assistant", "content": cold}, {"role": "user", "content": text}]
    later = GenerationRequest(messages=history, max_tokens=16, temperature=0, cache_key="S")
    history.append({"role": "assistant", "content": "".join(backend.generate(later))})
    assert later.usage.cached_tokens >= first.usage.prompt_tokens
    saved = backend.save_state(tmp_path / "s.kv", history, cache_key="S")
    assert saved["kv_save"] == "saved" and saved["kv_saved_tokens"] > first.usage.prompt_tokens
    under_longer, third = reply("S")
    assert third.usage.cached_tokens == third.usage.prompt_tokens - 1
    assert under_longer == cold

    restored = backend.restore_state(tmp_path / "s.kv", history, max_bytes=1 << 30, cache_key="S-restored")
    assert restored["kv_restored"] is True
    from_file, fourth = reply("S-restored")  # S's cells went to RAM
    assert fourth.usage.cached_tokens == fourth.usage.prompt_tokens - 1
    assert from_file == cold

    warmed = backend.warm(prompt, CancelToken(), cache_key="S-warm")
    assert warmed["warmup_finished"] is True and warmed["warmup_cached_tokens"] == 0
    after_warmup, _ = reply("S-warm")
    assert after_warmup == cold
    back_from_ram, fifth = reply("S")
    assert fifth.usage.cached_tokens == fifth.usage.prompt_tokens - 1
    assert back_from_ram == cold
    for key in ("S", "S-restored", "S-warm"):
        backend.forget(key)


@pytest.mark.parametrize("then", ["next turn at once", "next turn after a pause", "KV file"])
@pytest.mark.parametrize("where", ["inside", "at the end"])
def test_a_reply_with_bytes_that_are_not_utf8_keeps_the_whole_cache(backend, tmp_path, monkeypatch, where, then):
    """A reply whose tokens are not valid UTF-8 is saved with U+FFFD (or without the bytes of a
    last, unfinished character), which does not tokenize back to the sampled tokens.  The cells
    are brought in line with the saved text, so the next turn, or a KV file saved for a restart,
    still covers the whole conversation instead of stopping at the bad byte."""
    e4, b8 = byte_token(backend, 0xE4), byte_token(backend, 0xB8)  # the start of a 3-byte character
    if where == "inside":  # ... followed by a space: invalid, decoded as U+FFFD, and the model goes on
        forced = [*text_tokens(backend, "Hi"), e4, *text_tokens(backend, " there, friend")]
    else:  # ... and the reply stops there: the unfinished character is dropped
        forced = [*text_tokens(backend, "Hi there"), e4, b8, *text_tokens(backend, "<|im_end|>")]
    history: list = [{"role": "system", "content": "You are a friendly assistant. " * 10}]
    force_next_reply(monkeypatch, backend, forced)
    first = _turn(backend, "U", history, "Say hello.", max_tokens=40)
    reply = history[-1]["content"]
    if where == "inside":
        assert reply.startswith("Hi\ufffd there, friend") and first.usage.finish_reason == "length"
    else:
        assert reply == "Hi there" and first.usage.finish_reason == "stop"
    # The conversation's tokens, without the 4 of the prompt for a reply (<|im_start|>assistant\n).
    completed = backend.count_tokens(history) - 4
    new_message = backend.count_tokens([{"role": "system", "content": ""}, {"role": "user", "content": "Thanks!"}])

    if then == "next turn after a pause":
        # While the user reads the reply, its cells are recomputed from the saved text.
        deadline = time.monotonic() + 60
        while "U" in backend._model.realign and time.monotonic() < deadline:
            time.sleep(0.02)
        assert backend.cache_stats(cache_key="U")["tokens_in_cache"] == completed
    if then.startswith("next turn"):  # at once: it finishes what the background has not
        second = _turn(backend, "U", history, "Thanks!")
        assert second.usage.cached_tokens >= completed
        assert second.usage.prompt_tokens - second.usage.cached_tokens <= new_message
    else:  # a restart: the file's cells are those of the saved text
        saved = backend.save_state(tmp_path / "u.kv", history, cache_key="U")
        assert saved["kv_save"] == "saved" and saved["kv_saved_tokens"] >= completed
        restored = backend.restore_state(tmp_path / "u.kv", history, max_bytes=1 << 30, cache_key="U2")
        assert restored["kv_restored"] is True and restored["kv_restore_tokens"] >= completed
        second = _turn(backend, "U2", history, "Thanks!")
        assert second.usage.cached_tokens >= completed
    backend.forget("U")
    backend.forget("U2")

def test_two_async_sessions_on_one_loop_share_the_model(backend):
    """Two conversations streaming at once on one event loop (the executor runs the model):
    both make progress together and each keeps its own figures."""
    async def main() -> dict[str, tuple[GenerationRequest, list[float]]]:
        async def one(key: str, text: str) -> tuple[GenerationRequest, list[float]]:
            request = GenerationRequest(messages=[{"role": "user", "content": text}], max_tokens=40,
                                        temperature=0, cache_key=key)
            times = [time.monotonic() async for _ in backend.agenerate(request)]
            return request, times

        a, b = await asyncio.gather(one("A", "Write a very long story about a dragon and a knight."),
                                    one("B", "Write a very long story about a princess and a wizard."))
        return {"A": a, "B": b}

    out = asyncio.run(main())
    (ra, ta), (rb, tb) = out["A"], out["B"]
    assert len(ta) > 10 and len(tb) > 10
    assert tb[0] < ta[-1] and ta[0] < tb[-1]  # interleaved, not one after the other
    assert ra.usage.completion_tokens == rb.usage.completion_tokens == 40
    # Each request's figures are its own prompt's.
    assert ra.usage.prompt_tokens == backend.count_tokens(ra.messages)
    assert rb.usage.prompt_tokens == backend.count_tokens(rb.messages)
    backend.forget("A")
    backend.forget("B")
