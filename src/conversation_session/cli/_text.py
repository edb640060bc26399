"""Text the app prints: control characters made visible, byte counts and sizes one way."""

from __future__ import annotations

import re

__all__ = ["escape_controls", "format_bytes", "parse_size", "printable"]

# C0 controls except tab and newline, DEL, and the C1 range: any of them can move the cursor,
# retitle or clear the terminal (ESC starts a sequence; in 8-bit terminals, CSI is 0x9b alone).
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_LINE_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _visible(m: re.Match[str]) -> str:
    return f"\\x{ord(m.group()):02x}"


def escape_controls(text: str, *, keep_newlines: bool = True) -> str:
    """``text`` with control characters shown as ``\\x1b`` etc. (tab and newline kept unless
    ``keep_newlines`` is False), so session content printed to a terminal cannot drive it."""
    return (_CONTROLS if keep_newlines else _LINE_CONTROLS).sub(_visible, text)


def printable(text: str, *, keep_newlines: bool = True) -> str:
    """``escape_controls`` plus lone surrogates (from a damaged file) replaced, so printing never fails."""
    return escape_controls(text.encode("utf-8", "replace").decode("utf-8"), keep_newlines=keep_newlines)


def format_bytes(n: int | float) -> str:
    """``512 B``, ``22.4 KB``, ``101.3 MB``, ``1.2 GB`` (powers of 1024, one decimal)."""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1024 or unit == "GB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``200M``, ``1G``, ``512K``, ``1.5GB``, ``1048576`` (bytes); units are powers of 1024.

    Raises ``ValueError`` with a message saying what is accepted.
    """
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise ValueError(f"{text!r} is not a size such as 200M, 1G or 500K")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
