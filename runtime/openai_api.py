"""OpenAI's API, the parts chat clients use: /v1/models, /v1/chat/completions, /v1/embeddings.

Streaming is server-sent events: ``data: {chat.completion.chunk}`` lines ending ``data: [DONE]``.
Earlier stages arrive as ``delta.reasoning_content`` (as DeepSeek's and vLLM's APIs send
reasoning, which Open WebUI shows folded), the plan's last stage as ``delta.content``. Every
chunk carries ``mirador`` (the Mirador event); the last one, and a non-streamed answer, also
``mirador.query_id`` for ``mirador rate``. Extra request fields: ``incognito`` (bool).
Errors: ``{"error": {message, type, param, code}}``.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from typing import Any

from aiohttp import web

from .http_ask import EMBED_MODEL, AskRun, ask_fields, conversation, offered, resolve, stream_response
from .http_server import ApiError, incognito, json_body
from .ollama_api import embedding_input, embeddings


async def models(request: web.Request) -> web.Response:
    daemon = request.app["daemon"]
    created = int(daemon.started_at)
    names = [*offered(daemon), *([EMBED_MODEL] if daemon.memory is not None else [])]
    return web.json_response({"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "mirador"}
                                                         for n in names]})


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    daemon = request.app["daemon"]
    body = await json_body(request)
    name, selected = resolve(daemon, body.get("model"))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    question, history, system = conversation(body.get("messages"))
    if not question:
        raise ApiError(400, "'messages' must hold at least one user message", param="messages")
    if body.get("n") not in (None, 1):
        raise ApiError(400, "only n = 1 is supported", param="n")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    fields = ask_fields(selected, question, history, system, limit, body.get("temperature"),
                        incognito(request, body.get("incognito")), body.get("seed"))
    run = AskRun(daemon, fields, request.remote)
    created = int(time.time())
    completion_id = f"chatcmpl-{run.ask.query_id}"

    def usage(answer: Any) -> dict[str, int]:
        tokens = answer.totals()["eval_count"]
        return {"prompt_tokens": 0, "completion_tokens": tokens, "total_tokens": tokens}

    def finish(answer: Any, mirador: dict[str, Any]) -> str:
        return "stop" if mirador.get("cancelled") else answer.done_reason()

    if not stream:
        done: dict[str, Any] = {}

        async def keep(event: str, parts: tuple[dict[str, Any], str, str]) -> None:
            if event == "done":
                done.update(parts[0])

        answer = await run.stream(keep)
        message = {"role": "assistant", "content": answer.content()}
        if answer.thinking():
            message["reasoning_content"] = answer.thinking()
        return web.json_response({
            "id": completion_id, "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": 0, "message": message, "finish_reason": finish(answer, done), "logprobs": None}],
            "usage": usage(answer), "mirador": {"query_id": answer.query_id, "event": "done", **done},
        })

    response = await stream_response(request, "text/event-stream")
    first = True

    async def write(event: str, parts: tuple[dict[str, Any], str, str]) -> None:
        nonlocal first
        mirador, thinking, content = parts
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        first = False
        if content:
            delta["content"] = content
        if thinking:
            delta["reasoning_content"] = thinking
        chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": name,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}], "mirador": mirador}
        if event == "done":
            chunk["choices"][0]["finish_reason"] = finish(run.answer, mirador)
            chunk["usage"] = usage(run.answer)
        await response.write(_sse(chunk))

    await run.stream(write)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def embeddings_v1(request: web.Request) -> web.Response:
    daemon, body, name, texts = await embedding_input(request)
    if not texts:
        raise ApiError(400, "'input' must be a string or a non-empty list of strings (token arrays are not supported)",
                       param="input")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise ApiError(400, "encoding_format must be \"float\" or \"base64\"", param="encoding_format")
    vectors: list[Any] = await embeddings(daemon, texts)
    if encoding == "base64":  # little-endian float32, as OpenAI's (the openai client asks for it by default)
        vectors = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
    return web.json_response({"object": "list", "model": name,
                              "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                              "usage": {"prompt_tokens": 0, "total_tokens": 0}})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings_v1)
