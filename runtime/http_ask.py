"""What the Ollama and OpenAI APIs share: the models offered, a chat's messages as an ``ask``
request, and one ask run for an HTTP client.

Models offered (``offered``):
  ``mirador``          the full pipeline, exactly as ``mirador ask``: router, learner, memory, power
  ``mirador:STAGE``    that stage alone (``stages: [STAGE]``)
  ``chain:NAME``       a configured chain
  ``NAME``             a manifest model alone, on the actor that runs it: no stages, no memory
A trailing ``:latest`` (which Ollama clients add) is ignored.

Conversation: the last user message is the question; the messages before it are the request's
history (user/assistant pairs, turns of ``history``), system messages its ``system``.

Several stages in one assistant message: tokens of every stage but the plan's last are
``thinking`` (Ollama's ``message.thinking``, OpenAI's ``delta.reasoning_content``), the last
stage's tokens are ``content``. When the last stage produced nothing (it failed, timed out, or
the power profile dropped it), the final chunk's content is the text of the latest earlier stage
that answered, so a chat always ends with a readable answer (``Answer.fallback``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web

from mirador.client import protocol
from mirador.client.protocol import ProtocolError

from .http_server import ApiError
from .server import PeerGone

log = logging.getLogger("mirador.http")

EMBED_MODEL = "all-minilm-l6-v2"  # the memory's embedding model, offered for /api/embed and /v1/embeddings
_ids = itertools.count(1)


def offered(daemon: Any) -> dict[str, dict[str, Any]]:
    """Model name -> the ask fields that select it, in display order."""
    config = daemon.config
    models: dict[str, dict[str, Any]] = {"mirador": {}}
    models.update({f"mirador:{stage}": {"stages": [stage]} for stage in config.stages})
    models.update({f"chain:{chain}": {"chain": chain} for chain in config.chains})
    for name in config.models:  # those an actor runs: the others cannot answer
        if config.actor_for_model(name) in daemon.actors and name not in models:
            models[name] = {"model": name}
    return models


def resolve(daemon: Any, name: Any) -> tuple[str, dict[str, Any]]:
    """(name, ask fields) for a requested model name, or a 404 in Ollama's words."""
    if not isinstance(name, str) or not name.strip():
        raise ApiError(400, "'model' is required: a model name (GET /api/tags lists them)", param="model")
    name = name.strip()
    models = offered(daemon)
    for candidate in (name, name.removesuffix(":latest")):
        if candidate in models:
            return candidate, models[candidate]
    raise ApiError(404, f"model {name!r} not found: Mirador offers {', '.join(models)} (GET /api/tags)",
                   code="model_not_found", param="model")


def text_of(content: Any, where: str) -> str:
    """A message's text: a string, or OpenAI's list of parts (only text parts are read)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
    raise ApiError(400, f"{where}.content must be a string", param="messages")


def conversation(messages: Any) -> tuple[str, list[dict[str, str]], str]:
    """(question, history turns, system) of a chat's messages; ('', [], '') when there are none."""
    if messages is None:
        return "", [], ""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "'messages' must be a list of {role, content} objects", param="messages")
    roles = [m.get("role") for m in messages]
    for i, role in enumerate(roles):
        if role not in ("system", "user", "assistant", "tool", "developer"):
            raise ApiError(400, f"messages[{i}].role must be system, user, assistant or tool, not {role!r}", param="messages")
    texts = [text_of(m.get("content"), f"messages[{i}]") for i, m in enumerate(messages)]
    if not messages:
        return "", [], ""
    if "user" not in roles:
        raise ApiError(400, "the messages need a user message: the last one is the question", param="messages")
    last = len(roles) - 1 - roles[::-1].index("user")
    system = "\n\n".join(t for r, t in zip(roles, texts) if r in ("system", "developer") and t.strip())
    turns: list[dict[str, str]] = []
    for role, text in zip(roles[:last], texts[:last]):
        if role == "user":
            if turns and not turns[-1]["answer"]:  # two user messages in a row: one question
                turns[-1]["question"] += "\n\n" + text
            else:
                turns.append({"question": text, "answer": ""})
        elif role in ("assistant", "tool"):
            if not turns:
                turns.append({"question": "", "answer": ""})
            turns[-1]["answer"] = (turns[-1]["answer"] + "\n\n" + text).strip()
    if not texts[last].strip():
        raise ApiError(400, "the last user message is empty: it is the question", param="messages")
    return texts[last], turns, system


def ask_fields(selected: dict[str, Any], question: str, history: list[dict[str, str]], system: str,
               max_tokens: Any, temperature: Any, private: bool, seed: Any = None) -> dict[str, Any]:
    """The ``ask`` request of an HTTP chat, checked exactly like a ZeroMQ client's."""
    options: dict[str, Any] = {} if seed is None else {"seed": seed}
    if max_tokens is not None:
        if type(max_tokens) is not int:
            raise ApiError(400, "the token limit (num_predict, max_tokens) must be an integer", param="max_tokens")
        if max_tokens > 0:  # Ollama's -1/-2 mean no limit: the stage's own applies
            options["max_tokens"] = min(max_tokens, 8192)
    if temperature is not None:
        options["temperature"] = temperature
    request = {"v": protocol.VERSION, "id": f"http-{next(_ids)}", "type": "ask", "text": question, **selected,
               "memory": not private}
    if options:
        request["options"] = options
    if history:
        request["history"] = history
    if system:
        request["system"] = system
    try:
        return protocol.check_request(request)
    except ProtocolError as exc:
        raise ApiError(400, exc.message.replace("'options.", "'"), code=exc.code) from None


def models_of(daemon: Any, selected: dict[str, Any], first_only: bool = False) -> list[str]:
    """The manifest models an API model may run: every model of its stages (or, ``first_only``,
    each stage's first model: what an empty chat loads and ``keep_alive: 0`` unloads)."""
    config = daemon.config
    if "model" in selected:
        return [selected["model"]]
    if "chain" in selected:
        return list(dict.fromkeys(step.model for step in config.chains[selected["chain"]].steps))
    stages = selected.get("stages") or list(config.stages)
    return list(dict.fromkeys(m for s in stages for m in config.stages[s].models[:1 if first_only else None]))


async def load_or_unload(daemon: Any, selected: dict[str, Any], unload: bool) -> None:
    for name in models_of(daemon, selected, first_only=True):
        request = {"id": f"http-{next(_ids)}", "type": "models", "op": "unload" if unload else "load", "name": name}
        await daemon.models_op(request)


@dataclass
class Answer:
    """One ask's events as an HTTP client sees them: which stage is the answer, the text so far,
    the totals. ``event`` turns each event into (mirador, thinking, content) for one chunk.

    Progressive stages overlap, so their tokens interleave; the thinking text must not. One
    earlier stage at a time streams as thinking (under a ``[stage]`` line); the tokens of another
    that runs meanwhile wait and follow when the streaming one ends. The ``mirador`` field of
    each chunk still carries every token live, for clients that show stages side by side.
    """

    received: float = field(default_factory=time.perf_counter)
    stages: list[str] = field(default_factory=list)
    texts: dict[str, list[str]] = field(default_factory=dict)
    ends: dict[str, dict[str, Any]] = field(default_factory=dict)
    query_id: str = ""
    done: dict[str, Any] | None = None
    max_tokens: int | None = None
    _thinking: str | None = None  # the earlier stage whose tokens stream as thinking now
    _waiting: dict[str, list[str]] = field(default_factory=dict)  # other earlier stages' tokens, held back
    _shown: set[str] = field(default_factory=set)  # earlier stages whose thinking is complete

    @property
    def final_stage(self) -> str | None:
        return self.stages[-1] if self.stages else None

    def event(self, name: str, fields: dict[str, Any]) -> tuple[dict[str, Any], str, str]:
        """(the ``mirador`` dict, as ``mirador ask --json`` prints it; thinking text; content text)."""
        thinking = content = ""
        if name == "token":
            stage, text = fields["stage"], fields["text"]
            self.texts.setdefault(stage, []).append(text)
            if stage == self.final_stage:
                content = text
            elif self._thinking in (None, stage):
                thinking = self._header(stage) + text if self._thinking is None else text
                self._thinking = stage
            else:
                self._waiting.setdefault(stage, []).append(text)
        elif name == "start":
            self.stages, self.query_id = list(fields["stages"]), fields["query_id"]
        elif name == "stage_end":
            self.ends[fields["stage"]] = fields
            thinking = self._next_thinking(fields["stage"])
        elif name == "done":
            self.done = fields
            thinking = self._next_thinking(None)
            content = self.fallback()
        return {"event": name, **fields, "t": round(time.perf_counter() - self.received, 6)}, thinking, content

    def _header(self, stage: str) -> str:
        return f"{chr(10) * 2 if self._shown else ''}[{stage}]\n"

    def _next_thinking(self, ended: str | None) -> str:
        """When the streaming thinking stage ends (or at ``done``), the held-back stages' text."""
        if ended is not None and ended != self._thinking:
            return ""
        if self._thinking is not None:
            self._shown.add(self._thinking)
        self._thinking, out = None, ""
        for stage in self.stages[:-1]:
            if stage in self._shown or stage not in self._waiting:
                continue
            out += self._header(stage) + "".join(self._waiting.pop(stage))
            if stage in self.ends or ended is None:
                self._shown.add(stage)  # finished meanwhile: all of it is out
            else:
                self._thinking = stage  # still running: it streams from here on
                break
        return out

    def text(self, stage: str | None) -> str:
        return "".join(self.texts.get(stage, ())) if stage else ""

    def thinking(self) -> str:
        """All the earlier stages' text, as the streamed thinking reads once complete."""
        return "\n\n".join(f"[{s}]\n{self.text(s)}" for s in self.stages[:-1] if self.text(s))

    def content(self) -> str:
        return self.text(self.final_stage) or self.fallback()

    def fallback(self) -> str:
        """The answer when the last stage said nothing: the latest earlier stage's text."""
        if self.text(self.final_stage).strip():
            return ""
        return next((self.text(s) for s in reversed(self.stages[:-1]) if self.text(s).strip()), "")

    def done_reason(self) -> str:
        end = self.ends.get(self.final_stage or "", {})
        limit = self.max_tokens
        return "length" if limit and end.get("tokens", 0) >= limit else "stop"

    def totals(self) -> dict[str, int]:
        """Ollama's final statistics, in nanoseconds, summed over the stages that ran. The stages
        do not count prompt tokens: prompt_eval_count is 0; prompt_eval_duration is the time to
        each stage's first token less its wait for the model."""
        ns = 1_000_000_000
        eval_count = sum(e.get("tokens", 0) or 0 for e in self.ends.values())
        eval_s = sum((e["tokens"] / e["tokens_per_s"]) for e in self.ends.values() if e.get("tokens") and e.get("tokens_per_s"))
        prompt_s = sum(max(0.0, (e.get("first_token_s") or 0) - (e.get("queued_s") or 0)) for e in self.ends.values())
        return {"total_duration": int((time.perf_counter() - self.received) * ns), "load_duration": 0,
                "prompt_eval_count": 0, "prompt_eval_duration": int(prompt_s * ns),
                "eval_count": eval_count, "eval_duration": int(eval_s * ns)}


STATUS_OF_ERROR = {"shutting_down": 503, "memory_unavailable": 503}

Write = Callable[[str, tuple[dict[str, Any], str, str]], Any]


class AskRun:
    """Runs one ask for an HTTP client: ``stream`` calls ``write(event, fields)`` per event until
    ``done`` (the response ends there; storing the exchange goes on in the background).

    A client that goes away (its handler is cancelled, or a write fails) cancels the ask: every
    stage stops at its next token.
    """

    tasks: set[asyncio.Task[Any]] = set()  # asks still storing their exchange after their response

    def __init__(self, daemon: Any, request: dict[str, Any], peer: str | None):
        self.daemon = daemon
        # An HTTP client, for the per-client limit on waiting questions, is its address: a tool
        # makes a connection per request, so a connection would not bound what it can queue.
        self.ask = daemon.new_ask(request, f"http:{peer}".encode())  # raises ProtocolError: unknown stage, chain, model, busy
        self.answer = Answer(max_tokens=(request.get("options") or {}).get("max_tokens"))

    async def stream(self, write: Write) -> Answer:
        finished = asyncio.get_running_loop().create_future()
        answer = self.answer

        async def emit(event: str, final: bool = False, **fields: Any) -> None:
            if finished.done():
                return  # `remembered` and later: the client has its answer already
            parts = answer.event(event, fields)
            if event == "error" and final:
                finished.set_exception(ApiError(STATUS_OF_ERROR.get(fields.get("code"), 500), fields["message"],
                                                fields.get("code")))
                return
            # A client that reads nothing blocks the write once the socket's buffers fill: past the
            # allowance it is dropped like a ZeroMQ client, and its stages stop.
            try:
                await asyncio.wait_for(write(event, parts), self.daemon.config.limits.client_stall_s)
            except TimeoutError:
                log.warning("HTTP client read nothing for %g s; dropped", self.daemon.config.limits.client_stall_s)
                raise PeerGone() from None
            if event == "done":
                finished.set_result(answer)

        async def run() -> None:
            try:
                await self.daemon.run_ask(self.ask, emit)
            except Exception as exc:
                if not finished.done():
                    finished.set_exception(exc)
            finally:
                if not finished.done():
                    finished.set_exception(ApiError(500, "the answer ended without a done event"))

        task = asyncio.ensure_future(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        try:
            return await asyncio.shield(finished)
        except BaseException:
            # The client went away (the handler was cancelled, or a write failed): stop the stages.
            if not task.done():
                log.info("HTTP client went away; its ask %s was cancelled", self.ask.query_id)
                self.daemon.cancel_ask(self.ask)
                task.cancel()
            finished.cancel()  # nobody waits for it any more
            raise


async def stream_response(request: web.Request, content_type: str) -> web.StreamResponse:
    """A prepared streaming response (with CORS headers when the guard let an origin in)."""
    response = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
    origin = request.headers.get("Origin")
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
    await response.prepare(request)
    return response
