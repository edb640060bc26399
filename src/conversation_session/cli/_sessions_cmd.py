"""The non-interactive commands: ``sessions list|export|import|delete|prune`` and ``doctor``.

Each returns an exit status: 0 done, 1 failed (one line on stderr says why and what to do).
They work through the store interface (``--store URL``: a folder or PostgreSQL), so sessions
move between stores with ``export --all`` from one and ``import`` into the other.  ``doctor``
checks a sessions folder's files, or (PostgreSQL) loads every session through the store and
reports the unreadable ones and the leases held.  Stores are named by their
``description``, which never shows a password.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

from .._exceptions import EncryptionKeyError, SessionError, SessionLockedError
from ..memory._kvcache import remove_kv_file
from ..stores import HistoryStore, open_store, validate_session_id
from ..stores._api import StoreAPI
from ..stores._crypto import keygen, load_key
from ..stores._housekeeping import INFO_KINDS, doctor, export_all, import_session, prune
from ..stores._keystore import store_options
from ._args import store_from
from ._confirm import confirm
from ._export import PlaintextNeeded, encode_export, write_export
from ._listing import NothingDeleted, delete_saved, kv_bytes, one_line, search_lines, session_table
from ._models import default_model, list_models, print_models
from ._text import printable

__all__ = ["CommandError", "apply_retention", "run_command"]

logger = logging.getLogger("conversation_session.cli")


class CommandError(SessionError):
    """A housekeeping command cannot go on; the message is shown as one line on stderr."""


def _clean(text: str) -> str:
    """Text safe to print: a lone surrogate from a damaged file must not crash the output,
    and control characters from a session's content must not drive the terminal."""
    return printable(text)


class _Commands:
    def __init__(self, args: argparse.Namespace, stdin: TextIO, stdout: TextIO, stderr: TextIO):
        self.args = args
        self.stdin, self.out, self.err = stdin, stdout, stderr
        where = store_from(args)
        self.store: StoreAPI = open_store(where, None, encryption_key=getattr(args, "key_file", None),
                                          **store_options(where, None, getattr(args, "keystore", None)))

    def say(self, text: str = "") -> None:
        print(_clean(text), file=self.out)

    def confirm(self, question: str) -> bool:
        """True to go ahead: ``--yes``, or a "y" typed at the terminal (see ``_confirm``)."""
        def ask(prompt: str) -> str:
            print(prompt, end="", file=self.out, flush=True)
            answer = self.stdin.readline()
            if not answer:
                raise EOFError
            return answer

        return confirm(question, yes=getattr(self.args, "yes", False), terminal=self.stdin.isatty(), ask=ask)

    def _no_session(self, session_id: str) -> CommandError:
        return CommandError(f"no saved session {session_id} in {self.store.description}; "
                            "see `sessions list`")

    # -- sessions list -------------------------------------------------------------------------
    def list(self) -> int:
        infos = self.store.list_sessions()
        if self.args.json:
            rows = [{**_info_dict(i), "kv_bytes": kv_bytes(self.store, i.session_id)} for i in infos]
            text = json.dumps(rows, ensure_ascii=False, indent=2) + "\n"
            self.out.write(_clean(text) if self.out.isatty() else text.encode("utf-8", "replace").decode("utf-8"))
            return 0
        if not infos:
            self.say(f"no saved sessions in {self.store.description}")
            return 0
        for line in session_table(self.store, infos):
            self.say(line)
        return 0

    # -- sessions search / rename --------------------------------------------------------------
    def search(self) -> int:
        text = " ".join(self.args.text)
        hits = self.store.search(text, limit=self.args.limit)
        if self.args.json:
            rows = [{"session_id": h.session_id, "title": h.title, "updated_at": h.updated_at, "index": h.index,
                     "role": h.role, "snippet": h.snippet} for h in hits]
            out = json.dumps(rows, ensure_ascii=False, indent=2) + "\n"
            self.out.write(_clean(out) if self.out.isatty() else out.encode("utf-8", "replace").decode("utf-8"))
            return 0
        if not hits:
            print(_clean(f"no session in {self.store.description} holds {text!r}"), file=self.err)
            return 1  # as grep: nothing found
        for line in search_lines(hits):
            self.say(line)
        if len(hits) >= self.args.limit:
            print(f"(the first {len(hits)} hits; --limit N shows more)", file=self.err)
        return 0

    def rename(self) -> int:
        sid = _valid_id(self.args.session_id)
        if sid not in self.store.newest_first():
            raise self._no_session(sid)
        title = " ".join(self.args.title)
        self.store.set_title(sid, title)
        shown = " ".join(title.split())
        self.say(f"renamed {sid}: {shown}" if shown else f"removed the title of {sid}")
        return 0

    # -- sessions rekey ------------------------------------------------------------------------
    def rekey(self) -> int:
        """Every session under the key of ``--new-key-file``, each with a fresh data key; the
        old key (``--key-file``, or none for plain sessions) only reads."""
        keystore = getattr(self.args, "keystore", None)
        where = store_from(self.args)
        new: Any = open_store(where, None, encryption_key=Path(self.args.new_key_file),
                              **store_options(where, None, keystore))
        if not hasattr(new, "rekey"):
            raise CommandError(f"rekey works on a sessions folder or PostgreSQL, not {self.store.description}")
        if isinstance(new, HistoryStore):
            # The new key's data keys go to its keystore (beside it, unless one is named); those of
            # the old key are read from the old key's and removed once their sessions changed over.
            new.also_read_with(getattr(self.args, "key_file", None), keystore=keystore)
        else:
            old = load_key(getattr(self.args, "key_file", None))
            if old is not None:
                new.keyring.also_read_with(old)
        done, already, failed = 0, 0, 0
        for sid in self.store.newest_first():
            try:
                changed = new.rekey(sid)
            except SessionLockedError:
                print(_clean(f"skipped {sid}: it is open for writing; close it and run rekey again"), file=self.err)
                failed += 1
                continue
            except (SessionError, OSError) as exc:
                print(_clean(f"skipped {sid}: {exc}"), file=self.err)
                failed += 1
                continue
            done += changed
            already += not changed
        self.say(f"rekeyed {done} session(s)" + (f"; {already} already under the new key" if already else ""))
        return 1 if failed else 0

    # -- sessions export -----------------------------------------------------------------------
    def export(self) -> int:
        """An encrypted session is written sealed (``_sealed_export``) unless ``--plaintext``."""
        a = self.args
        plaintext = getattr(a, "plaintext", False)
        if a.all_dir is not None:
            if a.session_id or a.output or a.format:
                raise _Usage("export --all DIR takes no ID, -o or --format (it writes JSON files)")
            result = export_all(self.store, Path(a.all_dir), plaintext=plaintext)
            for sid, why in result.skipped.items():
                print(_clean(f"skipped {sid}: {why}"), file=self.err)
            self.say(f"exported {len(result.written)} session(s) to {a.all_dir}"
                     + (f"; {len(result.skipped)} damaged one(s) skipped (see `doctor`)" if result.skipped else ""))
            if result.sealed:
                print(_clean(f"{len(result.sealed)} encrypted session(s) written sealed: `sessions import` "
                             "opens them with the key (--plaintext writes readable JSON)"), file=self.err)
            return 0
        if not a.session_id:
            raise _Usage("export needs a session ID, or --all DIR")
        sid = _valid_id(a.session_id)
        try:
            record = self.store.load(sid)
        except FileNotFoundError:
            raise self._no_session(sid) from None
        if a.output and a.output != "-":
            try:
                path, sealed = write_export(self.store, sid, Path(a.output), a.format, record=record,
                                            plaintext=plaintext)
            except PlaintextNeeded as exc:
                raise _Usage(f"{exc}; add --plaintext to write it readable, or export it as JSON "
                             "(written sealed)") from None
            except OSError as exc:
                raise CommandError(f"cannot write {a.output}: {exc.strerror or exc}; check the folder "
                                   "exists, is writable and has free space") from exc
            print(_clean(f"exported {sid} to {path}" + (" (sealed: encrypted with the key; `sessions import` "
                                                         "opens it, --plaintext writes it readable)"
                                                         if sealed else "")), file=self.err)
            return 0
        try:
            data, sealed = encode_export(self.store, record, a.format or "json", plaintext=plaintext)
        except PlaintextNeeded as exc:
            raise _Usage(f"{exc}; add --plaintext to show it") from None
        if sealed:
            return self._write_sealed(sid, data)
        text = data.decode("utf-8")
        # To a terminal, content is shown, not obeyed; to a pipe or file it is written exactly.
        self.out.write(_clean(text) if self.out.isatty() else text.encode("utf-8", "replace").decode("utf-8"))
        self.out.flush()
        return 0

    def _write_sealed(self, sid: str, data: bytes) -> int:
        """A sealed export to standard output: binary, so only to a file or a pipe
        (``export ID > backup.json``), never to a terminal."""
        buffer = getattr(self.out, "buffer", None)
        if self.out.isatty() or buffer is None:
            raise _Usage(f"session {sid} is encrypted: its export is sealed (binary), not for a terminal; "
                         "add -o FILE to write it, or --plaintext to show it")
        self.out.flush()
        buffer.write(data)
        buffer.flush()
        return 0

    # -- sessions import -----------------------------------------------------------------------
    def import_(self) -> int:
        """Each file in turn (a folder: its ``*.json`` files, as ``export --all`` writes them);
        one that fails is reported and the rest still go in (exit 1).  Sealed exports are opened
        with the key (``import_session``)."""
        failed = 0
        paths = [p for path in self.args.paths for p in _import_paths(Path(path))]
        for path in paths:
            try:
                sid = import_session(self.store, path)
            except FileNotFoundError:
                error: Exception = CommandError(f"cannot import {path}: no such file")
            except SessionError as exc:
                error = exc
            else:
                self.say(sid)
                print(_clean(f"imported {path} as {sid} into {self.store.description}"), file=self.err)
                continue
            if len(paths) == 1:
                raise error
            failed += 1
            print(_clean(f"error: {error}"), file=self.err)
        if failed:
            print(f"error: {failed} of {len(paths)} file(s) not imported", file=self.err)
        return 1 if failed else 0

    # -- sessions delete -----------------------------------------------------------------------
    def delete(self) -> int:
        try:
            self.say(delete_saved(self.store, _valid_id(self.args.session_id), self.confirm))
        except NothingDeleted as exc:
            if str(exc) == "not deleted":
                self.say(str(exc))
                return 1
            raise CommandError(str(exc)) from None
        return 0

    # -- sessions prune ------------------------------------------------------------------------
    def prune(self) -> int:
        a = self.args
        if a.older_than is None and a.keep is None:
            raise _Usage("prune needs --older-than AGE, --keep N, or both")
        doomed = prune(self.store, a.older_than, a.keep, dry_run=True)
        if not doomed:
            self.say("nothing to prune")
            return 0
        infos = {i.session_id: i for i in self.store.list_sessions()}
        verb = "would delete" if a.dry_run else "will delete"
        self.say(f"{verb} {len(doomed)} session(s):")
        for sid in doomed:
            i = infos.get(sid)
            self.say(f"  {sid:<26} updated {i.updated_at:<19}  {i.turns:>4} turn(s)  {one_line(i.first_user_line, 50)}"
                     if i else f"  {sid}")
        if a.dry_run:
            return 0
        if not self.confirm(f"Delete these {len(doomed)} session(s)? This cannot be undone."):
            self.say("nothing deleted")
            return 1
        deleted, busy = 0, []
        for sid in doomed:
            try:
                gone = self.store.delete(sid)
            except SessionLockedError:
                busy.append(sid)
                continue
            if gone:
                deleted += 1
                remove_kv_file(self.store, sid)
        self.say(f"deleted {deleted} session(s)" + (f"; {len(busy)} in use, kept: {', '.join(busy)}" if busy else ""))
        return 0

    # -- doctor ------------------------------------------------------------------------------
    def doctor(self) -> int:
        if not isinstance(self.store, HistoryStore):
            return self._doctor_store()
        problems = doctor(self.store, fix=self.args.fix)
        if not problems:
            self.say(f"no problems in {self.store.directory}")
            return 0
        unresolved = 0
        for p in problems:
            self.say(f"{p.kind:<16} {p.path.name}: {_without_name(p.detail, p.path)}")
            if p.moved_to is not None:
                self.say(f"{'':<16} moved aside to {p.moved_to.name}")
            elif p.kind not in INFO_KINDS and not p.removed:
                unresolved += 1
        if unresolved:
            hint = "" if self.args.fix else "; `doctor --fix` moves them aside (nothing is deleted)"
            print(f"error: {unresolved} problem file(s) in {self.store.directory}{hint}", file=self.err)
            return 1
        return 0


    def _doctor_store(self) -> int:
        """``doctor`` on a store without files (PostgreSQL), through the store API: it connects,
        lists the sessions, loads each one in full, and reports those that cannot be read and
        those held by a writer (the lease: open in a chat or a service somewhere).  Nothing is
        changed: ``--fix`` moves files, and there are none; an unreadable session can be
        exported by hand or deleted (``sessions delete ID``).  With a keystore, it also reports
        the data keys no session row names (``orphan-key``), which ``--fix`` removes."""
        store = self.store
        keystore = getattr(store, "keystore", None)
        if self.args.fix and keystore is None:
            print(f"note: --fix moves damaged files aside; {store.description} has no files, so nothing is moved",
                  file=self.err)
        ids = store.newest_first()  # also the sessions a listing cannot summarise
        unreadable, held, sealed = 0, 0, 0
        for sid in ids:
            try:
                record = store.load(sid)
            except FileNotFoundError:
                continue  # deleted while we looked
            except EncryptionKeyError as exc:  # as in a folder: reported, not a problem
                sealed += 1
                detail = str(exc).removeprefix(f"session {sid} ").removeprefix("is ")
                self.say(_clean(f"{'encrypted':<16} {sid}: not checked ({detail})"))
                continue
            except (SessionError, ValueError, OSError) as exc:
                unreadable += 1
                detail = str(exc)
                detail = detail.removeprefix(f"session {sid}: ").removeprefix(f"{sid}: ")  # named once
                self.say(f"{'unreadable':<16} {sid}: {detail}")
                continue
            try:
                locked = store.is_locked(sid)
            except SessionError as exc:
                self.say(f"{'lease unknown':<16} {sid}: {exc}")
                continue
            if locked:
                held += 1
                self.say(f"{'in use':<16} {sid}: {record.turns} turn(s); a writer holds its lease (open in a chat "
                         "or the service); it is released on close, or taken over once it expires")
        orphans = store.orphan_keys(fix=self.args.fix) if keystore is not None else []  # type: ignore[attr-defined]
        for sid, entry_id, removed in orphans:
            self.say(f"{'orphan-key':<16} {sid}.{entry_id}: a data key in the keystore that no session row names "
                     "(left by a crash before its row was written)" + ("; removed" if removed else ""))
        stray = sum(not removed for _sid, _entry, removed in orphans)
        summary = (f"checked {len(ids)} session(s) in {store.description}: {unreadable} unreadable, "
                   f"{held} in use" + (f", {sealed} encrypted (not checked without their key)" if sealed else "")
                   + (f", {len(orphans)} orphan key(s)" if orphans else ""))
        if stray and not unreadable:
            print(_clean(f"error: {summary}; `doctor --fix` removes the orphan keys"), file=self.err)
            return 1
        if unreadable:
            print(_clean(f"error: {summary}; export what can be read (`sessions export ID`) or delete them "
                         "(`sessions delete ID`)"), file=self.err)
            return 1
        self.say(summary if ids else f"no sessions in {store.description}; nothing to check")
        return 0


class _Usage(Exception):
    """Wrong combination of arguments: exit status 2."""


def _import_paths(path: Path) -> list[Path]:
    """``path``, or the session files of a folder (``export --all``'s), in name order."""
    if not path.is_dir():
        return [path]
    if any(path.glob("*.journal")):  # its .json files alone would miss the turns in the journals
        raise CommandError(f"cannot import {path}: it is a sessions folder, not an export; export it first "
                           f"(`--sessions-dir {path} sessions export --all DIR`), then import DIR")
    found = sorted(p for p in path.glob("*.json") if not p.name.startswith("."))
    if not found:
        raise CommandError(f"cannot import {path}: a folder with no session files (*.json) in it")
    return found


def _valid_id(text: str) -> str:
    try:
        return validate_session_id(text)
    except ValueError as exc:
        raise _Usage(str(exc)) from None


def _without_name(detail: str, path: Path) -> str:
    """A problem's detail without the file name the line already starts with."""
    for name in (str(path), path.name):
        for sep in (": ", " "):
            if detail.startswith(name + sep):
                return detail[len(name) + len(sep):]
    return detail


def _info_dict(i: object) -> dict[str, object]:
    location = getattr(i, "location", None) or str(getattr(i, "path", ""))
    out = {k: getattr(i, k, None) for k in ("session_id", "title", "created_at", "updated_at", "turns",
                                             "total_messages", "size_bytes", "llm_model", "first_user_line")}
    out["path"] = location
    if getattr(i, "encrypted", False):
        out["encrypted"] = True
    return out


def run_command(args: argparse.Namespace, *, usage: Callable[[str], object] | None = None,
                stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run ``args.command`` (``sessions ...`` or ``doctor``); returns the exit status."""
    err = stderr or sys.stderr
    if args.command == "models":
        return _models(args, stdout or sys.stdout, err)
    if args.command == "keygen":
        try:
            path = keygen(args.path)
        except SessionError as exc:
            print(_clean(f"error: {exc}"), file=err)
            return 1
        print(f"wrote a new key to {path} (mode 600); keep a copy somewhere safe: without it, sessions "
              "encrypted with it cannot be read", file=stdout or sys.stdout)
        return 0
    cmds: _Commands | None = None
    try:
        cmds = _Commands(args, stdin or sys.stdin, stdout or sys.stdout, err)
        if args.command == "doctor":
            return cmds.doctor()
        action = {"list": cmds.list, "search": cmds.search, "rename": cmds.rename, "export": cmds.export,
                  "import": cmds.import_,
                  "delete": cmds.delete, "prune": cmds.prune, "rekey": cmds.rekey}[args.sessions_command]
        return action()
    except _Usage as exc:
        if usage is not None:
            usage(str(exc))  # argparse's error(): prints usage and exits 2
        print(f"error: {exc}", file=err)
        return 2
    except BrokenPipeError:
        raise  # the reader of stdout has gone: ``main`` stops quietly, no "error:" line
    except (SessionError, OSError, ValueError) as exc:
        text = str(exc) if not isinstance(exc, OSError) or not exc.strerror else (
            f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror}")
        print(_clean(f"error: {text}"), file=err)
        return 1
    finally:
        if cmds is not None:
            cmds.store.close()


def _models(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``models``: what the backend offers (no store needed)."""
    try:
        entries = list_models(args.backend, base_url=args.base_url, model=args.model)
    except SessionError as exc:
        print(_clean(f"error: {exc}"), file=err)
        return 1
    if args.json:
        rows = [{"name": e.name, "size_bytes": e.size_bytes, "detail": e.detail} for e in entries]
        print(json.dumps(rows, ensure_ascii=False, indent=2), file=out)
        return 0
    print_models(entries, default_model(args.backend, args.model, entries), lambda line: print(line, file=out))
    return 0


def apply_retention(store_spec: str, days: float, *, stderr: TextIO | None = None) -> list[str]:
    """Delete sessions not updated for ``days`` days (those in use are kept); returns their ids.
    ``store_spec``: a folder or a store URL."""
    try:
        store = open_store(store_spec, None)  # no key needed: an encrypted session is dated by its files
    except (SessionError, ValueError) as exc:
        logger.warning("retention: %s", exc)
        return []
    try:
        deleted = prune(store, older_than=timedelta(days=days))
        for sid in deleted:
            remove_kv_file(store, sid)
    except (SessionError, OSError) as exc:
        logger.warning("retention: could not prune %s: %s", store.description, exc)
        return []
    finally:
        store.close()
    if deleted:
        print(f"retention: deleted {len(deleted)} session(s) not updated for {days:g} day(s)",
              file=stderr or sys.stderr)
    return deleted
