"""The one confirmation rule, for ``sessions delete|prune`` and the chat's ``/delete``.

``--yes`` goes ahead; off a terminal nobody can answer, so the answer is no and the message
says to add ``--yes`` (a script must never delete because a stray "y" was further down its
input); on a terminal the question is asked and only "y" or "yes" goes ahead.
"""

from __future__ import annotations

from collections.abc import Callable

from .._exceptions import SessionError

__all__ = ["NotConfirmed", "confirm"]


class NotConfirmed(SessionError):
    """Deleting needs an answer nobody can give (standard input is not a terminal)."""


def confirm(question: str, *, yes: bool, terminal: bool, ask: Callable[[str], str]) -> bool:
    """True to go ahead.  ``ask(prompt)`` reads the answer (EOF and Ctrl-C mean no).

    Raises:
        NotConfirmed: not on a terminal and no ``yes``.
    """
    if yes:
        return True
    if not terminal:
        raise NotConfirmed("not confirmed: standard input is not a terminal, so nobody can answer; "
                           "add --yes to go ahead")
    try:
        answer = ask(f"{question} [y/N] ")
    except (EOFError, KeyboardInterrupt):
        return False
    return answer.strip().lower() in ("y", "yes")
