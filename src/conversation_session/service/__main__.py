"""``python -m conversation_session.service``."""

from . import main

raise SystemExit(main())
