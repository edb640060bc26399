"""The session's options: one rule each, checked by the constructor, the setters and both
command lines alike; the sync and the async session expose the same settable ones."""

from __future__ import annotations

import asyncio
import math

import pytest

from conversation_session import AsyncConversationSession, ConversationSession, FakeBackend, SessionError
from conversation_session.cli._args import parse_args
from conversation_session.service._config import build_parser


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, "30", True])
def test_a_timeout_that_is_not_a_positive_finite_number_is_refused_everywhere(bad):
    with pytest.raises(ValueError, match="timeout"):
        ConversationSession(backend=FakeBackend(), timeout=bad)
    with ConversationSession(backend=FakeBackend()) as session:
        with pytest.raises(ValueError, match="timeout"):
            session.timeout = bad
        assert session.timeout == 60.0  # unchanged
        session.timeout = None  # no limit is allowed
        assert session.timeout is None
        with pytest.raises(ValueError, match="tts_wait_timeout"):
            session.tts_wait_timeout = bad
        with pytest.raises(ValueError, match="max_tokens"):
            session.max_tokens = 0


@pytest.mark.parametrize("text", ["nan", "inf", "-1", "soon"])
def test_both_command_lines_refuse_a_timeout_that_is_not_a_number_of_seconds(text, capsys):
    with pytest.raises(SystemExit) as chat_exit:
        parse_args(["--timeout", text])
    assert chat_exit.value.code == 2
    with pytest.raises(SystemExit) as serve_exit:
        build_parser().parse_args(["--timeout", text])
    assert serve_exit.value.code == 2
    assert parse_args(["--timeout", "0"]).timeout is None  # 0: no limit, on both
    assert build_parser().parse_args(["--timeout", "0"]).timeout is None


def test_the_async_session_can_change_its_system_prompt_between_turns(sessions_dir):
    async def main() -> None:
        fake = FakeBackend()
        async with AsyncConversationSession(backend=fake) as s:
            s.system_prompt = "You are a pirate."
            await s.chat("hi")
            assert fake.requests[-1].messages[0] == {"role": "system", "content": "You are a pirate."}
            async with s.stream("tell me more") as turn:
                async for _ in turn:
                    with pytest.raises(SessionError, match="between turns"):
                        s.system_prompt = "no"
                    break
            sid = s.session_id
        with ConversationSession(backend=FakeBackend()) as again:
            again.load_history(sid)
            assert again.system_prompt == "You are a pirate."

    asyncio.run(main())


def test_the_flags_both_command_lines_share_are_declared_once_and_agree():
    """--backend, --model, --base-url, --kv-type, --system, --max-tokens, --memory, --timeout,
    --durability, --tts-voice, --tts-rate: the same choices, defaults and validation on both."""
    chat = {a.dest: a for a in __import__("conversation_session.cli._args", fromlist=["build_parser"])
            .build_parser()._actions}
    serve = {a.dest: a for a in build_parser()._actions}
    for dest in ("backend", "model", "base_url", "kv_type", "system", "max_tokens", "memory", "timeout", "durability",
                 "tts_voice", "tts_rate"):
        a, b = chat[dest], serve[dest]
        assert (a.default, a.choices, a.type, a.help) == (b.default, b.choices, b.type, b.help), dest
    for argv in (["--max-tokens", "0"], ["--tts-rate", "-5"], ["--memory", "forever"], ["--kv-type", "q3"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)


def test_the_one_signature_and_the_options_object_agree():
    """Both sessions take their arguments through one constructor whose parameters are exactly
    SessionOptions' fields, with the same defaults (a drift check, as for a generated twin)."""
    import dataclasses
    import inspect

    from conversation_session.session._options import SessionOptions

    for cls in (ConversationSession, AsyncConversationSession):
        params = list(inspect.signature(cls).parameters.values())
        fields = dataclasses.fields(SessionOptions)
        assert [p.name for p in params] == [f.name for f in fields], cls
        for p, f in zip(params, fields, strict=True):
            assert p.default == f.default, (cls, p.name)
    assert inspect.signature(ConversationSession) == inspect.signature(AsyncConversationSession)
    with pytest.raises(ValueError, match="memory"):
        AsyncConversationSession(backend=FakeBackend(), memory="forever")
    with pytest.raises(TypeError):
        ConversationSession(backend=FakeBackend(), no_such_option=1)
