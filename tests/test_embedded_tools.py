"""Tool calls on the embedded model (llama.cpp, the bundled SmolLM2-135M): a forced call is
sampled under a JSON-schema grammar, so even this small model writes a valid one; the session
runs it and the model answers; the call and its result render the same way on every turn, so
the KV cells of the history stay valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conversation_session import BackendError, ConversationSession
from conversation_session.backends import GenerationRequest
from conversation_session.backends._llama_cpp import LlamaCppBackend
from conversation_session.backends._llama_tools import parse_calls, template_messages
from forced_tokens import force_next_reply, text_tokens

pytestmark = pytest.mark.model

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {
    "name": "current_time", "description": "The local time.", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def backend():
    b = LlamaCppBackend(n_ctx=2048)
    yield b
    for key in ("forced", "required", "auto", "text"):
        b.forget(key)


def _ask(backend: LlamaCppBackend, key: str, text: str, **kw) -> tuple[str, GenerationRequest]:
    request = GenerationRequest(messages=[{"role": "user", "content": text}], max_tokens=48, temperature=0,
                                cache_key=key, **kw)
    return "".join(backend.generate(request)), request


def test_a_forced_call_is_valid_and_never_text(backend):
    text, request = _ask(backend, "forced", "What is the weather in Paris?", tools=[WEATHER],
                         tool_choice="get_weather")
    assert text == ""  # the call's JSON is never a text piece (speech never speaks it)
    [call] = request.tool_calls
    assert call.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(call.arguments["city"], str) and call.arguments["city"].strip()
    assert request.usage.finish_reason == "stop"  # the grammar let the model end the call by itself


def test_a_forced_call_keeps_to_the_parameters_types(backend):
    light = {"type": "function", "function": {
        "name": "set_light", "description": "Switch a room's light.",
        "parameters": {"type": "object", "properties": {
            "room": {"enum": ["kitchen", "hall"], "type": "string"}, "on": {"type": "boolean"},
            "level": {"type": "number"}}, "required": ["room", "on"]}}}
    text, request = _ask(backend, "forced", "Turn the kitchen light on.", tools=[light], tool_choice="set_light")
    [call] = request.tool_calls
    assert text == "" and call.arguments["room"] in {"kitchen", "hall"} and isinstance(call.arguments["on"], bool)
    assert set(call.arguments) <= {"room", "on", "level"}
    assert isinstance(call.arguments.get("level", 0.5), (int, float))


def test_a_schema_llama_cpp_cannot_force_is_a_clear_error(backend):
    odd = {"type": "function", "function": {"name": "odd", "description": "",
                                            "parameters": {"type": "object", "properties": {"x": {"type": "strange"}}}}}
    with pytest.raises(BackendError, match="cannot force a call to odd"):
        _ask(backend, "forced", "hi", tools=[odd], tool_choice="odd")
    with pytest.raises(BackendError, match="not one of the tools offered"):
        _ask(backend, "forced", "hi", tools=[WEATHER], tool_choice="launch")


def test_required_calls_one_of_the_offered_tools(backend):
    text, request = _ask(backend, "required", "What is the weather in Oslo?", tools=[WEATHER, CLOCK],
                         tool_choice={"type": "function", "function": {"name": "current_time"}})
    assert text == "" and [c.name for c in request.tool_calls] == ["current_time"]
    assert request.tool_calls[0].arguments == {}
    text, request = _ask(backend, "required", "What is the weather in Oslo?", tools=[WEATHER, CLOCK],
                         tool_choice="required")
    assert text == "" and len(request.tool_calls) == 1
    assert request.tool_calls[0].name in {"get_weather", "current_time"}


def test_an_unforced_reply_that_is_a_call_becomes_one(backend, monkeypatch):
    call = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    force_next_reply(monkeypatch, backend, [*text_tokens(backend, call), backend._model.llama.token_eos()])
    request = GenerationRequest(messages=[{"role": "user", "content": "Weather in Oslo?"}], max_tokens=40,
                                temperature=0, cache_key="auto", tools=[WEATHER])
    pieces = list(backend.generate(request))
    assert pieces == []  # held back from the first "{", and never given out: it was a call
    assert [(c.name, c.arguments) for c in request.tool_calls] == [("get_weather", {"city": "Oslo"})]


def test_an_unforced_json_reply_that_is_not_a_call_is_text(backend, monkeypatch):
    force_next_reply(monkeypatch, backend, [*text_tokens(backend, '{"answer": 42}'), backend._model.llama.token_eos()])
    request = GenerationRequest(messages=[{"role": "user", "content": "Answer in JSON."}], max_tokens=20,
                                temperature=0, cache_key="text", tools=[WEATHER])
    text = "".join(backend.generate(request))
    assert text == '{"answer": 42}' and request.tool_calls == []


def test_the_reading_rule():
    tools = [WEATHER]
    assert parse_calls('  {"name": "get_weather", "arguments": {"city": "Rome"}}\n', tools)[0].arguments == {
        "city": "Rome"}
    two = parse_calls('{"name": "get_weather", "arguments": {"city": "A"}}\n'
                      '{"name": "get_weather", "arguments": {"city": "B"}}', tools)
    assert [c.arguments["city"] for c in two] == ["A", "B"] and two[0].id != two[1].id
    assert len(parse_calls('[{"name": "get_weather", "arguments": {"city": "A"}}]', tools)) == 1
    for not_a_call in ('{"name": "launch", "arguments": {}}', '{"name": "get_weather", "arguments": "Rome"}',
                       '{"name": "get_weather", "arguments": {}} and more', "The weather is fine.", "{", ""):
        assert parse_calls(not_a_call, tools) is None, not_a_call


def test_calls_render_without_their_ids():
    def history(call_id: str) -> list:
        return [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": call_id, "type": "function", "function": {
                    "name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "tool_call_id": call_id, "name": "get_weather", "content": "sunny"}]
    assert template_messages(history("call_a")) == template_messages(history("call_b")) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"role": "tool", "content": "sunny"}]


def test_a_session_runs_the_forced_call_the_model_answers_and_the_next_turn_reuses_the_history(
        backend, sessions_dir, tmp_path):
    runs = tmp_path / "runs.txt"

    def get_weather(city: str) -> str:
        """The weather in a city.

        Args:
            city: the city's name
        """
        with runs.open("a", encoding="utf-8") as f:  # a counting tool: a line per run
            f.write(city + "\n")
        return f"sunny, 21 C in {city}"

    with ConversationSession(backend=backend, max_tokens=40, temperature=0, tools=[get_weather],
                             max_tool_rounds=1) as s:
        r1 = s.chat("What is the weather in Paris?", tool_choice="get_weather")
        sid = s.session_id
        history = s.history
        done_tokens = len(backend._render_done(history))
        r2 = s.chat("Thank you!", tool_choice="none")

    [call] = r1.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["arguments"]["city"], str)
    assert call["result"] == f"sunny, 21 C in {call['arguments']['city']}"
    assert runs.read_text(encoding="utf-8").splitlines() == [call["arguments"]["city"]]  # run once
    assert r1.response.strip() and "get_weather" not in r1.response
    # The answer after the call reused the cells of the conversation up to the call.
    assert r1.cached_tokens >= len(backend._render_done(history[:2]))
    # The next turn's prompt begins with the whole previous turn (call, result, reply) in cells:
    # all of it but the end of the reply (its last sampled token, and the template's <|im_end|>
    # and newline after it, are first evaluated with the next prompt, as on any turn).
    assert r2.cached_tokens >= done_tokens - 3
    assert r2.cached_tokens > len(backend._render_done(history[:-1])) > len(backend._render_done(history[:2]))
    data = json.loads((Path(sessions_dir) / f"{sid}.json").read_text(encoding="utf-8"))
    messages = data["conversation_history"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant", "user", "assistant"]
    assert messages[1]["tool_calls"][0]["id"] == call["id"] == messages[2]["tool_call_id"]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == call["arguments"]
    assert messages[2]["content"] == call["result"] and data["turns"] == 2


def test_the_cells_of_a_tool_conversation_are_saved_and_restored(backend, tmp_path):
    history: list = [{"role": "user", "content": "What is the weather in Lima?"}]
    request = GenerationRequest(messages=list(history), max_tokens=40, temperature=0, cache_key="kv",
                                tools=[WEATHER], tool_choice="get_weather")
    assert "".join(backend.generate(request)) == ""
    [call] = request.tool_calls
    history += [{"role": "assistant", "content": "", "tool_calls": [
                    {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
                {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": "rain, 14 C"}]
    request = GenerationRequest(messages=list(history), max_tokens=16, temperature=0, cache_key="kv")
    history.append({"role": "assistant", "content": "".join(backend.generate(request))})
    assert request.usage.cached_tokens >= len(backend._render_done(history[:2]))  # the call's cells reused

    saved = backend.save_state(tmp_path / "t.kv", history, cache_key="kv")
    assert saved["kv_save"] == "saved" and saved["kv_saved_tokens"] > len(backend._render_done(history[:3]))
    restored = backend.restore_state(tmp_path / "t.kv", history, max_bytes=1 << 30, cache_key="kv-restored")
    assert restored["kv_restored"] and restored["kv_restore_tokens"] == saved["kv_saved_tokens"]
    # A changed result is another conversation: its cells are refused, never used for it.
    other = [*history[:2], {**history[2], "content": "snow"}, history[3]]
    refused = backend.restore_state(tmp_path / "t.kv", other, max_bytes=1 << 30, cache_key="kv-other")
    assert not refused["kv_restored"]
    for key in ("kv", "kv-restored", "kv-other"):
        backend.forget(key)
