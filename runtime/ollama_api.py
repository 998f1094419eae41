"""Ollama's API (docs/api.md of ollama/ollama), the parts its clients and Open WebUI call.

Chat and generate stream NDJSON chunks in Ollama's shape; each chunk also carries ``mirador``:
the Mirador event it came from (as ``mirador ask --json`` prints it). Earlier stages arrive as
thinking, the plan's last stage as content (see ``http_ask``). The final chunk (``done: true``)
also carries ``query_id`` for ``mirador rate`` and ``POST /mirador/rate``.

Not done by Mirador: create, copy, push, delete and blobs answer 501 with what to do instead.
``keep_alive`` only matters for an empty request (0 unloads); otherwise the preloader decides
what stays loaded. ``format``, ``tools``, ``images``, ``raw`` and ``context`` are ignored.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
from typing import Any

from aiohttp import web

from . import gguf_meta
from .http_ask import (EMBED_MODEL, AskRun, ask_fields, conversation, load_or_unload, models_of, offered, resolve,
                       stream_response)
from .http_server import ApiError, incognito, json_body

OLLAMA_API_LEVEL = "0.9.0"  # the Ollama release whose API shapes these follow (chat thinking appeared in 0.9)
FAR_FUTURE = "2999-12-31T23:59:59Z"  # expires_at: the preloader unloads only to make room


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


# -- what a model is -------------------------------------------------------------------------
def _manifest_facts(daemon: Any, name: str) -> dict[str, Any]:
    """size (bytes), modified (ts), format, family, parameter_size, quantization of one manifest model."""
    from mirador.actors.backend import ModelError
    from mirador.actors.llamacpp import resolve_source

    spec = daemon.config.models[name]
    facts = {"size": int((spec.size_mb or 0) * 1e6), "modified": daemon.started_at, "format": "", "family": "",
             "parameter_size": "", "quantization": "", "source": spec.source, "backend": spec.backend}
    if spec.backend == "llamacpp":
        try:
            path = resolve_source(spec.source)
        except ModelError:
            return facts
        meta = gguf_meta.read(path)
        stat = path.stat()
        count = meta.get("general.parameter_count")
        facts.update(size=stat.st_size, modified=stat.st_mtime, format="gguf", family=meta.get("general.architecture", ""),
                     parameter_size=meta.get("general.size_label") or (f"{count / 1e6:.0f}M" if count else ""),
                     quantization=meta.get("quantization", ""), license=meta.get("general.license", ""))
    return facts


def describe(daemon: Any, name: str, selected: dict[str, Any]) -> dict[str, Any]:
    """One /api/tags entry. A pipeline's size is the sum of the distinct models it may run."""
    facts = [_manifest_facts(daemon, m) for m in models_of(daemon, selected)]
    alone = "model" in selected
    families = list(dict.fromkeys(f["family"] for f in facts if f["family"]))
    quants = {f["quantization"] for f in facts}
    params = {f["parameter_size"] for f in facts}
    size = sum(f["size"] for f in facts)
    modified = max([f["modified"] for f in facts] or [daemon.started_at])
    identity = f"{name}\n{sorted(selected.items())}\n{[(f['source'], f['size'], f['modified']) for f in facts]}"
    return {
        "name": name, "model": name, "modified_at": _iso(modified), "size": size,
        # Not a content hash (hashing the weights at every listing would cost seconds): it changes
        # when the model's files or the stages it runs change.
        "digest": hashlib.sha256(identity.encode()).hexdigest(),
        "details": {"parent_model": "", "format": facts[0]["format"] if alone else "mirador",
                    "family": (families[0] if families else "") if alone else "mirador",
                    "families": families or None,
                    "parameter_size": params.pop() if len(params) == 1 else "",
                    "quantization_level": quants.pop() if len(quants) == 1 else ""},
    }


def _embed_entry(daemon: Any) -> dict[str, Any]:
    return {"name": EMBED_MODEL, "model": EMBED_MODEL, "modified_at": _iso(daemon.started_at), "size": 22_900_000,
            "digest": hashlib.sha256(EMBED_MODEL.encode()).hexdigest(),
            "details": {"parent_model": "", "format": "onnx", "family": "bert", "families": ["bert"],
                        "parameter_size": "23M", "quantization_level": "Q8_0"}}


# -- handlers ---------------------------------------------------------------------------------
async def root(request: web.Request) -> web.StreamResponse:
    if "text/html" in request.headers.get("Accept", ""):
        raise web.HTTPFound("/ui")  # a browser: the web view
    from .daemon import version

    return web.Response(text=f"Ollama is running (this is Mirador {version()}, with an Ollama-compatible API)")


async def api_version(request: web.Request) -> web.Response:
    from .daemon import version

    return web.json_response({"version": OLLAMA_API_LEVEL, "mirador": version()})


async def tags(request: web.Request) -> web.Response:
    daemon = request.app["daemon"]
    models = [describe(daemon, name, selected) for name, selected in offered(daemon).items()]
    if daemon.memory is not None:
        models.append(_embed_entry(daemon))
    return web.json_response({"models": models})


async def ps(request: web.Request) -> web.Response:
    daemon = request.app["daemon"]
    loaded = (await daemon.models_op({"id": "http-ps", "type": "models", "op": "ps"}))["models"]
    out: dict[str, dict[str, Any]] = {}
    for row in loaded:
        entry = out.get(row["model"])
        if entry is None:
            entry = out[row["model"]] = {**describe(daemon, row["model"], {"model": row["model"]}),
                                         "expires_at": FAR_FUTURE, "size_vram": 0, "size": 0, "mirador": {"actors": []}}
        entry["size"] += int((row.get("size_mb") or 0) * 1e6)  # each actor holding it holds a copy
        entry["mirador"]["actors"].append(row["actor"])
    return web.json_response({"models": list(out.values())})


async def show(request: web.Request) -> web.Response:
    daemon = request.app["daemon"]
    body = await json_body(request)
    wanted = body.get("model", body.get("name"))
    if wanted in (EMBED_MODEL, f"{EMBED_MODEL}:latest") and daemon.memory is not None:
        entry = _embed_entry(daemon)
        return web.json_response({"license": "Apache-2.0", "modelfile": f"# {EMBED_MODEL}: Mirador's embedding model (int8 ONNX)",
                                  "parameters": "", "template": "", "details": entry["details"],
                                  "model_info": {"general.architecture": "bert"}, "capabilities": ["embedding"],
                                  "modified_at": entry["modified_at"]})
    name, selected = resolve(daemon, wanted)
    entry = describe(daemon, name, selected)
    config = daemon.config
    info: dict[str, Any] = {"general.architecture": entry["details"]["family"]}
    if "model" in selected:
        facts = _manifest_facts(daemon, name)
        info.update({"general.basename": name, "mirador.backend": facts["backend"], "mirador.source": facts["source"]})
        modelfile, parameters, system, license_ = f"# {name}: a manifest model, alone (no stages, no memory)\nFROM {facts['source']}", "", "", facts.get("license", "")
    elif "chain" in selected:
        chain = config.chains[selected["chain"]]
        info["mirador.steps"] = [f"{st.name} ({st.model})" for st in chain.steps]
        modelfile = f"# {name}: {chain.description}\n" + "\n".join(f"# step {st.name}: {st.model}: {st.prompt}" for st in chain.steps)
        parameters, system, license_ = "", "", ""
    else:
        stages = selected.get("stages") or list(config.stages)
        info["mirador.stages"] = [f"{s} ({', '.join(config.stages[s].models)})" for s in stages]
        what = "the full pipeline: router, learner, memory, power profile" if not selected else f"the {stages[0]} stage alone"
        modelfile = f"# {name}: {what}\n" + "\n".join(f"# stage {s}: {', '.join(config.stages[s].models)}" for s in stages)
        first = config.stages[stages[-1]]
        parameters = f"temperature {first.temperature}\nnum_predict {first.max_tokens}"
        system, license_ = (config.stages[stages[0]].system_prompt if len(stages) == 1 else ""), ""
    capabilities = ["completion"] + (["thinking"] if len(_stage_names(daemon, selected)) > 1 else [])
    return web.json_response({"license": license_, "modelfile": modelfile, "parameters": parameters, "template": "",
                              "system": system, "details": entry["details"], "model_info": info,
                              "capabilities": capabilities, "modified_at": entry["modified_at"]})


def _stage_names(daemon: Any, selected: dict[str, Any]) -> list[str]:
    if "model" in selected:
        return [selected["model"]]
    if "chain" in selected:
        return [st.name for st in daemon.config.chains[selected["chain"]].steps]
    return selected.get("stages") or list(daemon.config.stages)


def _unloads(keep_alive: Any) -> bool:
    """Ollama's keep_alive 0 (a number or a duration such as "0s", "0m")."""
    if isinstance(keep_alive, (int, float)) and not isinstance(keep_alive, bool):
        return keep_alive == 0
    return isinstance(keep_alive, str) and keep_alive.strip().rstrip("smh").strip() in ("0", "0.0")


def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"'{key}' must be true or false")
    return value


def _options(body: dict[str, Any]) -> dict[str, Any]:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'options' must be an object, e.g. {\"temperature\": 0.2, \"num_predict\": 64}")
    return options


async def chat(request: web.Request) -> web.StreamResponse:
    return await _answer(request, "chat")


async def generate(request: web.Request) -> web.StreamResponse:
    return await _answer(request, "generate")


async def _answer(request: web.Request, kind: str) -> web.StreamResponse:
    daemon = request.app["daemon"]
    body = await json_body(request)
    name, selected = resolve(daemon, body.get("model"))
    stream, options = _flag(body, "stream", True), _options(body)
    if kind == "chat":
        question, history, system = conversation(body.get("messages"))
    else:
        prompt, system = body.get("prompt") or "", body.get("system") or ""
        if not isinstance(prompt, str) or not isinstance(system, str):
            raise ApiError(400, "'prompt' and 'system' must be strings")
        question, history = prompt, []
    private = incognito(request, options.get("incognito"))
    if not question.strip():  # Ollama: an empty request loads the model; with keep_alive 0 it unloads it
        unload = _unloads(body.get("keep_alive"))
        await load_or_unload(daemon, selected, unload)
        empty = {"message": {"role": "assistant", "content": ""}} if kind == "chat" else {"response": ""}
        return web.json_response({"model": name, "created_at": now(), **empty, "done_reason": "unload" if unload else "load",
                                  "done": True})
    fields = ask_fields(selected, question, history, system, options.get("num_predict"), options.get("temperature"), private,
                         options.get("seed"))
    run = AskRun(daemon, fields, request.remote)

    def chunk(parts: tuple[dict[str, Any], str, str]) -> dict[str, Any]:
        mirador, thinking, content = parts
        if kind == "chat":
            message = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            out = {"model": name, "created_at": now(), "message": message, "done": False}
        else:
            out = {"model": name, "created_at": now(), "response": content, "done": False}
            if thinking:
                out["thinking"] = thinking
        if mirador["event"] == "done":
            out.update(done=True, done_reason="cancelled" if mirador.get("cancelled") else run.answer.done_reason(),
                       **run.answer.totals(), query_id=mirador["query_id"])
        out["mirador"] = mirador
        return out

    if not stream:
        final: dict[str, Any] = {}

        async def keep(event: str, parts: tuple[dict[str, Any], str, str]) -> None:
            if event == "done":
                final.update(chunk(parts))

        answer = await run.stream(keep)
        if kind == "chat":
            final["message"] = {"role": "assistant", "content": answer.content(), **({"thinking": answer.thinking()} if answer.thinking() else {})}
        else:
            final["response"] = answer.content()
            if answer.thinking():
                final["thinking"] = answer.thinking()
        return web.json_response(final)

    response = await stream_response(request, "application/x-ndjson")

    async def write(event: str, parts: tuple[dict[str, Any], str, str]) -> None:
        await response.write(_dumps(chunk(parts)))

    await run.stream(write)
    await response.write_eof()
    return response


async def embedding_input(request: web.Request) -> tuple[Any, dict[str, Any], str, list[str] | None]:
    """What Ollama's and OpenAI's embedding requests share: the daemon, the body, the model's name
    (checked), and ``input`` as a list of strings (None when it is neither a string nor such a list)."""
    daemon = request.app["daemon"]
    body = await json_body(request)
    name = _embedding_model(daemon, body.get("model"))
    texts = body.get("input")
    texts = [texts] if isinstance(texts, str) else texts
    ok = isinstance(texts, list) and all(isinstance(t, str) for t in texts)
    return daemon, body, name, texts if ok else None


async def embed(request: web.Request) -> web.Response:
    daemon, _, name, texts = await embedding_input(request)
    if texts is None:
        raise ApiError(400, "'input' must be a string or a list of strings")
    started = asyncio.get_running_loop().time()
    vectors = await embeddings(daemon, texts)
    return web.json_response({"model": name, "embeddings": vectors,
                              "total_duration": int((asyncio.get_running_loop().time() - started) * 1e9),
                              "load_duration": 0, "prompt_eval_count": 0})


async def embeddings_legacy(request: web.Request) -> web.Response:
    daemon = request.app["daemon"]
    body = await json_body(request)
    _embedding_model(daemon, body.get("model"))
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string")
    return web.json_response({"embedding": (await embeddings(daemon, [prompt]))[0] if prompt else []})


def _embedding_model(daemon: Any, name: Any) -> str:
    """Every offered name embeds with Mirador's one embedding model (that of its memory)."""
    if isinstance(name, str) and name.removesuffix(":latest") == EMBED_MODEL:
        return EMBED_MODEL
    return resolve(daemon, name)[0]


async def embeddings(daemon: Any, texts: list[str]) -> list[list[float]]:
    """Mirador's local embedding model (all-MiniLM-L6-v2, in the memory actor)."""
    if daemon.memory is None:
        why = daemon.memory_error or "memory.enabled = false in mirador.toml"
        raise ApiError(503, f"embeddings come from the memory's model, and memory is off ({why})")
    return await daemon.memory.embed.remote(texts) if texts else []


async def pull(request: web.Request) -> web.StreamResponse:
    """Put the models a name runs on this machine, with progress lines like `mirador models pull`."""
    from .pull import PullError
    from .pull import pull as pull_model

    daemon = request.app["daemon"]
    body = await json_body(request)
    name, selected = resolve(daemon, body.get("model", body.get("name")))
    stream = _flag(body, "stream", True)
    specs = [daemon.config.models[m] for m in models_of(daemon, selected)]
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def work() -> None:  # pip and Ollama's pull block: a thread, its progress handed to the loop
        try:
            for spec in specs:
                for step in pull_model(spec):
                    loop.call_soon_threadsafe(queue.put_nowait, {k: v for k, v in step.items() if v is not None})
            loop.call_soon_threadsafe(queue.put_nowait, {"status": "success"})
        except PullError as exc:
            loop.call_soon_threadsafe(queue.put_nowait, {"error": str(exc)})
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    worker = loop.run_in_executor(None, work)
    response = await stream_response(request, "application/x-ndjson") if stream else None
    last: dict[str, Any] = {}
    while (step := await queue.get()) is not None:
        last = step
        if response is not None:
            await response.write(_dumps(step))
    await worker
    if response is not None:
        await response.write_eof()
        return response
    if "error" in last:
        raise ApiError(500, last["error"])
    return web.json_response(last)


def _not_done(what: str, instead: str) -> Any:
    async def handler(request: web.Request) -> web.Response:
        raise ApiError(501, f"Mirador does not {what}: {instead}")

    return handler


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", root)
    app.router.add_get("/api/version", api_version)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", ps)
    app.router.add_post("/api/show", show)
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/generate", generate)
    app.router.add_post("/api/embed", embed)
    app.router.add_post("/api/embeddings", embeddings_legacy)
    app.router.add_post("/api/pull", pull)
    manifest = "add a [models.NAME] entry to models.toml in Mirador's config dir (`mirador models list` shows them)"
    app.router.add_post("/api/create", _not_done("create models", manifest))
    app.router.add_post("/api/copy", _not_done("copy models", manifest))
    app.router.add_post("/api/push", _not_done("push models to a registry", "its models come from PyPI packages, "
                                               "GGUF files or an Ollama server"))
    app.router.add_delete("/api/delete", _not_done("delete models", "remove its entry from models.toml; "
                                                   "`mirador models unload NAME` frees its memory now"))
    blobs = _not_done("store blobs", "put the GGUF file on disk and name its path in models.toml")
    app.router.add_route("HEAD", "/api/blobs/{digest}", blobs)
    app.router.add_post("/api/blobs/{digest}", blobs)
