"""The config file: ``$XDG_CONFIG_HOME/conversation-session/config.toml`` (by default
``~/.config/...``), defaults for the chat's flags.

Keys are the long flag names, with ``-`` or ``_`` (``backend = "ollama"``, ``max_tokens = 256``,
``no_kv_file = true``, ``verbose = true``).  Values are checked as the flag's would be, and a
bad file stops the app with one line naming the file and the key (exit status 2), rather than
being half applied.  Flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path
from typing import Any

__all__ = ["CONFIG_NAME", "apply_config", "config_path"]

CONFIG_NAME = "conversation-session"
# Not settable from the file: they name one run's work, not a preference.
_NOT_IN_FILE = frozenset({"prompt", "resume", "continue_", "help", "version"})


def _toml() -> Any:
    """``tomllib`` (Python 3.11+), else the ``tomli`` backport, else None."""
    for name in ("tomllib", "tomli"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def config_path(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME") or ""
    # XDG: a relative XDG_CONFIG_HOME is invalid and must be ignored.
    root = Path(base) if os.path.isabs(base) else Path(env.get("HOME") or Path.home()) / ".config"
    return root / CONFIG_NAME / "config.toml"


def _bad(path: Path, text: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"config file {path}: {text}")


def _convert(path: Path, key: str, action: argparse.Action, value: Any) -> tuple[str, Any]:
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise _bad(path, f"{key} must be true or false, not {value!r}")
        is_flag_name = key.replace("_", "-") in (o.lstrip("-") for o in action.option_strings)
        return action.dest, (action.const if value else action.default) if is_flag_name else value
    if isinstance(value, (dict, list)) or isinstance(value, bool):
        raise _bad(path, f"{key} must be a single value, not {value!r}")
    if action.type is not None:
        try:
            value = action.type(str(value))  # type: ignore[operator]
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise _bad(path, f"{key}: {exc}") from None
    elif not isinstance(value, str):
        raise _bad(path, f"{key} must be a string, not {value!r}")
    if action.choices is not None and value not in action.choices:
        raise _bad(path, f"{key} must be one of {', '.join(map(str, action.choices))}, not {value!r}")
    return action.dest, value


def read_config(parser: argparse.ArgumentParser, environ: dict[str, str]) -> tuple[dict[str, Any], Path]:
    """The file's values as ``{dest: value}`` (empty when there is no file)."""
    path = config_path(environ)
    tomllib = _toml()
    if tomllib is None:
        if path.exists():
            raise _bad(path, "reading it needs Python 3.11 or newer (or `pip install tomli`)")
        return {}, path
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}, path
    except tomllib.TOMLDecodeError as exc:
        raise _bad(path, f"not valid TOML: {exc}") from None
    except OSError as exc:
        raise _bad(path, f"cannot read it: {exc.strerror or exc}") from None
    by_key: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in _NOT_IN_FILE:
            continue
        by_key[action.dest] = action
        for option in action.option_strings:
            if option.startswith("--"):
                by_key[option[2:].replace("-", "_")] = action
    values: dict[str, Any] = {}
    for key, value in data.items():
        found = by_key.get(key.replace("-", "_"))
        if found is None:
            raise _bad(path, f"unknown key {key!r}; keys are the long flag names of --help, "
                             "e.g. backend, model, system, temperature, sessions_dir")
        dest, converted = _convert(path, key, found, value)
        values[dest] = converted
    return values, path


def apply_config(parser: argparse.ArgumentParser, environ: dict[str, str]) -> tuple[str | None, str | None]:
    """Make the config file's values the parser's defaults; returns its ``sessions_dir`` and
    ``store`` (kept apart: the environment's ``$CONVERSATION_SESSIONS_DIR`` and
    ``$CONVERSATION_SESSIONS_STORE`` come before them).  A bad file is a usage error."""
    try:
        values, _path = read_config(parser, environ)
    except argparse.ArgumentTypeError as exc:
        # One line, as promised: the usage text says nothing about a file's keys.
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    sessions_dir = values.pop("sessions_dir", None)
    store = values.pop("store", None)
    if store and "://" not in store:
        store = os.path.expanduser(store)
    for name in ("log_file", "tts_output_dir"):
        if values.get(name):
            values[name] = os.path.expanduser(values[name])
    parser.set_defaults(**values)
    return (os.path.expanduser(sessions_dir) if sessions_dir else None), store or None
