"""Mirador's own HTTP endpoints (what the web view uses; documented API like the rest) and the
web view's files.

    POST   /mirador/rate            {"score": 1..5, "query_id": "..."} -> {"rated": {...}}
    GET    /mirador/memories?limit=N[&q=TEXT]   -> {"memories": [...]} (with similarity when searched)
    DELETE /mirador/memories/{id}   -> {"forgotten": 1}, 404 when unknown
    GET    /mirador/status          -> what `mirador status --json` prints, with "http": this API's URL
    GET    /ui, /ui/{file}          -> runtime/web/ (package data)
"""

from __future__ import annotations

import itertools
import mimetypes
from importlib import resources
from typing import Any

from aiohttp import web

from mirador.client import protocol

from .http_server import ApiError, json_body

_ids = itertools.count(1)


def _request(type_: str, **fields: Any) -> dict[str, Any]:
    """A request dict checked exactly as the ZeroMQ server checks one."""
    request = {"v": protocol.VERSION, "id": f"http-{type_}-{next(_ids)}", "type": type_,
               **{k: v for k, v in fields.items() if v is not None}}
    return protocol.check_request(request)  # ProtocolError -> 4xx in the guard


async def rate(request: web.Request) -> web.Response:
    body = await json_body(request)
    result = await request.app["daemon"].rate(_request("rate", score=body.get("score"), query_id=body.get("query_id")))
    return web.json_response({"rated": result})


def _limit(request: web.Request, default: int) -> int:
    text = request.query.get("limit", str(default))
    if not text.isdigit():
        raise ApiError(400, f"'limit' must be a non-negative integer, not {text!r}")
    return int(text)


async def memories(request: web.Request) -> web.Response:
    daemon, query = request.app["daemon"], request.query.get("q", "").strip()
    if query:
        reply = await daemon.memory_op(_request("memory", op="search", query=query, limit=_limit(request, 10)))
    else:
        reply = await daemon.memory_op(_request("memory", op="list", limit=_limit(request, 50)))
    return web.json_response({"memories": reply["records"]})


async def forget(request: web.Request) -> web.Response:
    return web.json_response(await request.app["daemon"].memory_op(
        _request("memory", op="forget", target=request.match_info["id"])))


async def status(request: web.Request) -> web.Response:
    return web.json_response(await request.app["daemon"].status())


WEB = resources.files("mirador.runtime") / "web"


async def ui(request: web.Request) -> web.Response:
    name = request.match_info.get("file") or "index.html"
    # Only plain file names of runtime/web/: no paths, so nothing outside it can be named.
    if "/" in name or "\\" in name or name.startswith(".") or not (WEB / name).is_file():
        raise ApiError(404, f"no file {name!r} in the web view" if (WEB / "index.html").is_file()
                       else "the web view is not installed (runtime/web/index.html is missing)")
    kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
    charset = "utf-8" if kind.startswith("text/") or kind in ("application/javascript", "application/json") else None
    return web.Response(body=(WEB / name).read_bytes(), content_type=kind, charset=charset,
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/mirador/rate", rate)
    app.router.add_get("/mirador/memories", memories)
    app.router.add_delete("/mirador/memories/{id}", forget)
    app.router.add_get("/mirador/status", status)
    app.router.add_get("/ui", ui)
    app.router.add_get("/ui/{file}", ui)
