"""The daemon's HTTP front door: Ollama's API (/api), OpenAI's (/v1), Mirador's own (/mirador, /ui).

aiohttp, in the daemon's own event loop beside the ZeroMQ server (an ``AppRunner`` and a
``TCPSite``, no extra process or thread). Every handler calls the ``Daemon`` object with the same
request dicts the ZeroMQ server validates (``mirador.client.protocol``).

Safe by default (``guard`` below, in this order for every request):
  1. a request with a valid API key (``Authorization: Bearer KEY``, keys in ``<config>/api_keys``)
     may come from anywhere; without one, only a loopback peer is served, and only when its
     ``Host`` header names a loopback address (or the listen address): a web page that rebinds
     its own DNS name to 127.0.0.1 sends its own name and is refused (DNS rebinding);
  2. a browser's ``Origin`` must be a localhost origin, the page's own origin, or one listed in
     ``[http] origins``; allowed origins get CORS headers, others a 403;
  3. bodies over ``[http] max_body_bytes`` get a 413 before they are read.
A non-loopback listen address refuses to start while no API key exists (``check_listen``).
Errors are JSON in the shape of the API that was called, with a 4xx that says what to fix;
anything unexpected is logged and answered 500 in the same shape.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import socket
from typing import Any, Awaitable, Callable

from aiohttp import web

from mirador.client import api_keys
from mirador.client.paths import Paths
from mirador.client.protocol import ProtocolError

from .config import ConfigError, HttpConfig

log = logging.getLogger("mirador.http")

LOOPBACK_NAMES = {"localhost", "localhost.", "127.0.0.1", "::1", "[::1]"}
LOCAL_ORIGIN = re.compile(r"https?://(localhost|127\.\d+\.\d+\.\d+|\[::1\])(:\d+)?")
CORS_HEADERS = "Authorization, Content-Type, X-Mirador-Incognito"
INCOGNITO_HEADER = "X-Mirador-Incognito"

# ProtocolError codes -> HTTP status
STATUS = {"bad_request": 400, "too_large": 413, "unknown_stage": 404, "unknown_chain": 404, "unknown_model": 404,
          "not_found": 404, "memory_disabled": 409, "learning_disabled": 409, "model_unused": 409,
          "model_error": 502, "shutting_down": 503, "busy": 503}


class ApiError(Exception):
    """An HTTP error answered in the API's own error shape."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    @classmethod
    def of(cls, exc: ProtocolError) -> "ApiError":
        return cls(STATUS.get(exc.code, 500), exc.message, exc.code)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host.rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(http: HttpConfig, paths: Paths) -> None:
    """Refuse a listen address beyond loopback while no API key exists, or one that is taken
    (said before Ray starts)."""
    if http.listen and not is_loopback(http.host) and not api_keys.read(paths):
        raise ConfigError(f"the HTTP API would listen on {http.listen}, beyond this machine, but no API key exists: "
                          f"create one with `mirador keys api-key` (clients then send `Authorization: Bearer KEY`), "
                          f"or listen on 127.0.0.1 ([http] listen, --http)")
    if http.listen and http.port:  # taken (say, by another daemon): said now, not after Ray and the models start
        try:
            socket.create_server((http.host, http.port), reuse_port=False).close()
        except OSError as exc:
            raise ConfigError(f"the HTTP API cannot listen on {http.listen}: {exc.strerror or exc}; choose another "
                              "address ([http] listen, --http HOST:PORT) or turn it off (--http off)") from None
    if "*" in http.origins and not api_keys.read(paths):
        raise ConfigError("[http] origins = [\"*\"] lets every web page call the API: create an API key first "
                          "(`mirador keys api-key`), or list the origins you use")


def error_response(request: web.Request, status: int, message: str, code: str | None = None,
                   param: str | None = None) -> web.Response:
    """Ollama's shape {"error": "..."}, or OpenAI's {"error": {message, type, param, code}} under /v1."""
    if request.path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        if status in (401, 403):
            kind = "authentication_error" if status == 401 else "permission_error"
        body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    else:
        body = {"error": message}
    return web.json_response(body, status=status)


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, or a 400 that says what is wrong with it."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"the request body is larger than {request.app['limit']} bytes ([http] max_body_bytes)") from None
    if not raw.strip():
        raise ApiError(400, "the request needs a JSON object as its body")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, not {type(body).__name__}")
    return body


def incognito(request: web.Request, option: Any) -> bool:
    """Incognito (nothing recalled, stored or learned) by header ``X-Mirador-Incognito: 1`` or option."""
    header = request.headers.get(INCOGNITO_HEADER, "").strip().lower()
    if option is not None and not isinstance(option, bool):
        raise ApiError(400, "'incognito' must be true or false", param="incognito")
    return header in ("1", "true", "yes", "on") or bool(option)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpApi:
    def __init__(self, daemon: Any, config: HttpConfig, paths: Paths):
        from . import mirador_api, ollama_api, openai_api

        self.daemon, self.config, self.paths = daemon, config, paths
        self.app = web.Application(client_max_size=config.max_body_bytes, middlewares=[self.guard])
        self.app["daemon"], self.app["limit"] = daemon, config.max_body_bytes
        for module in (ollama_api, openai_api, mirador_api):
            module.add_routes(self.app)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        # handler_cancellation: a client that disconnects cancels its handler at once, which is
        # how a vanished client stops its generations even between two tokens.
        # shutdown_timeout: at daemon shutdown an answer still streaming is cut after 1 s (its
        # handler is cancelled, which cancels the ask), not waited for a minute.
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ConfigError(f"the HTTP API cannot listen on {self.config.listen}: {exc.strerror or exc}; "
                              "choose another address ([http] listen, --http HOST:PORT) or turn it off (--http off)") from None
        host, port = site._server.sockets[0].getsockname()[:2]  # the real port when 0 was asked for
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        self.app["listen"] = {self.config.host.lower(), f"{self.config.host}:{port}".lower()}
        keys = len(api_keys.read(self.paths))
        log.info("HTTP API at %s (Ollama /api, OpenAI /v1, web view /ui; %d API key(s) in %s)", self.url, keys,
                 api_keys.path(self.paths))

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- the guard ------------------------------------------------------------------------
    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if not header.lower().startswith("bearer "):
            return False
        given = header[7:].strip().encode()
        return any(hmac.compare_digest(given, key.encode()) for key in api_keys.read(self.paths))

    def _host_ok(self, request: web.Request) -> bool:
        host = request.host.lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name in LOOPBACK_NAMES or is_loopback(name) or host in self.app.get("listen", ()) or name in self.app.get("listen", ())

    def _origin_ok(self, request: web.Request, origin: str) -> bool:
        origin = origin.rstrip("/").lower()
        return (bool(LOCAL_ORIGIN.fullmatch(origin)) or origin in (o.lower() for o in self.config.origins)
                or "*" in self.config.origins or origin in (f"http://{request.host}".lower(), f"https://{request.host}".lower()))

    @web.middleware
    async def guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        preflight = request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
        # A preflight carries no credentials and runs nothing: it needs only an allowed origin.
        if not preflight and not self._authorized(request):
            if not is_loopback(request.remote or ""):
                return error_response(request, 401, "this API needs a key from clients on other machines: send "
                                      "`Authorization: Bearer KEY` (`mirador keys api-key` on the daemon's machine creates one)")
            if not self._host_ok(request):
                return error_response(request, 403, f"Host {request.host!r} is not this daemon's address: use "
                                      "http://127.0.0.1:PORT or http://localhost:PORT, or send an API key")
        if origin is not None and not self._origin_ok(request, origin):
            return error_response(request, 403, f"origin {origin} may not call this API: add it to [http] origins "
                                  "in mirador.toml (like OLLAMA_ORIGINS)")
        if request.content_length is not None and request.content_length > self.config.max_body_bytes:
            return error_response(request, 413, f"the request body ({request.content_length} bytes) is larger than "
                                  f"{self.config.max_body_bytes} bytes ([http] max_body_bytes)")
        if preflight:
            response: web.StreamResponse = web.Response(status=204)
        else:
            try:
                response = await handler(request)
            except ApiError as exc:
                response = error_response(request, exc.status, exc.message, exc.code, exc.param)
            except ProtocolError as exc:
                err = ApiError.of(exc)
                response = error_response(request, err.status, err.message, err.code)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                text = {404: f"no such endpoint: {request.method} {request.path}",
                        405: f"{request.method} is not allowed on {request.path}"}.get(exc.status, exc.reason)
                response = error_response(request, exc.status, text)
            except (ConnectionResetError, ConnectionError):
                raise
            except Exception as exc:
                log.exception("%s %s failed", request.method, request.path)
                response = error_response(request, 500, f"internal error: {type(exc).__name__}: {exc}")
        if origin is not None and not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
            if preflight:
                response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
                response.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
                response.headers["Access-Control-Max-Age"] = "600"
        return response
