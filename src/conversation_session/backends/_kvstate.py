"""The on-disk form of a saved KV cache (``<session_id>.kv``), trusted only after checking.

Layout: ``b"CSKV"``, a little-endian u32 header length, the header as JSON, then the payload
(llama.cpp's sequence state: the used KV cells of sequence 0, nothing else).

The header says what the cells are worth: the model they were computed with (fingerprint),
the context size, how many tokens they hold and a hash of those token ids, and a checksum of
the payload.  A reader uses the cells only if every one of these matches what it is about to
compute; otherwise the cells would answer for a different conversation, so it prefills again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import zlib
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..stores._crypto import open_kv, seal_kv
from ..stores._fileio import atomic_write_bytes, read_regular_file

__all__ = ["KV_FORMAT", "KVStateError", "enforce_cap", "read_kv_file", "tokens_digest", "write_kv_file"]

KV_FORMAT = 1
_MAGIC = b"CSKV"
_MAX_HEADER = 64 * 1024


class KVStateError(Exception):
    """A saved KV cache that cannot be used; the message says why (it is logged, not raised)."""


def tokens_digest(tokens: Sequence[int]) -> str:
    return hashlib.sha256(array("i", tokens).tobytes()).hexdigest()


def write_kv_file(path: Path, header: dict[str, Any], payload: memoryview | bytes) -> int:
    """Write header and payload atomically; returns the file size."""
    header = {**header, "format": KV_FORMAT, "payload_bytes": len(payload),
              "payload_crc32": zlib.crc32(payload)}
    head = json.dumps(header, sort_keys=True).encode()
    data = b"".join((_MAGIC, struct.pack("<I", len(head)), head, payload))
    data = seal_kv(path, data)  # encrypted when the session's folder has a key (docs/encryption.md)
    atomic_write_bytes(path, data)
    return len(data)


def read_kv_file(path: Path, max_bytes: int) -> tuple[dict[str, Any], memoryview]:
    """Read and verify a KV file's framing and checksum.

    Raises:
        FileNotFoundError: there is none.
        KVStateError: it is damaged, truncated, of another format or too large.
    """
    try:
        raw = read_regular_file(path, max_bytes)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise KVStateError(f"cannot read {path.name}: {exc.strerror or exc}") from exc
    try:
        raw = open_kv(path, raw)
    except ValueError as exc:
        raise KVStateError(str(exc)) from None
    if len(raw) < 8 or raw[:4] != _MAGIC:
        raise KVStateError(f"{path.name} is not a KV cache file")
    (head_len,) = struct.unpack_from("<I", raw, 4)
    if head_len > _MAX_HEADER or 8 + head_len > len(raw):
        raise KVStateError(f"{path.name} has a damaged header")
    try:
        header = json.loads(raw[8:8 + head_len])
    except ValueError as exc:
        raise KVStateError(f"{path.name} has a damaged header") from exc
    if not isinstance(header, dict) or header.get("format") != KV_FORMAT:
        raise KVStateError(f"{path.name} is format {header.get('format') if isinstance(header, dict) else '?'}, "
                           f"not {KV_FORMAT}")
    payload = memoryview(raw)[8 + head_len:]  # writable (a bytearray): llama.cpp reads it in place
    if len(payload) != header.get("payload_bytes"):
        raise KVStateError(f"{path.name} is truncated ({len(payload)} of {header.get('payload_bytes')} bytes)")
    if zlib.crc32(payload) != header.get("payload_crc32"):
        raise KVStateError(f"{path.name} fails its checksum")
    return header, payload


def enforce_cap(directory: Path, cap_bytes: int, *, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used ``*.kv`` files until they total at most ``cap_bytes``.

    Recency is the file's mtime, which a restore refreshes.  ``keep`` (the file just written)
    is never evicted.  Returns the evicted paths.
    """
    files = []
    for entry in os.scandir(directory):
        if entry.name.endswith(".kv") and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                files.append((st.st_mtime, st.st_size, Path(entry.path)))
    total = sum(size for _, size, _ in files)
    evicted = []
    for _mtime, size, path in sorted(files):
        if total <= cap_bytes:
            break
        if keep is not None and path == keep:
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            evicted.append(path)
        total -= size
    return evicted
