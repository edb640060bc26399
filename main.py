"""The seed's entry point: `python main.py` starts the interactive chat (see --help)."""

from _bootstrap import ensure_environment

ensure_environment()

if __name__ == "__main__":
    import sys

    from conversation_session.cli import main

    sys.exit(main())
