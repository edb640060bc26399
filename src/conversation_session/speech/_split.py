"""Text handling for speech: sentences out of a stream, language runs by script, speakable text.

All of it is pure string work, so the chat thread can call it for every streamed piece.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["Sentence", "SentenceSplitter", "clean_for_speech", "script_runs", "split_sentence_spans",
           "split_sentences"]

# End a sentence wherever they stand (Chinese text puts no space after them).
_CJK_ENDS = frozenset("。！？")
# End a sentence only when followed by whitespace (or a Han character): "3.14", "x.com", "Yahoo!Japan" stay whole.
_ASCII_ENDS = frozenset(".!?")
# Belong to the sentence they follow: '…" she said.' keeps its closing quote.
_CLOSERS = frozenset("\"'”’）)]】」』》")
_OPENERS = "\"'“‘([{（【「『《"
# Where an over-long sentence may be cut, so a reply without full stops still starts speaking early.
_SOFT_BREAKS = frozenset("，、；：,;:")
# A period after these does not end a sentence ("e.g. this", "Dr. Li").  Tokens with an inner dot
# ("i.e", "U.S", "a.m") are treated the same way.  "etc." and "no." are left out: they often end one.
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "cf", "fig", "approx"})
_LAST_TOKEN = re.compile(r"(\S+)$")
_MARKUP = re.compile(r"[*#`|~^\\]+|^\s*(?:>+|[-+•]\s)", re.MULTILINE)


class Sentence(NamedTuple):
    """A speakable sentence and where it stands in the streamed text: ``stream[start:end] == text``.

    The offsets count from the splitter's last ``reset()``, so the part of a reply that was heard
    can be cut out of the reply exactly as it was streamed (Markdown and all).
    """

    text: str
    start: int
    end: int


def _is_han(ch: str) -> bool:
    o = ord(ch)
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF
            or 0x20000 <= o <= 0x3FFFF)


class SentenceSplitter:
    """Cut a streamed text into sentences as soon as each one is complete.

    ``feed(piece)`` returns the sentences that piece completed; ``flush()`` returns what is left
    once the text is complete.  A boundary needs the character after the punctuation (is "3."
    followed by "14"?), so a sentence is released when the next piece starts, at the latest.

    Args:
        max_chars: a sentence longer than this is cut at its last comma (or space), so that a
            reply written without full stops does not keep the speaker waiting.
    """

    def __init__(self, max_chars: int = 200):
        if max_chars < 20:
            raise ValueError(f"max_chars must be at least 20, not {max_chars!r}")
        self.max_chars = max_chars
        self._buf = ""
        self._pos = 0  # everything before _pos has been scanned and holds no boundary
        self._base = 0  # offset of _buf[0] in the text streamed since the last reset()

    def feed(self, piece: str) -> list[str]:
        """Add a streamed piece; return the sentences it completed (stripped, speakable only)."""
        return [s.text for s in self.feed_spans(piece)]

    def flush(self) -> list[str]:
        """The text is complete: return the remaining sentences and start empty."""
        return [s.text for s in self.flush_spans()]

    def feed_spans(self, piece: str) -> list[Sentence]:
        """Like ``feed``, with each sentence's place in the streamed text."""
        if not piece:
            return []
        self._buf += piece
        return self._scan(final=False)

    def flush_spans(self) -> list[Sentence]:
        """Like ``flush``, with each sentence's place in the streamed text."""
        out = self._scan(final=True)
        rest = _speakable([(self._buf, self._base)])
        self.reset()
        return out + rest

    def reset(self) -> None:
        """Drop any partial sentence; offsets count from here again."""
        self._buf = ""
        self._pos = 0
        self._base = 0

    @property
    def pending(self) -> str:
        """The partial sentence not yet released."""
        return self._buf

    def _scan(self, *, final: bool) -> list[Sentence]:
        out: list[tuple[str, int]] = []
        buf = self._buf
        base = self._base
        i = self._pos
        while i < len(buf):
            end = self._boundary(buf, i, final)
            if end is None:  # the next piece decides
                break
            if end < 0:
                i += 1
                continue
            out.append((buf[:end], base))
            buf = buf[end:]
            base += end
            i = 0
        while len(buf) > self.max_chars:
            cut = self._soft_cut(buf)
            out.append((buf[:cut], base))
            buf = buf[cut:]
            base += cut
            i = 0
        self._buf = buf
        self._base = base
        self._pos = min(i, len(buf))
        return _speakable(out)

    def _boundary(self, buf: str, i: int, final: bool) -> int | None:
        """Where the sentence ends if ``buf[i]`` ends it; -1 if it does not; None if unknown yet."""
        ch = buf[i]
        if ch in "\r\n":
            return i + 1
        if ch not in _CJK_ENDS and ch not in _ASCII_ENDS:
            return -1
        j = i + 1
        while j < len(buf) and (buf[j] in _CJK_ENDS or buf[j] in _ASCII_ENDS or buf[j] in _CLOSERS):
            j += 1
        if j == len(buf):
            return j if final else None
        if ch in _CJK_ENDS or any(c in _CJK_ENDS for c in buf[i:j]):
            return j
        nxt = buf[j]
        if not (nxt.isspace() or _is_han(nxt)):
            return -1  # "3.14", "x.com", "Yahoo!Japan"
        if ch == "." and self._period_is_not_an_end(buf, i):
            return -1
        return j

    @staticmethod
    def _period_is_not_an_end(buf: str, i: int) -> bool:
        match = _LAST_TOKEN.search(buf, 0, i)
        if match is None:
            return False
        token = match.group(1).lstrip(_OPENERS)
        if "." in token or token.lower() in _ABBREVIATIONS:
            return True
        # "1. First item": a list number opening the sentence.
        return token.isdigit() and len(token) <= 2 and not buf[: match.start()].strip()

    def _soft_cut(self, buf: str) -> int:
        floor = self.max_chars // 3  # never cut off a tiny fragment
        for marks in (_SOFT_BREAKS, frozenset(" \t")):
            for k in range(self.max_chars - 1, floor, -1):
                if buf[k] in marks:
                    return k + 1
        return self.max_chars


def split_sentences(text: str, max_chars: int = 200) -> list[str]:
    """The speakable sentences of a complete text."""
    splitter = SentenceSplitter(max_chars)
    return splitter.feed(text) + splitter.flush()


def split_sentence_spans(text: str, max_chars: int = 200) -> list[Sentence]:
    """The speakable sentences of a complete text, with their places in it (as a stream would cut them)."""
    splitter = SentenceSplitter(max_chars)
    return splitter.feed_spans(text) + splitter.flush_spans()


def _speakable(parts: list[tuple[str, int]]) -> list[Sentence]:
    # A fragment with no letter or digit ("```", "---", a lone "”") makes no sound worth a process.
    out = []
    for part, base in parts:
        if any(c.isalnum() for c in part):
            text = part.strip()
            start = base + len(part) - len(part.lstrip())
            out.append(Sentence(text, start, start + len(text)))
    return out


def clean_for_speech(text: str) -> str:
    """Drop Markdown marks that a synthesizer would read out ("asterisk asterisk")."""
    return " ".join(_MARKUP.sub(" ", text).split())


def script_runs(text: str, default: str = "en") -> list[tuple[str, str]]:
    """Split ``text`` into ``(language, run)`` pairs by script: Han is ``"cmn"``, other letters ``"en"``.

    Digits, spaces and punctuation stay with the run they are in, so "共 3 个" is one run.
    ``default`` is the language of a text with no letters at all (only digits, say).
    """
    runs: list[tuple[str, str]] = []
    lang: str | None = None
    start = 0
    for k, ch in enumerate(text):
        if _is_han(ch):
            here = "cmn"
        elif ch.isalpha():
            here = "en"
        else:
            continue
        if lang is None:
            lang = here
        elif here != lang:
            runs.append((lang, text[start:k]))
            lang, start = here, k
    runs.append((lang or default, text[start:]))
    return [(code, run.strip()) for code, run in runs if any(c.isalnum() for c in run)]
