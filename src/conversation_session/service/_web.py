"""The web page (``GET /``) and the routes it needs beyond the service's first API.

The page is three files shipped in the package (``web/``): no build step, nothing fetched from
elsewhere.  They are served with a strict Content-Security-Policy (scripts and styles from this
origin only, nothing inline, no framing), so even a rendering mistake cannot run a script that
a message smuggled in; the page itself builds every piece of content with ``textContent``.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from . import _actions
from ._errors import ApiError

__all__ = ["CSP", "web_routes"]

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "media-src 'self' blob:; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "app.css": "text/css; charset=utf-8"}
_cache: dict[str, bytes] = {}


def _asset(name: str) -> bytes:
    data = _cache.get(name)
    if data is None:
        data = _cache[name] = resources.files(__package__).joinpath("web").joinpath(name).read_bytes()
    return data


def _serve(name: str) -> Response:
    return Response(_asset(name), media_type=_FILES[name], headers={
        "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY", "Cache-Control": "no-cache"})


async def page(request: Request) -> Response:
    return _serve("index.html")


async def asset(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in _FILES or name == "index.html":
        raise ApiError(404, "not_found", f"no file {name!r} here")
    return _serve(name)


def web_routes() -> list[BaseRoute]:
    return [
        Route("/", page, methods=["GET"]),
        Route("/web/{name}", asset, methods=["GET"]),
        Route("/v1/search", _actions.search_sessions, methods=["GET"]),
        Route("/v1/sessions/{sid}", _actions.patch_session, methods=["PATCH"]),
        Route("/v1/sessions/{sid}/undo", _actions.post_undo, methods=["POST"]),
        Route("/v1/sessions/{sid}/retry", _actions.post_retry, methods=["POST"]),
        Route("/v1/sessions/{sid}/stats", _actions.get_stats, methods=["GET"]),
        Route("/v1/sessions/{sid}/live", _actions.get_live, methods=["GET"]),
        Route("/v1/sessions/{sid}/stop", _actions.post_stop, methods=["POST"]),
        Route("/v1/sessions/{sid}/cut", _actions.post_cut, methods=["POST"]),
    ]
