"""The service's configuration: one frozen object, built from the command line (``main``) or
handed to each worker process through the environment (``uvicorn --workers N`` starts workers
by importing the app, so they cannot receive Python objects)."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .._flags import KEYSTORE_HELP, RETENTION_ENV, add_model_flags, add_voice_flags, retention_days_from_env
from ..backends._llama_cpp import KV_CACHE_TYPES
from ..session._limits import parse_timeout
from ..stores._durability import resolve_durability
from ..stores._open import is_postgres_url

__all__ = ["CONFIG_ENV", "INSTALL_HINT", "ORIGINS_ENV", "TOKENS_ENV", "ServiceConfig", "assistant_spec",
           "build_parser", "config_from_args", "host_name", "is_loopback", "origin_of"]

INSTALL_HINT = "the service needs Starlette and uvicorn: pip install 'conversation-session[service]'"

TOKENS_ENV = "CONVERSATION_SESSION_TOKENS"
ORIGINS_ENV = "CONVERSATION_SESSION_ORIGINS"
CONFIG_ENV = "CONVERSATION_SESSION_SERVICE_CONFIG"
"""Set by ``main`` for the worker processes: the whole config as JSON (tokens included, so the
workers never read the command line)."""


@dataclass(frozen=True)
class ServiceConfig:
    """What one worker needs.  Defaults: loopback, the embedded model, the file store."""

    store: str | None = None             # a URL (postgresql://...) or None: the file store in sessions_dir
    sessions_dir: str | None = None      # None: $CONVERSATION_SESSIONS_DIR or ./sessions
    backend: str = "llama-cpp"
    model: str | None = None
    base_url: str | None = None
    kv_type: str | None = None           # the embedded model's KV cache cells (None: its default, f16)
    host: str = "127.0.0.1"
    port: int = 8765
    workers: int = 1
    tokens: tuple[str, ...] = ()
    # Browser-facing guards (``_guard``): host names beyond loopback that requests may name
    # ("*": any, behind a reverse proxy that checks them), and web origins allowed to call.
    allowed_hosts: tuple[str, ...] = ()
    allow_origins: tuple[str, ...] = ()
    # Ollama/OpenAI-compatible surfaces (``_compat``): extra model names to list, each with a
    # memory of its own ("NAME" or "NAME=MODEL"; MODEL must be the model this service serves).
    assistants: tuple[str, ...] = ()
    ready_wait_s: float = 120.0          # a request arriving while the model loads waits this long, then 503
    timeout: float | None = 60.0         # one turn, as the library's timeout
    max_tokens: int = 512
    system: str | None = None
    tools_file: str | None = None        # server-side tools: the public functions of this file
    memory: str = "trim"                 # or "summary": running summaries beyond the window
    durability: str | None = None        # "process" or "power" (None: $CONVERSATION_SESSION_DURABILITY, else power)
    retention_s: float | None = None     # sessions idle longer are deleted at start, then hourly (None: kept)
    key_file: str | None = None          # encrypt new sessions at rest (None: $CONVERSATION_SESSION_KEY_FILE)
    keystore: str | None = None          # the data keys' folder (None: $CONVERSATION_SESSION_KEYSTORE, beside the key)
    # Speech: the WebSocket sends each sentence's audio to connections that ask (?audio=wav).
    tts: str = "none"                    # or "espeak"
    tts_voice: str | None = None         # one espeak-ng voice for all text (default: by language)
    tts_rate: int | None = None          # words per minute
    log_level: str = "INFO"
    log_format: str = "auto"             # json, plain, or auto: plain when stderr is a terminal
    # Limits.
    max_body_bytes: int = 64 * 1024
    # The Ollama/OpenAI chat bodies carry what the client holds: Open WebUI the whole chat, Home
    # Assistant its system prompt (every exposed entity) and tool schemas; 64 KB refused a
    # 1,000-message chat.  The new message itself stays within max_text_bytes.
    max_chat_body_bytes: int = 4 * 1024 * 1024
    max_text_bytes: int = 16 * 1024
    rate: float = 10.0                   # requests per second per token (token bucket), across workers
    burst: float = 40.0
    lock_wait_s: float = 10.0            # a second request on a busy session waits this long, then 409
    keep_open_s: float | None = None     # idle sessions stay open this long (None: 30, 0 on PostgreSQL)
    max_open: int = 64                   # open sessions per worker (LRU)
    shutdown_grace_s: float = 10.0
    lease_ttl_s: float | None = None     # PostgreSQL: how soon a crashed worker's sessions are free again
    # Test hooks (hidden options).
    fake_delay: float = 0.0
    fake_context: int | None = None       # tests: the fake backend's context window (words)
    fake_load_s: float = 0.0              # tests: the fake backend takes this long to load

    def __post_init__(self) -> None:
        # Checked here too (not only by the command line), so an embedding host learns of a
        # bad value when it builds the config, not at its first request.
        for key, check in (("allowed_hosts", host_name), ("allow_origins", origin_of)):
            values = getattr(self, key)
            if isinstance(values, str):
                raise TypeError(f"ServiceConfig.{key} is a tuple of strings, not one string")
            for value in values:
                check(value)
        if self.durability is not None:
            object.__setattr__(self, "durability", resolve_durability(self.durability))
        if self.kv_type is not None:
            if self.kv_type not in KV_CACHE_TYPES:
                raise ValueError(f"kv_type must be one of {', '.join(KV_CACHE_TYPES)}, not {self.kv_type!r}")
            if self.backend not in ("llama-cpp", "llama_cpp", "embedded"):
                # Other backends keep their cache in their server: refused, not ignored, so a
                # service started with it does not run without what it was asked for.
                raise ValueError(f"--kv-type sets the embedded model's KV cache (--backend llama-cpp), "
                                 f"not {self.backend}'s")

    @property
    def keep_open(self) -> float:
        """Workers on one host hand idle sessions over on request (``_handoff``); workers on
        other hosts cannot be asked, so with PostgreSQL (several hosts) sessions are closed
        after each request unless told otherwise."""
        if self.keep_open_s is not None:
            return max(self.keep_open_s, 0.0)
        store = self.store or os.environ.get("CONVERSATION_SESSIONS_STORE") or ""
        return 0.0 if is_postgres_url(store) else 30.0

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls, text: str) -> ServiceConfig:
        data = json.loads(text)
        for key in _TUPLES:
            data[key] = tuple(data.get(key) or ())
        return cls(**data)


_TUPLES = ("tokens", "allowed_hosts", "allow_origins", "assistants")  # lists in JSON
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def host_name(text: str) -> str:
    """A host name as the guard compares it: lower case, no trailing dot, an IPv6 address
    without brackets; ``"*"`` stays.  ValueError for anything else (a port included)."""
    name = text.strip().lower()
    if name == "*":
        return name
    bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    name = name.removesuffix(".")
    if name and len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split(".")):
        return name
    raise ValueError(f"{text!r} is not a host name (give a name or an address, without a port; '*' allows any)")


def origin_of(text: str) -> str:
    """A web origin as browsers send it in ``Origin``: ``scheme://host[:port]``, lower case,
    the scheme's default port left out.  ValueError for anything else (a path, "null", "*")."""
    raw = text.strip()
    what = f"{text!r} is not an origin: give scheme://host[:port], e.g. http://localhost:3000"
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:
        raise ValueError(what) from None
    scheme = parts.scheme.lower()
    if (not _SCHEME.fullmatch(scheme) or not parts.hostname or parts.username is not None
            or parts.password is not None or parts.path not in ("", "/") or parts.query or parts.fragment
            or "#" in raw or "?" in raw or raw.endswith(":")):
        raise ValueError(what)
    host = host_name(parts.hostname)
    if host == "*":
        raise ValueError(what)
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


_ASSISTANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def assistant_spec(text: str) -> str:
    """``NAME[=MODEL]`` as given to ``--assistant``, checked (ValueError): NAME is 1-64 letters,
    digits, '.', '_' or '-' (a model name every client accepts), MODEL anything non-empty."""
    name, eq, model = text.partition("=")
    name = name.strip().removesuffix(":latest")
    if not _ASSISTANT.fullmatch(name):
        raise ValueError(f"--assistant {text!r}: NAME must be 1-64 letters, digits, '.', '_' or '-'")
    if eq and not model.strip():
        raise ValueError(f"--assistant {text!r}: give NAME or NAME=MODEL")
    return f"{name}={model.strip()}" if eq else name


def _cli_value(parse: Any) -> Any:
    def check(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return check


def is_loopback(host: str) -> bool:
    """True if ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return value
    return parse


_AGE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", re.IGNORECASE)
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "": 86400}


def parse_age(text: str) -> float:
    """Seconds of ``30d``, ``12h``, ``2w``, ``90m``, ``45s``; a plain number is days (the format
    of ``sessions prune --older-than``)."""
    m = _AGE_RE.fullmatch(text)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age such as 30d, 12h, 2w or 90m")
    return float(m.group(1)) * _AGE_UNITS[m.group(2).lower()]


def _timeout(text: str) -> float | None:
    try:
        return parse_timeout(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser(prog: str = "conversation-session serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Serve durable conversations over HTTP and WebSocket (REST under /v1, a Home "
                    "Assistant-shaped /api/conversation/process, /healthz, /readyz, /openapi.json).",
    )
    p.add_argument("--store", metavar="URL", default=None,
                   help="postgresql://... for a store shared by several hosts (default: $CONVERSATION_SESSIONS_STORE,"
                        " else the file store in --sessions-dir)")
    p.add_argument("--sessions-dir", default=None,
                   help="the file store's folder (default $CONVERSATION_SESSIONS_DIR or ./sessions)")
    add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other needs --token)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--workers", type=_positive(int), default=1, help="worker processes sharing the store (default 1)")
    p.add_argument("--token", action="append", default=None, metavar="TOKEN",
                   help=f"a bearer token clients must send (repeatable; also ${TOKENS_ENV}, comma-separated); "
                        "each token sees only its own sessions")
    p.add_argument("--allowed-host", action="append", default=None, metavar="NAME", type=_cli_value(host_name),
                   help="a host name requests may name besides loopback ones and --host (repeatable); other "
                        "names are refused (a guard against DNS rebinding); '*' allows any, for a reverse proxy "
                        "that checks the name itself")
    p.add_argument("--allow-origin", action="append", default=None, metavar="ORIGIN", type=_cli_value(origin_of),
                   help=f"a web origin (scheme://host[:port]) whose pages may call the service: its cross-origin "
                        f"requests, WebSockets and CORS are allowed (repeatable; also ${ORIGINS_ENV}, "
                        "comma-separated); pages of other origins cannot change anything")
    p.add_argument("--assistant", action="append", default=None, metavar="NAME[=MODEL]",
                   type=_cli_value(assistant_spec),
                   help="a model name the Ollama and OpenAI APIs list (/api/tags, /v1/models), with a memory of "
                        "its own per token (repeatable): 'kitchen' and 'office' remember separately; MODEL, if "
                        "given, must be the model this service serves (--model)")
    p.add_argument("--ready-wait", type=float, default=120.0,
                   help="seconds a request arriving while the model is still loading waits for it before 503 "
                        "(default 120)")
    p.add_argument("--key-file", default=None, metavar="PATH",
                   help="encrypt sessions at rest with this key file (made by `conversation-session keygen PATH`); "
                        "default $CONVERSATION_SESSION_KEY_FILE, else plain JSON (docs/encryption.md)")
    p.add_argument("--keystore", default=None, metavar="DIR|URL", help=KEYSTORE_HELP)
    p.add_argument("--retention", type=parse_age, default=None, metavar="AGE",
                   help="delete sessions not updated for AGE (30d, 12h, 2w), at start and then hourly, with their "
                        "KV files; a session open anywhere (this service, another worker, the chat app) is never "
                        f"deleted (default ${RETENTION_ENV} days, as the chat app takes it; else keep everything)")
    p.add_argument("--tts", nargs="?", const="espeak", choices=["none", "espeak"], default="none",
                   help="synthesise each reply sentence (espeak-ng, WAV) for WebSocket clients that connect with "
                        "?audio=wav (--tts alone means espeak)")
    add_voice_flags(p)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-format", default="auto", choices=["auto", "json", "plain"],
                   help="the log on stderr: JSON lines, plain lines, or auto (default): plain when stderr is a "
                        "terminal, JSON otherwise")
    p.add_argument("--rate", type=_positive(float), default=10.0,
                   help="requests per second allowed per token, counted across all the workers sharing the store "
                        "(default 10)")
    p.add_argument("--burst", type=_positive(float), default=40.0,
                   help="requests a token may make at once before --rate applies (default 40)")
    p.add_argument("--lock-wait", type=float, default=10.0,
                   help="seconds a request waits for a session busy with another request before 409 (default 10)")
    p.add_argument("--keep-open", type=float, default=None,
                   help="seconds an idle session stays open in its worker (default 30; 0 with PostgreSQL, "
                        "whose workers may be on other hosts; workers on one host hand sessions over at once)")
    p.add_argument("--max-open", type=_positive(int), default=64,
                   help="sessions each worker keeps open at once, a memory bound per process (default 64; beyond "
                        "it the least recently used idle one is closed, no request is refused)")
    p.add_argument("--shutdown-grace", type=float, default=10.0,
                   help="seconds running turns get to finish on shutdown before they are cancelled")
    p.add_argument("--lease-ttl", type=_positive(float), default=None,
                   help="PostgreSQL store: seconds before the sessions of a crashed worker can be taken by another "
                        "(the store's default is 15)")
    p.add_argument("--tools-file", default=None, metavar="PATH.py",
                   help="offer the public functions of this Python file to the model as tools, in every session "
                        "(server-side tools: they run in the service's process; see docs/tools.md)")
    # For tests and benchmarks: the fake backend's delay per streamed piece.
    p.add_argument("--fake-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--fake-context", type=_positive(int), default=None, help=argparse.SUPPRESS)
    p.add_argument("--fake-load-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    return p


def config_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> ServiceConfig:
    env = os.environ if environ is None else environ
    tokens = list(args.token or [])
    tokens += [t.strip() for t in env.get(TOKENS_ENV, "").split(",") if t.strip()]
    origins = list(args.allow_origin or [])
    for text in env.get(ORIGINS_ENV, "").split(","):
        if text.strip():
            try:
                origins.append(origin_of(text))
            except ValueError as exc:
                raise ValueError(f"${ORIGINS_ENV}: {exc}") from None
    retention_s = args.retention
    if retention_s is None:  # the flag wins; the chat app's variable otherwise (days; 0 keeps everything)
        days = retention_days_from_env(env)
        retention_s = None if days is None else days * 86400
    for spec in args.assistant or []:
        _, eq, served = spec.partition("=")
        if eq and args.model is not None and served not in (
                args.model, os.path.basename(args.model), os.path.basename(args.model).removesuffix(".gguf")):
            raise ValueError(f"--assistant {spec}: this service serves one model ({args.model}); an assistant "
                             "can only name it (leave '=MODEL' out for the service's model)")
    return ServiceConfig(
        store=args.store, sessions_dir=args.sessions_dir, backend=args.backend, model=args.model,
        base_url=args.base_url, kv_type=args.kv_type, host=args.host, port=args.port, workers=args.workers,
        tokens=tuple(dict.fromkeys(tokens)), allowed_hosts=tuple(dict.fromkeys(args.allowed_host or [])),
        allow_origins=tuple(dict.fromkeys(origins)), assistants=tuple(dict.fromkeys(args.assistant or [])),
        ready_wait_s=max(args.ready_wait, 0.0), timeout=args.timeout, max_tokens=args.max_tokens,
        system=args.system, tools_file=args.tools_file, memory=args.memory, durability=args.durability,
        retention_s=retention_s, key_file=args.key_file, keystore=args.keystore,
        tts=args.tts, tts_voice=args.tts_voice, tts_rate=args.tts_rate,
        log_level=args.log_level, log_format=args.log_format, rate=args.rate, burst=args.burst,
        lock_wait_s=max(args.lock_wait, 0.0), keep_open_s=args.keep_open, max_open=args.max_open,
        shutdown_grace_s=max(args.shutdown_grace, 0.0), lease_ttl_s=args.lease_ttl,
        fake_delay=max(args.fake_delay, 0.0), fake_context=args.fake_context,
        fake_load_s=max(args.fake_load_delay, 0.0),
    )
