"""Encryption at rest for the file store (docs/encryption.md).

The user's key (32 bytes, from ``encryption_key=``, ``--key-file`` or
``$CONVERSATION_SESSION_KEY_FILE``) never encrypts history itself: each session gets its own
random *data key*, stored only wrapped by the user's key (AES-256-GCM, bound to the session
id): in a *keystore* outside the session files (``_keystore.py``; the files then hold a
``keystore:<entry id>`` reference), so deleting a session destroys its data key and copies of
its files in backups become unreadable; or, in the first format (still read, and what a keyring
without a keystore writes: the PostgreSQL store by default), inline in the session's own files.

Formats (both authenticated with AES-256-GCM from the ``cryptography`` package):

* snapshot: one plaintext JSON header line (format marker, session id, wrapped data key), then
  the 12-byte nonce and the ciphertext of the whole plaintext snapshot, with the header line as
  associated data (so the header cannot be altered either);
* journal line: ``{"enc": 1, "key": <wrapped data key>, "data": <nonce + ciphertext>}`` (base64),
  the session id and the line's position in the journal as associated data: a line moved to
  another session, or to another place in the journal, fails authentication.

The headers say "encrypted" without the key, so ``doctor`` and listings never call such a file
corrupt.  Only this module knows the formats; ``_file.py`` calls it at its read and write points.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import stat
import struct
import sys
import threading
from pathlib import Path
from typing import Any

from .._exceptions import EncryptionKeyError, SessionError, SessionFormatError

__all__ = [
    "KEYSTORE_REF",
    "KEY_BYTES",
    "KEY_ENV",
    "Keyring",
    "SessionCipher",
    "is_encrypted_journal",
    "is_encrypted_snapshot",
    "keygen",
    "load_key",
    "open_journal",
    "open_kv",
    "open_snapshot",
    "register_directory",
    "seal_kv",
    "snapshot_header",
    "unb64",
]

logger = logging.getLogger("conversation_session.store")

KEY_BYTES = 32
KEY_ENV = "CONVERSATION_SESSION_KEY_FILE"
FORMAT = "conversation-session-encrypted"
SNAPSHOT_MAGIC = b'{"format": "' + FORMAT.encode() + b'"'
JOURNAL_MAGIC = b'{"enc": 1, '
KEYSTORE_REF = "keystore:"
"""A key field ``keystore:<key id>.<entry id>`` names a data key kept in the keystore, wrapped by
the user's key of that id."""
_NONCE = 12
_KEY_ID = 8
_CRYPTO_HINT = "encryption needs the crypto extra: pip install 'conversation-session[crypto]'"


def _aead(key: bytes) -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as exc:  # pragma: no cover - the extra is installed in CI
        raise SessionError(_CRYPTO_HINT) from exc
    return AESGCM(key)


def _invalid_tag() -> type[Exception]:
    from cryptography.exceptions import InvalidTag
    return InvalidTag


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: object) -> bytes:
    """Strict base64 (``ValueError`` or ``binascii.Error`` for anything else): one C call where
    the interpreter has the strict mode (3.11+), else a check of the alphabet first."""
    if not isinstance(text, str):
        raise ValueError("not base64 text")
    if _STRICT_B64:
        return binascii.a2b_base64(text, strict_mode=True)  # type: ignore[call-arg]  # (3.11+; mypy checks as 3.10)
    return base64.b64decode(text.encode("ascii"), validate=True)  # pragma: no cover - Python 3.10


_STRICT_B64 = sys.version_info >= (3, 11)


# -- the user's key ----------------------------------------------------------------------------
def keygen(path: str | os.PathLike[str]) -> Path:
    """Write a new random key file at ``path`` (32 bytes, mode 0600); never overwrites one."""
    target = Path(path)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        raise SessionError(f"{target} already exists; a key file is never overwritten (sessions encrypted "
                           "with it would become unreadable): choose another path") from None
    except OSError as exc:
        raise SessionError(f"cannot create the key file {target}: {exc.strerror or exc}") from exc
    try:
        data = os.urandom(KEY_BYTES)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        target.unlink(missing_ok=True)
        raise SessionError(f"cannot write the key file {target}: {exc.strerror or exc}") from exc
    os.close(fd)
    return target


def load_key(value: bytes | str | os.PathLike[str] | None) -> bytes | None:
    """The 32 key bytes from ``value`` (the bytes, or a key file's path), else from the file
    named by ``$CONVERSATION_SESSION_KEY_FILE``; None when neither gives one."""
    source = "encryption_key"
    if value is None:
        env = os.environ.get(KEY_ENV, "").strip()
        if not env:
            return None
        value, source = env, f"${KEY_ENV}"
    if isinstance(value, (bytes, bytearray, memoryview)):
        key = bytes(value)
        if len(key) != KEY_BYTES:
            raise ValueError(f"{source} must be {KEY_BYTES} bytes, not {len(key)}; "
                             "make a key file with `conversation-session keygen PATH`")
        return key
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{source} must be {KEY_BYTES} bytes or a key file's path, not {type(value).__name__}")
    path = Path(value).expanduser()
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise SessionError(f"{source}: {path} is not a regular file")
        key = path.read_bytes()[:KEY_BYTES + 1]
    except OSError as exc:
        raise SessionError(f"{source}: cannot read the key file {path}: {exc.strerror or exc}") from exc
    if len(key) != KEY_BYTES:
        raise SessionError(f"{source}: {path} is not a key file ({KEY_BYTES} bytes expected); "
                           "make one with `conversation-session keygen PATH`")
    if st.st_mode & 0o077:
        logger.warning("key file %s can be read by other users (mode %o); chmod 600 it", path, st.st_mode & 0o777)
    return key


class Keyring:
    """The user's key: wraps and unwraps the sessions' data keys.

    With a ``keystore`` (``_keystore.Keystore``), new sessions' wrapped data keys are kept there
    and their files name them by reference; without one (the PostgreSQL store by default) they travel
    inline, as ``new_cipher``'s ``wrapped``."""

    def __init__(self, key: bytes, keystore: Any = None):
        self.keystore = keystore
        self._aead = _aead(key)
        self.key_id = _key_id(key)
        self._unwrapped: dict[tuple[bytes, str], bytes] = {}
        self._readers: dict[bytes, Any] = {self.key_id: self._aead}

    def reads(self, key_id: bytes) -> bool:
        """True if this keyring opens data keys wrapped by the key of ``key_id``."""
        return key_id in self._readers

    def also_read_with(self, key: bytes) -> None:
        """Also open data keys wrapped by ``key`` (``rekey``: sessions still under the old key)."""
        self._readers.setdefault(_key_id(key), _aead(key))

    def new_cipher(self, session_id: str, *, inline: bool = False) -> SessionCipher:
        """A fresh data key for a new session (kept in the keystore, if this keyring has one);
        ``inline``: carried in the file itself, wrapped, for a file that must open on its own
        (a sealed export, a KV file with no keystore key)."""
        data_key = os.urandom(KEY_BYTES)
        nonce = os.urandom(_NONCE)
        wrapped = self.key_id + nonce + self._aead.encrypt(nonce, data_key, _wrap_ad(session_id))
        if self.keystore is not None and not inline:
            return self.keystore.new_cipher(session_id, data_key, wrapped)
        return SessionCipher(session_id, data_key, wrapped)

    def cipher(self, wrapped: bytes, session_id: str, where: str) -> SessionCipher:
        """The session's cipher from its wrapped data key; ``EncryptionKeyError`` for another key."""
        return SessionCipher(session_id, self.unwrap(wrapped, session_id, where), wrapped)

    def cipher_for(self, field: str, session_id: str, where: str) -> SessionCipher:
        """The cipher a file's key field names: a wrapped key inline, or a keystore reference."""
        if field.startswith(KEYSTORE_REF):
            if self.keystore is None:
                raise EncryptionKeyError(f"{where}: its data key is kept in a keystore; give the keystore "
                                         "(keystore=..., --keystore DIR or URL, or $CONVERSATION_SESSION_KEYSTORE)")
            return self.keystore.cipher(self, field[len(KEYSTORE_REF):], session_id, where)
        return self.cipher(unb64(field), session_id, where)

    def kv_cipher(self, stem: str) -> SessionCipher:
        """The cipher a KV file is sealed with: its session's keystore data key when there is
        one (so deleting the session makes the KV file unreadable too), else a fresh data key
        of its own, carried inline in the KV file."""
        found = self.keystore.kv_cipher(self, stem) if self.keystore is not None else None
        return found if found is not None else self.new_cipher(f"kv\0{stem}", inline=True)

    def unwrap(self, wrapped: bytes, session_id: str, where: str) -> bytes:
        """The data key inside ``wrapped``; ``EncryptionKeyError`` for another key."""
        cached = self._unwrapped.get((wrapped, session_id))
        if cached is None:
            reader = self._readers.get(wrapped[:_KEY_ID])
            if reader is None:
                raise EncryptionKeyError(f"{where} is encrypted with another key (key id {wrapped[:_KEY_ID].hex()}, "
                                         f"this key's is {self.key_id.hex()}); give the key it was written with")
            body = wrapped[_KEY_ID:]
            try:
                cached = reader.decrypt(body[:_NONCE], body[_NONCE:], _wrap_ad(session_id))
            except _invalid_tag():
                raise SessionFormatError(f"{where}: its data key fails authentication (altered, or copied from "
                                         "another session); refused") from None
            if len(self._unwrapped) > 4096:
                self._unwrapped.clear()
            self._unwrapped[(wrapped, session_id)] = cached
        return cached

    def seal(self, data: bytes, label: bytes) -> str:
        """Small data under the user's key itself (the listing cache's entries)."""
        nonce = os.urandom(_NONCE)
        return _b64(nonce + self._aead.encrypt(nonce, data, label))

    def unseal(self, text: str, label: bytes) -> bytes | None:
        try:
            blob = unb64(text)
            return bytes(self._aead.decrypt(blob[:_NONCE], blob[_NONCE:], label))
        except (ValueError, binascii.Error, _invalid_tag()):
            return None


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"conversation-session key id\0" + key).digest()[:_KEY_ID]


def _wrap_ad(session_id: str) -> bytes:
    return b"conversation-session data key\0" + session_id.encode()


def _line_ad(session_id: str, lineno: int) -> bytes:
    return f"conversation-session journal\0{session_id}\0{lineno}".encode()


class SessionCipher:
    """One session's data key: seals its snapshot and journal lines.

    ``field`` is what its files hold in their key field: the wrapped key in base64 (inline), or
    a keystore reference."""

    def __init__(self, session_id: str, data_key: bytes, wrapped: bytes, field: str | None = None):
        self.session_id = session_id
        self.wrapped = wrapped
        self.key_id = wrapped[:_KEY_ID]  # the user's key that wraps it
        self._aead = _aead(data_key)
        self._wrapped_b64 = field if field is not None else _b64(wrapped)
        self.field = self._wrapped_b64

    def seal_snapshot(self, plain: bytes) -> bytes:
        header = snapshot_header(self.session_id, self._wrapped_b64)
        return header + self.seal(plain, header)

    def seal_line(self, plain: bytes, lineno: int) -> bytes:
        """A journal line (``plain`` without its newline) sealed at position ``lineno`` (1-based)."""
        blob = self.seal(plain, _line_ad(self.session_id, lineno))
        return JOURNAL_MAGIC + f'"key": "{self._wrapped_b64}", "data": "{_b64(blob)}"}}\n'.encode()

    def open_snapshot_body(self, header: bytes, body: bytes, where: str) -> bytes:
        try:
            return bytes(self._aead.decrypt(body[:_NONCE], body[_NONCE:], header))
        except _invalid_tag():
            raise SessionFormatError(f"{where} fails authentication: it was altered (or cut off); refused, "
                                     "nothing loaded from it") from None

    def seal(self, plain: bytes, ad: bytes) -> bytes:
        """``plain`` under the data key (a fresh nonce + the ciphertext), bound to ``ad``: every
        seal of this module (snapshots, journal lines, KV files) and PostgreSQL's columns."""
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, plain, ad)

    def open(self, blob: bytes, ad: bytes, where: str) -> bytes:
        """What ``seal`` sealed with the same ``ad``; ``SessionFormatError`` if it was altered."""
        try:
            return bytes(self._aead.decrypt(blob[:_NONCE], blob[_NONCE:], ad))
        except (_invalid_tag(), ValueError):
            raise SessionFormatError(f"{where} fails authentication: altered, or moved from another row or "
                                     "session; refused, nothing loaded from it") from None

    def open_line(self, blob: bytes, lineno: int, where: str) -> bytes:
        try:
            return bytes(self._aead.decrypt(blob[:_NONCE], blob[_NONCE:], _line_ad(self.session_id, lineno)))
        except _invalid_tag():
            raise SessionFormatError(f"{where} line {lineno} fails authentication: altered, reordered or moved "
                                     "from another session; refused, nothing loaded from it") from None


def snapshot_header(session_id: str, wrapped_b64: str) -> bytes:
    return (f'{{"format": "{FORMAT}", "version": 1, "cipher": "AES-256-GCM", '
            f'"session_id": {json.dumps(session_id)}, "data_key": "{wrapped_b64}"}}\n').encode()


def is_encrypted_snapshot(raw: bytes | bytearray) -> bool:
    return bytes(raw[:len(SNAPSHOT_MAGIC)]) == SNAPSHOT_MAGIC


def is_encrypted_journal(raw: bytes | bytearray) -> bool:
    return bytes(raw[:len(JOURNAL_MAGIC)]) == JOURNAL_MAGIC


def _need(keyring: Keyring | None, where: str) -> Keyring:
    if keyring is None:
        raise EncryptionKeyError(f"{where} is encrypted; give its key (encryption_key=..., --key-file PATH or "
                                 f"${KEY_ENV})")
    return keyring


def open_snapshot(raw: bytes | bytearray, session_id: str, keyring: Keyring | None,
                  where: str) -> tuple[bytes, SessionCipher]:
    """The plaintext of an encrypted snapshot and the session's cipher."""
    keys = _need(keyring, where)
    end = raw.find(b"\n")
    try:
        if end < 0:
            raise ValueError("no header line")
        header = bytes(raw[:end + 1])
        head = json.loads(header)
        if not isinstance(head, dict) or head.get("version") != 1:
            raise ValueError("unknown encrypted format version")
        field = _key_field(head.get("data_key"))
    except (ValueError, binascii.Error) as exc:
        raise SessionFormatError(f"{where}: damaged encrypted header ({exc}); refused") from None
    if head.get("session_id") != session_id:
        raise SessionFormatError(f"{where} is session {head.get('session_id')!r}'s, not {session_id}'s; refused")
    cipher = keys.cipher_for(field, session_id, where)
    return cipher.open_snapshot_body(header, bytes(raw[end + 1:]), where), cipher


def open_journal(raw: bytes | bytearray, session_id: str, keyring: Keyring | None, where: str,
                 encrypted_session: bool) -> tuple[bytes, SessionCipher | None]:
    """The journal with each encrypted line replaced by its plaintext (same line numbers), and
    the session's cipher if any line was encrypted.

    A well-formed line that fails authentication, or a plaintext line in an encrypted session,
    is refused (``SessionFormatError``): it can only be an alteration.  A line too damaged to
    parse is passed through unchanged, so loading treats it as it treats any damaged line (a
    torn last line left by a crash is ignored)."""
    if not raw or (not encrypted_session and JOURNAL_MAGIC not in raw):
        return bytes(raw), None
    lines = bytes(raw).split(b"\n")
    # A session is encrypted by its snapshot or a complete encrypted line; a torn last line alone
    # (garbage after a crash, or bytes that merely look like one) does not make it so.
    if not encrypted_session and not any(line.startswith(JOURNAL_MAGIC) for line in lines[:-1]):
        return bytes(raw), None
    cipher: SessionCipher | None = None
    out: list[bytes] = []
    for n, line in enumerate(lines, 1):
        complete = n < len(lines)
        if not line.startswith(JOURNAL_MAGIC):
            if complete and line.strip() and _is_json_object(line):
                raise SessionFormatError(f"{where} line {n} is not encrypted in an encrypted session: "
                                         "it was added by someone else; refused")
            out.append(line)  # blank, or damaged (a crash): replay reports it
            continue
        try:
            entry = json.loads(line)
            field, blob = _key_field(entry["key"]), unb64(entry["data"])
        except (ValueError, KeyError, TypeError, binascii.Error):
            out.append(line)  # damaged: replay reports it (torn if last)
            continue
        keys = _need(keyring, where)
        if cipher is None or cipher.field != field:
            cipher = keys.cipher_for(field, session_id, f"{where} line {n}")
        out.append(cipher.open_line(blob, n, where))
    return b"\n".join(out), cipher


def _key_field(value: object) -> str:
    """A file's key field, checked: base64 (a wrapped key) or a keystore reference."""
    if isinstance(value, str) and value.startswith(KEYSTORE_REF):
        ref = value[len(KEYSTORE_REF):]  # <key id>.<entry id>, 16 hex digits each
        if len(ref) != 33 or ref[16] != "." or not all(c in "0123456789abcdef" for c in ref[:16] + ref[17:]):
            raise ValueError("not a keystore reference")
        return value
    unb64(value)
    return value  # type: ignore[return-value]


def _is_json_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):
        return False


# -- KV cache files ----------------------------------------------------------------------------
# The backends write ``<id>.kv`` beside the session without knowing about stores or keys; a
# folder whose store has a key is registered here, and the KV file's bytes are sealed on their
# way to the disk (``_kvstate``), each file under a fresh data key wrapped like a session's.
_KV_MAGIC = b"CSKE"
_kv_lock = threading.Lock()
_kv_keys: dict[str, Keyring] = {}


def register_directory(directory: Path, keyring: Keyring) -> None:
    """KV files written into ``directory`` (by this process) are encrypted with ``keyring``."""
    with _kv_lock:
        _kv_keys[str(directory)] = keyring


def _kv_keyring(path: Path) -> Keyring | None:
    with _kv_lock:
        return _kv_keys.get(os.path.abspath(path.parent))


def _kv_ad(path: Path) -> bytes:
    return b"conversation-session kv\0" + path.stem.encode()


def seal_kv(path: Path, data: bytes) -> bytes:
    """``data`` as written to ``path``: encrypted if its folder is registered, else unchanged."""
    keys = _kv_keyring(path)
    if keys is None:
        return data
    cipher = keys.kv_cipher(path.stem)
    head = json.dumps({"format": FORMAT + "-kv", "version": 1, "cipher": "AES-256-GCM",
                       "data_key": cipher._wrapped_b64}).encode()
    header = _KV_MAGIC + struct.pack("<I", len(head)) + head
    return header + cipher.seal(data, header + _kv_ad(path))


def open_kv(path: Path, raw: bytearray) -> bytearray:
    """The plaintext of a KV file's bytes (unchanged if not encrypted).

    Raises ``ValueError`` (the caller treats the file as unusable: the history is prefilled
    again) for an encrypted file without its key, with another key, or altered."""
    if raw[:4] != _KV_MAGIC:
        return raw
    keys = _kv_keyring(path)
    if keys is None:
        raise ValueError(f"{path.name} is encrypted and no key was given")
    try:
        (head_len,) = struct.unpack_from("<I", raw, 4)
        header = bytes(raw[:8 + head_len])
        field = _key_field(json.loads(header[8:])["data_key"])
        sid = path.stem if field.startswith(KEYSTORE_REF) else f"kv\0{path.stem}"
        cipher = keys.cipher_for(field, sid, path.name)
        body = memoryview(raw)[8 + head_len:]
        return bytearray(cipher._aead.decrypt(bytes(body[:_NONCE]), bytes(body[_NONCE:]), header + _kv_ad(path)))
    except (SessionError, ValueError, KeyError, TypeError, struct.error, binascii.Error, _invalid_tag()) as exc:
        raise ValueError(f"{path.name} cannot be decrypted ({exc or 'altered'})") from None
