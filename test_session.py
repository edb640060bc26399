"""The seed's test script.

    python test_session.py               # the automated suite (pytest, real model included)
    python test_session.py --fast        # the in-process lane: no model, no real processes
    python test_session.py interactive   # 交互式测试: a test chat in a session of its own

Extra arguments after the automated form go to pytest, e.g. `python test_session.py -k timeout`;
after `interactive`, they are the chat's flags, e.g. `--backend ollama --max-tokens 64`.
"""

from _bootstrap import ensure_environment

ensure_environment()

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

INTERACTIVE_FOLDER = "interactive-test"


def interactive(argv: list[str]) -> int:
    """A chat for trying the model by hand, in a new session kept apart from the real ones
    (``<sessions folder>/interactive-test/``): it never continues, or adds to, the user's
    latest session, and `python main.py -c` never picks it up.  Ends with the seed's summary."""
    from conversation_session import setup_logger
    from conversation_session.cli._args import parse_args, sessions_dir_from
    from conversation_session.cli._chat import ChatApp
    from conversation_session.cli._console import Console

    args = parse_args(argv)
    if args.command is not None or args.prompt or args.resume is not None:
        print("usage: python test_session.py interactive [chat flags]  (no PROMPT, --resume or command)",
              file=sys.stderr)
        return 2
    setup_logger(args.log_level, args.log_file)
    args.sessions_dir = str(Path(sessions_dir_from(args)) / INTERACTIVE_FOLDER)
    Console(sys.stderr).line(f"🧪 交互式测试: a test chat in a new session in {args.sessions_dir} "
                             "(your own sessions are not touched); `quit` or Ctrl-D ends it")
    app = ChatApp(args)
    status = app.run()
    summary = app.summary
    if summary is None:
        return status
    print(f"""
    会话ID: {summary['session_id']}
    对话轮次: {summary['turns']}
    消息总数: {summary['total_messages']}
    已保存: {'是' if summary['has_history_file'] else '否'}
    文件: {summary['path']}
    """)
    return status


def automated(args: list[str]) -> int:
    try:
        import pytest
    except ImportError:
        print("The automated tests need pytest, which is not installed in this environment. Run\n"
              "    ./scripts/test\n"
              "instead: it installs the test tools (once) and runs the suite (options go to pytest, "
              "e.g. ./scripts/test -k timeout).", file=sys.stderr)
        return 1
    if "--fast" in args:  # the in-process lane (tests/conftest.py says what is left out)
        args = [a for a in args if a != "--fast"] + ["-m", "not model and not process and not slow"]
    return pytest.main(["-q", *args])


if __name__ == "__main__":
    if sys.argv[1:2] == ["interactive"]:
        sys.exit(interactive(sys.argv[2:]))
    sys.exit(automated(sys.argv[1:]))
