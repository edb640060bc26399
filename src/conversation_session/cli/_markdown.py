"""Markdown for a completed reply on a terminal, with no renderer beyond this file.

The reply streams as plain text; once complete, if it uses Markdown (code fences, headings,
lists, emphasis, inline code) and still fits on the screen, the app rewrites it in place,
styled: headings and **bold** in bold, *emphasis* in italics, code in cyan under a rule with
the fence's language.  Piped output is never rendered, so scripts get the text exactly.
This is deliberately small: enough to make chat replies readable, not a CommonMark engine.

Code blocks whose fence names a language Pygments knows (```python, ```sh, ...) are
highlighted when Pygments is installed (the ``all`` extra brings it); without it, or for a
language it does not know, they stay cyan.  Highlighting never adds or removes a character
or a line, so the rows the app counts to rewrite the reply in place stay right.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from prompt_toolkit.utils import get_cwidth

__all__ = ["Highlight", "looks_like_markdown", "pygments_highlighter", "render_markdown", "screen_rows"]

Style = Callable[..., str]
# (code, language) -> the code's lines with terminal colours, or None to leave it plain.
Highlight = Callable[[str, str], "list[str] | None"]

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


def pygments_highlighter() -> Highlight | None:
    """Pygments' terminal colours for a code block, or None when Pygments is not installed."""
    try:
        from pygments import highlight
        from pygments.formatters import TerminalFormatter
        from pygments.lexers import get_lexer_by_name
        from pygments.util import ClassNotFound
    except ImportError:
        return None
    formatter = TerminalFormatter()

    def highlight_block(code: str, language: str) -> list[str] | None:
        try:
            lexer = get_lexer_by_name(language, stripnl=False, stripall=False, ensurenl=False)
        except ClassNotFound:
            return None
        lines = highlight(code, lexer, formatter).split("\n")
        if lines and lines[-1] == "" and len(lines) == code.count("\n") + 2:
            lines.pop()  # a formatter that ends the text with a newline of its own
        return lines if len(lines) == code.count("\n") + 1 else None  # never shift a line

    return highlight_block


def _code(lines: list[str], language: str, style: Style, highlight: Highlight | None) -> list[str]:
    if highlight is not None and language and lines:
        try:
            coloured = highlight("\n".join(lines), language)
        except Exception:  # noqa: BLE001 - a lexer's bug must not lose the reply: show it plain
            coloured = None
        if coloured is not None:
            return coloured
    return [style(line, "cyan") for line in lines]


def render_markdown(text: str, style: Style, highlight: Highlight | None = None) -> str:
    """``text`` (already made printable) with Markdown shown as styles; ``highlight`` colours
    code blocks that name their language (see ``pygments_highlighter``)."""
    out: list[str] = []
    fence: str | None = None
    language = ""
    code: list[str] = []
    for line in text.split("\n"):
        m = _FENCE.match(line)
        if m and (fence is None or m.group(1) == fence):
            if fence is None:
                fence, language, code = m.group(1), m.group(2), []
                out.append(style("── " + m.group(2) if m.group(2) else "──", "dim"))
            else:
                fence = None
                out.extend(_code(code, language, style, highlight))
                out.append(style("──", "dim"))
            continue
        if fence is not None:
            code.append(line)
            continue
        if h := _HEADING.match(line):
            out.append(style(_inline(h.group(2), style), "bold"))
        elif b := _BULLET.match(line):
            out.append(f"{b.group(1)}• {_inline(b.group(2), style)}")
        else:
            out.append(_inline(line, style))
    if fence is not None:  # a block left open (a reply cut short)
        out.extend(_code(code, language, style, highlight))
    return "\n".join(out)


def screen_rows(text: str, columns: int) -> int:
    """Rows ``text`` takes on a terminal ``columns`` wide (wide characters count double)."""
    columns = max(columns, 1)
    return sum(max(1, -(-get_cwidth(line) // columns)) for line in text.split("\n"))
