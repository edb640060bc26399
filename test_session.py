"""The seed's test script.

    python test_session.py               # the automated suite (pytest, real model included)
    python test_session.py interactive   # a short demo chat on the embedded model, then the summary

Extra arguments after the automated form go to pytest, e.g. `python test_session.py -k timeout`.
"""

from _bootstrap import ensure_environment

ensure_environment()

import sys  # noqa: E402


def interactive() -> int:
    from conversation_session import ConversationSession, SessionTimeoutError

    with ConversationSession(max_tokens=64, timeout=60) as session:
        if session.load_history():
            print(f"✅ 历史已恢复: {session.session_id} ({session.turns} turns)")
        demo = ["My name is Xiaoming and I like Python.", "What is my name?", "我喜欢什么语言？"]
        for text in demo:
            print(f"💬 您: {text}")
            try:
                result = session.chat(text, on_token=lambda p: print(p, end="", flush=True))
                print(f"\n   ({result.completion_tokens} tokens, first after {result.ttft_s:.2f} s, "
                      f"{result.cached_tokens} of {result.prompt_tokens} prompt tokens from the KV cache)")
            except SessionTimeoutError:
                print("\n⏱️  超时了，但对话历史已保留")
        summary = session.get_history_summary()
    print(f"""
    会话ID: {summary['session_id']}
    对话轮次: {summary['turns']}
    消息总数: {summary['total_messages']}
    已保存: {'是' if summary['has_history_file'] else '否'}
    文件: {summary['path']}
    """)
    return 0


def automated(args: list[str]) -> int:
    import pytest

    return pytest.main(["-q", *args])


if __name__ == "__main__":
    if sys.argv[1:2] == ["interactive"]:
        sys.exit(interactive())
    sys.exit(automated(sys.argv[1:]))
