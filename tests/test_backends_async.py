"""Backends on an event loop, and one backend shared by many requests at once.

Real servers on loopback: the Ollama-API test server (ollama_api_server) records whether the
client went away mid-stream; the embedded and OpenAI-compatible (``llama_cpp.server``) cases
are in test_embedded_multisession.py and test_openai_backend.py.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time

import pytest

from conversation_session import BackendError, ModelNotFoundError
from conversation_session._runtime import schedule
from conversation_session.backends import Backend, FakeBackend, GenerationRequest
from conversation_session.backends._ollama import OllamaBackend
from conversation_session.backends._openai import OpenAIBackend
from ollama_api_server import OllamaAPIServer


@pytest.fixture
def server():
    srv = OllamaAPIServer(token_delay=0.01).start()
    yield srv
    srv.stop()


def _request(text: str, **kwargs) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": text}], **kwargs)


async def _collect(backend, request: GenerationRequest) -> str:
    return "".join([piece async for piece in backend.agenerate(request)])


# -- Ollama ----------------------------------------------------------------------------------

def test_ollama_async_stream_and_figures(server):
    backend = OllamaBackend(base_url=server.url)
    request = _request("hello there", max_tokens=64)
    text = asyncio.run(_collect(backend, request))
    assert text == "You said: hello there. I remember 1 messages."
    assert request.usage.completion_tokens == len(text.split(" "))
    assert request.usage.prompt_tokens == server.chats[-1].prompt_eval_count
    assert request.usage.finish_reason == "stop"
    assert server.chats[-1].body["options"]["num_predict"] == 64
    backend.close()


@pytest.mark.parametrize("how", ["task.cancel", "aclose", "request.cancel from another thread"])
def test_ollama_async_cancel_mid_stream_disconnects_and_the_next_request_is_served(server, how):
    backend = OllamaBackend(base_url=server.url)

    async def main() -> tuple[list[str], float]:
        request = _request("tell me something long")
        pieces: list[str] = []
        if how == "task.cancel":
            async def consume() -> None:
                async for piece in backend.agenerate(request):
                    pieces.append(piece)

            task = asyncio.create_task(consume())
            while len(pieces) < 5:
                await asyncio.sleep(0.005)
            t0 = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        elif how == "aclose":
            stream = backend.agenerate(request)
            async for piece in stream:
                pieces.append(piece)
                if len(pieces) == 5:
                    break
            t0 = time.monotonic()
            await stream.aclose()  # type: ignore[attr-defined]
        else:
            t0 = 0.0
            async for piece in backend.agenerate(request):
                pieces.append(piece)
                if len(pieces) == 5:
                    t0 = time.monotonic()
                    schedule(0.0, request.cancel.cancel)  # the deadline thread cancels it
            assert request.usage.finish_reason is None  # cut short: not a completed reply
        return pieces, t0

    pieces, t0 = asyncio.run(main())
    assert 5 <= len(pieces) < 300
    record = server.wait_for_chat_end()
    assert record.disconnected and not record.finished
    assert record.words_sent < 300 and record.done_at - t0 < 1.0  # the server stopped at once
    # The backend (and its async client) serve the next request normally.
    after = _request("and now?")
    assert asyncio.run(_collect(backend, after)) == "You said: and now?. I remember 1 messages."
    backend.close()


def test_ollama_cancel_before_headers_disconnects(server):
    """Ollama sends nothing until the model is loaded and the prompt computed: a cancel then
    must still reach the server."""
    server.prompt_delay = 5.0
    backend = OllamaBackend(base_url=server.url)

    async def main() -> None:
        task = asyncio.create_task(_collect(backend, _request("hi")))
        while not server.chats:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    t0 = time.monotonic()
    asyncio.run(main())
    record = server.wait_for_chat_end(timeout=2)
    assert record.disconnected and record.done_at - t0 < 1.0
    backend.close()


def test_one_ollama_backend_serves_concurrent_requests_with_their_own_figures(server):
    backend = OllamaBackend(base_url=server.url)
    texts = ["a", "b c", "d e f", "g h i j", "k l m n o", "p q r s t u"]

    async def main() -> list[tuple[GenerationRequest, str]]:
        requests = [_request(t, cache_key=f"session-{i}") for i, t in enumerate(texts)]
        replies = await asyncio.gather(*(_collect(backend, r) for r in requests))
        return list(zip(requests, replies, strict=True))

    done = asyncio.run(main())
    # Sync callers on threads at the same time as well.
    sync_results: dict[str, GenerationRequest] = {}

    def run(text: str) -> None:
        request = _request(text, cache_key=text)
        assert "".join(backend.generate(request)) == f"You said: {text}. I remember 1 messages."
        sync_results[text] = request

    threads = [threading.Thread(target=run, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for request, reply in done:
        assert reply == f"You said: {request.messages[0]['content']}. I remember 1 messages."
        assert request.usage.completion_tokens == len(reply.split(" "))  # each its own, not the last one's
        assert request.usage.finish_reason == "stop"
    for text, request in sync_results.items():
        assert request.usage.completion_tokens == len(f"You said: {text}. I remember 1 messages.".split(" "))
    # Server figures are kept per session (cache_key), for its stats.
    assert backend.cache_stats(cache_key="session-0")["prompt_eval_tokens"] is not None
    backend.forget("session-0")
    assert "prompt_eval_tokens" not in backend.cache_stats(cache_key="session-0")
    backend.close()


# -- checks and probes -----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ollama_check_server_down_is_fast_and_says_ollama_serve():
    url = f"http://127.0.0.1:{_free_port()}"
    backend = OllamaBackend(base_url=url)
    t0 = time.monotonic()
    with pytest.raises(BackendError, match=r"cannot connect to Ollama at .*`ollama serve`") as info:
        backend.check()
    assert url in str(info.value) and time.monotonic() - t0 < 1.0
    with pytest.raises(BackendError, match="ollama serve"):
        asyncio.run(backend.acheck())


def test_ollama_check_model_missing_says_ollama_pull(server):
    OllamaBackend(base_url=server.url).check()  # qwen2.5:3b is there
    server.models.add("llama3")
    OllamaBackend("llama3:latest", base_url=server.url).check()  # no tag means :latest
    backend = OllamaBackend("llama9:70b", base_url=server.url)
    with pytest.raises(ModelNotFoundError, match=r"`ollama pull llama9:70b`.*qwen2.5:3b") as info:
        backend.check()
    assert server.url in str(info.value)
    with pytest.raises(ModelNotFoundError, match="ollama pull llama9:70b"):
        asyncio.run(backend.acheck())


@pytest.fixture
def silent_server():
    """Accepts connections (the kernel does, from the backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def test_probes_against_a_server_that_never_answers_are_bounded_and_remembered(silent_server, caplog):
    backend = OllamaBackend(base_url=silent_server, num_ctx=2048, probe_timeout=1.0)
    t0 = time.monotonic()
    assert backend.context_length() == 2048  # the configured window, after at most the probe bound
    assert time.monotonic() - t0 < 1.8
    t0 = time.monotonic()
    assert backend.context_length() == 2048  # the failure is remembered: no second wait
    assert backend.cache_stats()["n_ctx"] == 2048  # nor in stats
    assert asyncio.run(backend.acontext_length()) == 2048
    assert time.monotonic() - t0 < 0.1
    assert sum("could not read the context window" in r.getMessage() for r in caplog.records) == 1
    # The default bound is 3 s whatever the read timeout; a caller's shorter one wins.
    fresh = OllamaBackend(base_url=silent_server)
    assert fresh.probe_timeout == 3.0
    t0 = time.monotonic()
    assert fresh.context_length(timeout=0.5) == 4096
    assert time.monotonic() - t0 < 1.2
    with pytest.raises(BackendError, match=r"did not answer GET /api/tags within 0.5 s"):
        fresh.check(timeout=0.5)

    openai = OpenAIBackend("m", base_url=silent_server, probe_timeout=1.0)
    t0 = time.monotonic()
    assert openai.context_length() == 4096
    assert time.monotonic() - t0 < 1.8
    t0 = time.monotonic()
    assert openai.cache_stats()["n_ctx"] == 4096
    assert time.monotonic() - t0 < 0.1
    t0 = time.monotonic()
    with pytest.raises(BackendError, match="did not answer"):
        OpenAIBackend(base_url=silent_server, probe_timeout=1.0)  # no model: asks /models, bounded
    assert time.monotonic() - t0 < 1.8


def test_a_server_that_answers_after_a_failed_probe_is_asked_again(server, silent_server):
    backend = OllamaBackend(base_url=server.url, num_ctx=8192)
    server.context_length = 1000
    backend._probe_failed = True  # as after a timed-out /api/show
    assert backend.context_length() == 8192
    assert "".join(backend.generate(_request("hi"))).startswith("You said")
    assert backend.context_length() == 1000  # the server answered a chat: asked again, and told


# -- FakeBackend -----------------------------------------------------------------------------

def test_fake_async_records_requests_and_plays_the_queue():
    fake = FakeBackend()
    fake.enqueue(["Hello", " there"])
    fake.enqueue(BackendError("scripted failure"))
    first = _request("hi")
    assert asyncio.run(_collect(fake, first)) == "Hello there"
    with pytest.raises(BackendError, match="scripted failure"):
        asyncio.run(_collect(fake, _request("again")))
    third = _request("third")
    assert asyncio.run(_collect(fake, third)) == "Reply 3: third"
    assert [r.messages[-1]["content"] for r in fake.requests] == ["hi", "again", "third"]
    assert first.usage.finish_reason == "stop" and first.usage.completion_tokens == 2


def test_fake_async_cancel_and_per_key_prompt_cache():
    fake = FakeBackend(piece_delay=0.05)

    async def main() -> None:
        request = _request("slow", cache_key="a")
        fake.enqueue([f"w{i} " for i in range(50)])
        task = asyncio.create_task(_collect(fake, request))
        await asyncio.sleep(0.18)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert request.usage.finish_reason == "cancelled" and 0 < request.usage.completion_tokens < 50

    asyncio.run(main())
    assert fake.cancelled == 1
    fake.piece_delay = 0.0
    # Each key has its own modelled cache: b's request does not evict a's.
    a2 = _request("slow", cache_key="a")
    b1 = _request("other", cache_key="b")
    asyncio.run(_collect(fake, b1))
    asyncio.run(_collect(fake, a2))
    assert b1.usage.cached_tokens == 0 and a2.usage.cached_tokens == 2  # "<user> slow" reused
    fake.reset_cache(cache_key="a")
    assert fake.cache_stats(cache_key="a")["tokens_in_cache"] == 0
    assert fake.cache_stats(cache_key="b")["tokens_in_cache"] > 0


def test_fake_shared_by_many_concurrent_requests():
    fake = FakeBackend(piece_delay=0.01)

    async def main() -> list[str]:
        requests = [_request(f"message {i}", cache_key=i, max_tokens=100) for i in range(100)]
        replies = await asyncio.gather(*(_collect(fake, r) for r in requests))
        for r in requests:
            assert r.usage.finish_reason == "stop" and r.usage.completion_tokens == 4
        return replies

    t0 = time.monotonic()
    replies = asyncio.run(main())
    assert time.monotonic() - t0 < 1.0  # interleaved on one loop, not one after the other
    assert sorted(r.split(": ", 1)[1] for r in replies) == sorted(f"message {i}" for i in range(100))


def test_context_length_on_an_event_loop_never_blocks_it(server, silent_server):
    """Sync code running on a loop (a session's window policy) asks without stalling the loop:
    the configured window until the background answer is in."""
    server.context_length = 1000
    good = OllamaBackend(base_url=server.url, num_ctx=8192)
    hung = OllamaBackend(base_url=silent_server, num_ctx=2048, probe_timeout=1.0)

    async def main() -> None:
        t0 = time.monotonic()
        assert hung.context_length() == 2048
        assert good.context_length() in (8192, 1000)
        assert time.monotonic() - t0 < 0.05
        for _ in range(200):
            if good.context_length() == 1000:
                break
            await asyncio.sleep(0.01)
        assert good.context_length() == 1000  # learnt in the background
        assert await hung.acontext_length() == 2048
        await asyncio.sleep(1.3)
        assert hung._probe_failed  # the background probe gave up after its bound, and that is remembered

    asyncio.run(main())


def test_sampling_options_are_sent(server):
    backend = OllamaBackend(base_url=server.url, seed=7, top_k=20, num_thread=1)
    request = _request("hi", options={"top_p": 0.5, "seed": 8})
    asyncio.run(_collect(backend, request))
    options = server.chats[-1].body["options"]
    assert (options["seed"], options["top_k"], options["top_p"], options["num_thread"]) == (8, 20, 0.5, 1)


# -- the default agenerate: a sync backend on the shared executor ------------------------------

class _ThreadedBackend(FakeBackend):
    """A backend with only a sync generate (as the embedded one): the base class's agenerate."""

    agenerate = Backend.agenerate

    def __init__(self, fail_after: int | None = None):
        super().__init__(piece_delay=0.02)
        self.fail_after = fail_after
        self.stopped_at: float | None = None
        self.threads: set[str] = set()

    def generate(self, request):
        self.threads.add(threading.current_thread().name)
        try:
            for i, piece in enumerate(super().generate(request)):
                if self.fail_after is not None and i == self.fail_after:
                    raise BackendError("the model failed")
                yield piece
        finally:
            self.stopped_at = time.monotonic()


def test_default_agenerate_runs_on_the_shared_executor_and_stops_within_a_piece():
    backend = _ThreadedBackend()
    assert _ThreadedBackend.agenerate is not FakeBackend.agenerate

    async def main() -> tuple[list[str], float, float]:
        backend.enqueue([f"p{i} " for i in range(200)])
        request = _request("go", max_tokens=1000)
        pieces: list[str] = []
        ticks: list[float] = []

        async def ticker() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.005)

        tick = asyncio.create_task(ticker())

        async def consume() -> None:
            async for piece in backend.agenerate(request):
                pieces.append(piece)

        task = asyncio.create_task(consume())
        while len(pieces) < 5:
            await asyncio.sleep(0.005)
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        returned = time.monotonic() - t0
        await asyncio.sleep(0.1)
        tick.cancel()
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        assert request.cancel.cancelled
        return pieces, returned, max(gaps)

    pieces, returned, max_gap = asyncio.run(main())
    assert returned < 0.01  # the loop did not wait for the thread
    assert backend.stopped_at is not None  # ... which stopped on its own, within one piece
    assert 5 <= len(pieces) < 20 and backend.cancelled == 1
    assert max_gap < 0.1  # the loop kept running throughout
    assert all(name.startswith("conversation-session") for name in backend.threads)


def test_default_agenerate_raises_the_threads_error_in_the_consumer():
    backend = _ThreadedBackend(fail_after=3)
    backend.piece_delay = 0.0
    backend.enqueue(["a", "b", "c", "d", "e"])

    async def main() -> list[str]:
        pieces: list[str] = []
        with pytest.raises(BackendError, match="the model failed"):
            async for piece in backend.agenerate(_request("x")):
                pieces.append(piece)
        return pieces

    assert asyncio.run(main()) == ["a", "b", "c"]
