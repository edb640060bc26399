"""What keeps a web page the user visits from reading or driving the service (pure ASGI, in
front of every route: REST, server-sent events, WebSocket, Home Assistant, any added later).

A browser will send requests to ``http://127.0.0.1:8765`` on behalf of any site it shows, so
listening on loopback without a token is not enough.  Three attacks, three checks:

- **DNS rebinding**: the attacker's own name, made to resolve to 127.0.0.1, makes its page
  same-origin with the service, so the browser lets it read every answer.  Such requests still
  carry the attacker's name in ``Host``: only names that cannot be rebound are answered
  (``localhost``, ``*.localhost`` -- reserved for loopback, browsers never ask DNS for them --
  any IP address, whose URL no DNS answer can move elsewhere, the ``--host`` name and
  ``--allowed-host`` ones); others get 421 before routing.
- **Cross-site request forgery**: a page may send a form or a ``text/plain`` POST anywhere
  without asking, and browsers always mark it with ``Origin``.  A request that changes state
  (any method but GET, HEAD, OPTIONS), and every WebSocket (browsers do not apply CORS to
  them), whose ``Origin`` is neither the service's own nor an ``--allow-origin`` one is refused
  with 403, as is one marked ``Sec-Fetch-Site: cross-site`` without an allowed ``Origin``.
  Clients that are not browsers send no ``Origin`` and are not affected.
- Defence in depth: a body sent to the service must say it is JSON (``application/json`` or
  ``*+json``), else 415 -- the types a page may send without a CORS preflight are never JSON.
  Every route that takes a body takes JSON; one that takes another type must be exempted here.

CORS is granted only to ``--allow-origin`` origins: the exact origin echoed, never ``*``, no
credentials (clients send ``Authorization`` themselves).  Without a token, any program on the
machine can still use the service; the README's security section says so.
"""

from __future__ import annotations

import ipaddress

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._config import ServiceConfig, host_name, origin_of
from ._errors import ApiError

__all__ = ["Guard"]

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})
_ALLOW_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE"
# X-Session-Id (and Open WebUI's chat id) choose the session on the Ollama/OpenAI routes (_compat).
_ALLOW_HEADERS = b"Authorization, Content-Type, X-Request-ID, X-Session-Id, X-OpenWebUI-Chat-Id"
_EXPOSE_HEADERS = b"X-Request-ID, X-Session-Id, Retry-After, Location, Content-Disposition, WWW-Authenticate"
_PREFLIGHT_MAX_AGE = b"600"


def _split_host(value: str) -> tuple[str, int | None] | None:
    """``Host`` as (name, port); None when it is not one."""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1:]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else None
    else:
        name, colon, port_text_or_empty = value.partition(":")
        port_text = port_text_or_empty if colon else None
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return None
        port = int(port_text)
    try:
        return host_name(name), port
    except ValueError:
        return None


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    kind, _, sub = media.partition("/")
    return kind == "application" and (sub == "json" or sub.endswith("+json"))


class Guard:
    """The ASGI middleware; its rules are read once from the ``ServiceConfig``."""

    def __init__(self, app: ASGIApp, config: ServiceConfig):
        self.app = app
        names = {host_name(h) for h in config.allowed_hosts}  # ValueError for a bad one
        self.any_host = "*" in names
        bind = config.host.strip().strip("[]").lower()
        if bind not in _WILDCARD_BINDS:
            names.add(host_name(bind))
        self.names = frozenset(names)
        self.origins = frozenset(origin_of(o) for o in config.allow_origins)

    # -- the rules ------------------------------------------------------------------------------
    def host_allowed(self, name: str) -> bool:
        if self.any_host or name in self.names or name == "localhost" or name.endswith(".localhost"):
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    @staticmethod
    def own_origin(scheme: str, host: str) -> str | None:
        """The origin of a page this service served itself (``scheme://Host``)."""
        scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
        try:
            return origin_of(f"{scheme}://{host}")
        except ValueError:
            return None

    # -- ASGI -----------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, list[str]] = {}
        for key, value in scope.get("headers", []):
            headers.setdefault(key.lower(), []).append(value.decode("latin-1").strip())
        is_ws = scope["type"] == "websocket"
        method = "GET" if is_ws else str(scope.get("method", "GET")).upper()
        host = headers.get(b"host", [""])[0]

        # 1. Host: a name that cannot be rebound to someone else's page.
        why = self._host_problem(headers.get(b"host", []))
        if why is not None:
            await self._refuse(scope, receive, send, 421, "unknown_host", why)
            return

        # 2. Origin: the service's own, an allowed one, or none (not a browser).
        origins = headers.get(b"origin", [])
        origin = self._normalized(origins[0]) if len(origins) == 1 else None
        allowed = origin is not None and origin in self.origins
        trusted = allowed or (origin is not None and bool(host)
                              and origin == self.own_origin(str(scope.get("scheme", "http")), host))
        if allowed:
            send = self._with_cors(send, origins[0])
        elif self.origins:
            send = self._with_vary(send)
        if not is_ws and method == "OPTIONS" and origins and b"access-control-request-method" in headers:
            await self._preflight(scope, receive, send, trusted, headers)
            return
        changes = is_ws or method not in _SAFE_METHODS
        if changes and not trusted:
            why = self._origin_problem(origins, origin, headers.get(b"sec-fetch-site", [""])[-1].lower())
            if why is not None:
                await self._refuse(scope, receive, send, 403, "cross_origin", why)
                return

        # 3. A body must say it is JSON (what a page sends without a preflight never is).
        if changes and not is_ws and self._has_body(headers):
            kinds = headers.get(b"content-type", [])
            if len(kinds) != 1 or not _is_json(kinds[0]):
                given = kinds[0][:60] if kinds else "none"
                await self._refuse(scope, receive, send, 415, "unsupported_media_type",
                                   f"send the body as JSON with Content-Type: application/json (given: {given}); "
                                   "with curl: --json '{...}' or -H 'Content-Type: application/json'")
                return

        await self.app(scope, receive, send)

    def _host_problem(self, values: list[str]) -> str | None:
        if not values:
            return None  # HTTP/1.0 or an embedding host: browsers always send Host
        if len(values) > 1:
            return "the request names more than one Host"
        parsed = _split_host(values[0])
        if parsed is not None and self.host_allowed(parsed[0]):
            return None
        shown = values[0][:100]
        return (f"this service does not answer to the host name {shown!r}; if it is yours, start the service "
                f"with --allowed-host {parsed[0] if parsed else shown}")

    @staticmethod
    def _origin_problem(origins: list[str], origin: str | None, site: str) -> str | None:
        """Why a request that is not trusted may not change anything (None: not from a page)."""
        if not origins:
            if site == "cross-site":  # a browser says so even where it sends no Origin
                return "a request from another site's page may not change anything here"
            return None
        if origin is None:  # "null" (sandboxed pages, file://), junk, or two of them: never allowed
            return f"requests from pages of {origins[0][:100]!r} may not change anything here"
        return (f"requests from pages of {origin} may not change anything here; if that site is yours, start the "
                f"service with --allow-origin {origin}")

    # -- pieces ---------------------------------------------------------------------------------
    @staticmethod
    def _normalized(origin: str) -> str | None:
        try:
            return origin_of(origin)
        except ValueError:
            return None

    @staticmethod
    def _has_body(headers: dict[bytes, list[str]]) -> bool:
        if b"transfer-encoding" in headers:
            return True
        lengths = headers.get(b"content-length", [])
        return any(v.strip() != "0" for v in lengths)

    def _with_cors(self, send: Send, origin: str) -> Send:
        grant = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
                 (b"access-control-expose-headers", _EXPOSE_HEADERS)]

        async def cors_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *grant]}
            await send(message)
        return cors_send

    @staticmethod
    def _with_vary(send: Send) -> Send:
        """Answers depend on ``Origin`` once some origin gets CORS: caches must know."""
        async def vary_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"vary", b"Origin")]}
            await send(message)
        return vary_send

    async def _preflight(self, scope: Scope, receive: Receive, send: Send, ok: bool,
                         headers: dict[bytes, list[str]]) -> None:
        """A browser asking before a cross-origin request: granted to allowed origins only."""
        if not ok:
            await self._refuse(scope, receive, send, 403, "cross_origin",
                               "this origin is not allowed; start the service with --allow-origin ORIGIN")
            return
        out = [(b"access-control-allow-methods", _ALLOW_METHODS), (b"access-control-allow-headers", _ALLOW_HEADERS),
               (b"access-control-max-age", _PREFLIGHT_MAX_AGE),
               (b"vary", b"Access-Control-Request-Method, Access-Control-Request-Headers"),
               (b"content-length", b"0")]
        # Chrome's Private Network Access: a public site's page asks before calling loopback.
        if headers.get(b"access-control-request-private-network", [""])[-1].strip().lower() == "true":
            out.append((b"access-control-allow-private-network", b"true"))
        await send({"type": "http.response.start", "status": 204, "headers": out})
        await send({"type": "http.response.body", "body": b""})

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, code: str,
                      message: str) -> None:
        """The service's error shape; for a WebSocket, the handshake is answered so (or closed
        unaccepted, which servers answer with 403), so the socket never opens."""
        answer = ApiError(status, code, message).response()
        if scope["type"] == "http":
            await answer(scope, receive, send)
            return
        head = [(k, v) for k, v in answer.raw_headers]
        connect = await receive()
        if connect["type"] != "websocket.connect":
            return
        if "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": status, "headers": head})
            await send({"type": "websocket.http.response.body", "body": answer.body})
        else:
            await send({"type": "websocket.close", "code": 1008})
