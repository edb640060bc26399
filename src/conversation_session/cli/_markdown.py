"""Markdown for a completed reply on a terminal, with no renderer beyond this file.

The reply streams as plain text; once complete, if it uses Markdown (code fences, headings,
lists, emphasis, inline code) and still fits on the screen, the app rewrites it in place,
styled: headings and **bold** in bold, *emphasis* in italics, code in cyan under a rule with
the fence's language.  Piped output is never rendered, so scripts get the text exactly.
This is deliberately small: enough to make chat replies readable, not a CommonMark engine.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from prompt_toolkit.utils import get_cwidth

__all__ = ["looks_like_markdown", "render_markdown", "screen_rows"]

Style = Callable[..., str]

_FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+.-]*)\s*$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^(\s*)[-*+]\s+(.*)$")
_INLINE = re.compile(r"`([^`\n]+)`|\*\*(?=\S)(.+?)(?<=\S)\*\*|__(?=\S)(.+?)(?<=\S)__|"
                     r"(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![\w*])")
_SIGNS = re.compile(r"^\s*(```|~~~|#{1,6}\s|[-*+]\s)|`[^`\n]+`|\*\*\S.*?\S\*\*", re.MULTILINE)


def looks_like_markdown(text: str) -> bool:
    return bool(_SIGNS.search(text))


def _inline(line: str, style: Style) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group(1) is not None:
            return style(m.group(1), "cyan")
        if m.group(2) is not None or m.group(3) is not None:
            return style(m.group(2) or m.group(3), "bold")
        return style(m.group(4), "italic")

    return _INLINE.sub(sub, line)


def render_markdown(text: str, style: Style) -> str:
    """``text`` (already made printable) with Markdown shown as styles."""
    out: list[str] = []
    fence: str | None = None
    for line in text.split("\n"):
        m = _FENCE.match(line)
        if m and (fence is None or m.group(1) == fence):
            if fence is None:
                fence = m.group(1)
                out.append(style("── " + m.group(2) if m.group(2) else "──", "dim"))
            else:
                fence = None
                out.append(style("──", "dim"))
            continue
        if fence is not None:
            out.append(style(line, "cyan"))
            continue
        if h := _HEADING.match(line):
            out.append(style(_inline(h.group(2), style), "bold"))
        elif b := _BULLET.match(line):
            out.append(f"{b.group(1)}• {_inline(b.group(2), style)}")
        else:
            out.append(_inline(line, style))
    return "\n".join(out)


def screen_rows(text: str, columns: int) -> int:
    """Rows ``text`` takes on a terminal ``columns`` wide (wide characters count double)."""
    columns = max(columns, 1)
    return sum(max(1, -(-get_cwidth(line) // columns)) for line in text.split("\n"))
