"""The keystore: encrypted sessions' wrapped data keys, kept outside the session files
(docs/encryption.md, "How").

A data key that travels inside a session's files stays readable, with the user's key, in
every backup of them after the session is deleted.  Kept here instead, one small file per data
key, deleting the session deletes the key, and the backup copies become unreadable.

An entry is ``<keystore>/<session id>.<entry id>.key``, one JSON line::

    {"format": "conversation-session-keystore", "version": 1, "session_id": ...,
     "folder": <the sessions folder that wrote it>, "data_key": <wrapped, base64>}

The session's files name it ``keystore:<key id>.<entry id>`` (the key id of the user's key that
wraps it, so that a wrong key is told apart from a deleted session).  The entry id is random, not the session
id alone, because one keystore (the default one, beside the key file) serves every sessions
folder used with that key, whose session ids may coincide, and because ``rekey`` must hold a
session's old and new data keys side by side until its snapshot has changed over.  The wrapped
key is bound to the session id (associated data) as the inline one is, and the entry id is
part of the session files' authenticated headers and lines.

Entries are written (temporary file, fsync, rename, folder fsync) before any session file names
them; removed after the session's files are gone.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from .._exceptions import EncryptionKeyError, SessionError, SessionFormatError
from ._addresses import STORE_ENV, is_postgres_url
from ._crypto import KEY_ENV, KEYSTORE_REF, Keyring, SessionCipher
from ._fileio import atomic_write_bytes, fsync_dir, read_regular_file

__all__ = ["KEYSTORE_ENV", "RECORD_DIR", "Keystore", "KeystoreCipher", "recorded_keystores", "resolve_keystore"]

logger = logging.getLogger("conversation_session.store")

KEYSTORE_ENV = "CONVERSATION_SESSION_KEYSTORE"
FORMAT = "conversation-session-keystore"
ORPHAN_AGE_S = 3600.0
"""``doctor --fix`` removes a key whose session has no file only once it is this old: a session
whose folder was not writable at its first save has its key stored and its files still to come."""
_ENTRY_BYTES = 4096
_REF_RE = re.compile(rb'"(?:data_key|key)": "keystore:[0-9a-f]{16}\.([0-9a-f]{16})"')
# This process's current cipher of each keystore session, by (sessions folder, session id): the
# KV file is sealed under it, whichever store object of the folder registered its key for KV files.
_live: dict[tuple[str, str], KeystoreCipher] = {}
_live_lock = threading.Lock()


def refs_in(raw: bytes | bytearray) -> set[str]:
    """The keystore entry ids a session file's bytes name."""
    return {m.decode() for m in _REF_RE.findall(bytes(raw))}


def _remember(cipher: KeystoreCipher) -> None:
    with _live_lock:
        if len(_live) > 4096:
            _live.clear()  # a bound; a session missing here seals its next KV file with a key of its own
        _live[(cipher.keystore.folder, cipher.session_id)] = cipher


def resolve_keystore(keystore: str | os.PathLike[str] | None, encryption_key: object,
                     sessions_dir: Path) -> tuple[Path | None, bool]:
    """The keystore folder and whether it was named (explicitly, by the environment or beside
    a key file: then it must be creatable now), from ``keystore=``, ``$CONVERSATION_SESSION_KEYSTORE``,
    else ``<key file>.keystore`` for a key given as a file, else ``<sessions_dir>/.keystore``."""

    if keystore is not None:
        if is_postgres_url(keystore):
            raise SessionError("a PostgreSQL keystore (keystore=postgresql://..., --keystore URL) is for the "
                               "PostgreSQL store; a sessions folder keeps its data keys in a folder (--keystore DIR)")
        return Path(os.path.abspath(os.path.expanduser(os.fspath(keystore)))), True
    env = os.environ.get(KEYSTORE_ENV, "").strip()
    if is_postgres_url(env):
        # The PostgreSQL store's keystore: a sessions folder's keys go where they would without it.
        logger.debug("$%s is a PostgreSQL keystore; the folder %s keeps its keys in a folder", KEYSTORE_ENV,
                     sessions_dir)
        env = ""
    if env:
        return Path(os.path.abspath(os.path.expanduser(env))), True
    key_file: object = encryption_key
    if key_file is None:
        key_file = os.environ.get(KEY_ENV, "").strip() or None
    if isinstance(key_file, (str, os.PathLike)):
        # Beside the key file, not in the sessions folder: a backup of the folder then holds no
        # data key, and deleting a session makes its copies unreadable.
        return Path(os.path.abspath(os.path.expanduser(os.fspath(key_file))) + ".keystore"), True
    # The key given as bytes: no other place is known.  Backups of the folder carry the keys.
    return sessions_dir / ".keystore", False


RECORD_DIR = ".keystores"
"""In a sessions folder: one small file per keystore that ever held one of its data keys (its
path), so that deleting a session removes its keys wherever they are, key given or not."""


def recorded_keystores(folder: Path) -> list[Path]:
    """The keystores a sessions folder's data keys were written to (``.keystores/``)."""
    try:
        names = sorted(os.listdir(folder / RECORD_DIR))
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for name in names:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = read_regular_file(folder / RECORD_DIR / name, 4096).decode("utf-8", "surrogateescape").strip()
            if text and os.path.isabs(text):
                out.append(Path(text))
    return out


class Keystore:
    """One keystore folder, as used by one sessions folder's store."""

    def __init__(self, directory: Path, folder: Path, *, create: bool):
        self.directory = directory
        self.folder = str(folder)        # recorded in each entry: whose sessions it serves
        self.also_from: list[Keystore] = []  # rekey: the old key's keystore, read (and emptied) too
        self._recorded = False
        if create:
            self.ensure()

    def __repr__(self) -> str:
        return f"Keystore({str(self.directory)!r})"

    def ensure(self) -> None:
        """Create the keystore folder (0700) if it does not exist yet."""
        if self.directory.is_dir():
            return
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fsync_dir(self.directory.parent)  # the new folder's name, before an entry goes in it
        except OSError as exc:
            raise SessionError(f"cannot create the keystore {self.directory} ({exc.strerror or exc}); give a "
                               f"writable folder with --keystore DIR (keystore=..., ${KEYSTORE_ENV})") from exc

    def _record_in_folder(self) -> None:
        """Note this keystore's place in the sessions folder (``.keystores/<hash>``, one small
        file per keystore, so two processes never rewrite one list), so that a deletion run
        without the key, or with another keystore, still finds and removes the data keys."""
        if self._recorded:
            return
        note = Path(self.folder) / RECORD_DIR / (hashlib.sha256(str(self.directory).encode()).hexdigest()[:16])
        if not note.exists():
            note.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write_bytes(note, str(self.directory).encode("utf-8", "surrogateescape"), mode=0o600)
        self._recorded = True

    def path(self, session_id: str, entry_id: str) -> Path:
        return self.directory / f"{session_id}.{entry_id}.key"

    # -- entries ---------------------------------------------------------------------------
    def put(self, session_id: str, entry_id: str, wrapped: bytes) -> None:
        """Write an entry durably (before any session file names it)."""
        self.ensure()
        self._record_in_folder()
        data = json.dumps({"format": FORMAT, "version": 1, "session_id": session_id, "folder": self.folder,
                           "data_key": base64.b64encode(wrapped).decode("ascii")}) + "\n"
        atomic_write_bytes(self.path(session_id, entry_id), data.encode(), mode=0o600)

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(read_regular_file(path, _ENTRY_BYTES))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise EncryptionKeyError(f"the keystore entry {path} cannot be read ({exc}); the session it "
                                     "holds the data key of cannot be decrypted") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != 1:
            raise EncryptionKeyError(f"{path} is not a keystore entry; the session it belongs to cannot be decrypted")
        return data

    def _entries(self, session_id: str) -> list[tuple[str, Path]]:
        """(entry id, path) of every entry named for ``session_id`` in this keystore."""
        try:
            names = os.listdir(self.directory)
        except (FileNotFoundError, NotADirectoryError):
            return []
        prefix = session_id + "."
        return [(n[len(prefix):-4], self.directory / n) for n in names
                if n.startswith(prefix) and n.endswith(".key") and len(n) == len(prefix) + 20]

    def _remove(self, paths: list[Path]) -> int:
        removed = 0
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        if removed:
            fsync_dir(path.parent)  # the removal itself survives a power cut
        return removed

    def remove_session(self, session_id: str, refs: set[str] | frozenset[str] = frozenset()) -> int:
        """Remove a deleted session's data keys: the entries its files named (``refs``) and
        every other entry this folder wrote for its id (one never named: a crash before its
        first line).  Entries of another folder's session of the same id are left alone."""
        removed = 0
        for store in (self, *self.also_from):
            doomed = []
            for entry_id, path in store._entries(session_id):
                if entry_id in refs or self._ours(path):
                    doomed.append(path)
            removed += store._remove(doomed)
        with _live_lock:
            _live.pop((self.folder, session_id), None)
        return removed

    def drop_others(self, session_id: str, keep: str, refs: set[str]) -> int:
        """After ``rekey``: remove the session's entries other than ``keep`` (the old data keys)."""
        removed = 0
        for store in (self, *self.also_from):
            removed += store._remove([p for e, p in store._entries(session_id)
                                      if e != keep and (e in refs or self._ours(p))])
        return removed

    def _ours(self, path: Path) -> bool:
        try:
            data = self._read(path)
        except EncryptionKeyError:
            return False  # unreadable: leave it, it names no folder
        return data is not None and data.get("folder") == self.folder

    def orphans(self, has_files: Any) -> list[Path]:
        """Entries this folder wrote whose session has no file left (``has_files(session_id)``
        is False) and that are older than ``ORPHAN_AGE_S``: what a crash during a deletion leaves."""
        try:
            names = sorted(os.listdir(self.directory))
        except (FileNotFoundError, NotADirectoryError):
            return []
        now = time.time()
        out = []
        for name in names:
            stem, _, rest = name.partition(".")
            if not (name.endswith(".key") and len(rest) == 20):
                continue
            path = self.directory / name
            try:
                if now - path.stat().st_mtime < ORPHAN_AGE_S or has_files(stem) or not self._ours(path):
                    continue
            except OSError:
                continue
            out.append(path)
        return out

    def remove_paths(self, paths: list[Path]) -> int:
        return self._remove(paths)

    # -- ciphers ---------------------------------------------------------------------------
    def new_cipher(self, session_id: str, data_key: bytes, wrapped: bytes) -> KeystoreCipher:
        """A new session's cipher; its entry is written at its first seal (a session that never
        saves anything leaves no key behind)."""
        cipher = KeystoreCipher(self, session_id, data_key, wrapped, os.urandom(8).hex(), stored=False)
        _remember(cipher)
        return cipher

    def cipher(self, keyring: Keyring, ref: str, session_id: str, where: str) -> KeystoreCipher:
        """The cipher of a session's files naming ``keystore:<ref>`` (``<key id>.<entry id>``)."""
        key_id, entry_id = bytes.fromhex(ref[:16]), ref[17:]
        if not keyring.reads(key_id):
            raise EncryptionKeyError(f"{where} is encrypted with another key (key id {key_id.hex()}, this key's "
                                     f"is {keyring.key_id.hex()}); give the key it was written with")
        for store in (self, *self.also_from):
            data = store._read(store.path(session_id, entry_id))
            if data is not None:
                break
        else:
            owner = self._owner(entry_id)
            if owner is not None:
                raise SessionFormatError(f"{where} fails authentication: its data key is session {owner}'s (moved "
                                         "from another session); refused, nothing loaded from it")
            raise EncryptionKeyError(f"{where}: its data key is not in the keystore {self.directory}: the session "
                                     "was deleted, or the keystore is another one (--keystore DIR)")
        try:
            if data.get("session_id") != session_id:
                raise ValueError("another session's")
            wrapped = base64.b64decode(str(data["data_key"]).encode("ascii"), validate=True)
        except (KeyError, ValueError) as exc:
            raise EncryptionKeyError(f"the keystore entry {store.path(session_id, entry_id)} is damaged ({exc}); "
                                     f"{where} cannot be decrypted") from None
        data_key = keyring.unwrap(wrapped, session_id, where)
        cipher = KeystoreCipher(store, session_id, data_key, wrapped, entry_id, stored=True)
        _remember(cipher)
        return cipher

    def _owner(self, entry_id: str) -> str | None:
        """The session whose entry ``entry_id`` is, if it is in the keystore under another name."""
        for store in (self, *self.also_from):
            with contextlib.suppress(OSError):
                for name in os.listdir(store.directory):
                    if name.endswith(f".{entry_id}.key"):
                        return name[: -len(entry_id) - 5]
        return None

    def kv_cipher(self, keyring: Keyring, session_id: str) -> SessionCipher | None:
        """The session's current data key for its KV file (None: not a keystore session here)."""
        with _live_lock:
            cipher = _live.get((self.folder, session_id))
        if cipher is not None and cipher.key_id == keyring.key_id:
            cipher.store()
            return cipher
        return None


class KeystoreCipher(SessionCipher):
    """A session cipher whose wrapped data key lives in a keystore; its files hold a reference."""

    def __init__(self, keystore: Keystore, session_id: str, data_key: bytes, wrapped: bytes, entry_id: str,
                 *, stored: bool):
        super().__init__(session_id, data_key, wrapped, field=f"{KEYSTORE_REF}{wrapped[:8].hex()}.{entry_id}")
        self.keystore = keystore
        self.entry_id = entry_id
        self._stored = stored
        self._store_lock = threading.Lock()

    def store(self, *, check: bool = False) -> None:
        """Put the entry in the keystore if it is not there yet (``check``: look on the disk,
        in case ``doctor --fix`` took it for an orphan while the session had no file)."""
        if self._stored and not check:
            return
        with self._store_lock:
            if self._stored and not (check and not self.keystore.path(self.session_id, self.entry_id).exists()):
                return
            self.keystore.put(self.session_id, self.entry_id, self.wrapped)
            self._stored = True

    def seal_snapshot(self, plain: bytes) -> bytes:
        self.store(check=True)  # rare (snapshots), so the entry's presence is checked each time
        return super().seal_snapshot(plain)

    def seal_line(self, plain: bytes, lineno: int) -> bytes:
        self.store()
        return super().seal_line(plain, lineno)


def store_options(store: object, sessions_dir: object, keystore: str | os.PathLike[str] | None) -> dict[str, Any]:
    """``keystore=`` for ``open_store``, checked against the store: a folder for a sessions
    folder, a ``postgresql://`` URL (another database) for the PostgreSQL store."""
    if keystore is None:
        return {}

    target = store if store is not None or sessions_dir is not None else os.environ.get(STORE_ENV) or None
    if is_postgres_url(target):
        if not is_postgres_url(os.fspath(keystore)):
            raise SessionError("the PostgreSQL store keeps its data keys in a PostgreSQL database: --keystore "
                               "postgresql://... (keystore=...), not a folder (the hosts sharing the sessions do "
                               "not share a disk)")
        return {"keystore": os.fspath(keystore)}
    if is_postgres_url(os.fspath(keystore)):
        raise SessionError("a PostgreSQL keystore (--keystore postgresql://...) is for the PostgreSQL store "
                           "(--store postgresql://...); a sessions folder keeps its data keys in a folder")
    if target is not None and not isinstance(target, (str, os.PathLike)):
        raise ValueError("give the keystore to the store object itself (HistoryStore(folder, keystore=...)), "
                         "not beside it")
    return {"keystore": keystore}
