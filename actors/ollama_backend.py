"""The Ollama backend: models served by a local (or remote) Ollama server.

Talks through the official ``ollama`` AsyncClient. The host is the model's ``host`` option, else
``$OLLAMA_HOST``, else Ollama's default, resolved where the backend runs: in the stage actor, so
a stage placed on another node of a Ray cluster talks to that node's Ollama (its ``localhost``,
or the ``OLLAMA_HOST`` of the ``ray start`` that started the node) unless the model names a host.
Every way of not reaching the server (refused connection, reset mid-stream, timeout) becomes one
BackendUnavailable that says where Ollama was expected and how to start it; Ollama's own error
replies become ModelError / UnknownModel.
"""

from __future__ import annotations

import math
import os
from typing import Any, AsyncIterator, Callable

import httpx
import ollama

from .backend import Backend, BackendUnavailable, GenerationOptions, Messages, ModelError, Token, UnknownModel

DEFAULT_HOST = "http://127.0.0.1:11434"


class OllamaBackend(Backend):
    """An Ollama model. Options: host, keep_alive (passed through: "5m", 0 unloads, -1 forever), num_ctx."""

    kind = "ollama"

    def __init__(self, name: str, source: str, host: str | None = None, keep_alive: str | float | None = None, num_ctx: int | None = None):
        super().__init__(name, source)
        self.host = host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST
        self.keep_alive = keep_alive
        self.num_ctx = num_ctx  # changing it makes Ollama reload the model, so it is fixed per model
        self._client = ollama.AsyncClient(host=self.host)

    @property
    def server(self) -> str:
        return self.host

    def _unreachable(self) -> BackendUnavailable:
        return BackendUnavailable(
            f"Ollama is not running at {self.host}: start it with `ollama serve` "
            f"(or set OLLAMA_HOST / this model's host) and pull the model with `ollama pull {self.source}`"
        )

    def _translate(self, exc: ollama.ResponseError) -> ModelError:
        if exc.status_code == 404:
            return UnknownModel(f"Ollama at {self.host} has no model {self.source!r}: run `ollama pull {self.source}`")
        return ModelError(f"Ollama at {self.host} failed on {self.source!r}: {exc.error}")

    async def _request(self, **kwargs: Any) -> Any:
        try:
            return await self._client.chat(model=self.source, **kwargs)
        except ollama.ResponseError as exc:
            raise self._translate(exc) from None
        except (ConnectionError, httpx.TransportError):
            raise self._unreachable() from None

    async def load(self) -> None:
        # Ollama loads a model when it gets a chat request with no messages.
        await self._request(messages=[], keep_alive=self.keep_alive)

    async def unload(self) -> None:
        await self._request(messages=[], keep_alive=0)

    async def is_loaded(self) -> bool:
        try:
            running = await self._client.ps()
        except (ConnectionError, httpx.TransportError, ollama.ResponseError):
            return False
        return any(m.model == self.source or m.name == self.source for m in running.models)

    async def stream(self, messages: Messages, options: GenerationOptions,
                     should_stop: Callable[[], bool] | None = None) -> AsyncIterator[Token]:
        opts: dict[str, Any] = {"num_predict": options.max_tokens, "temperature": options.temperature}
        if options.seed is not None:
            opts["seed"] = options.seed
        if self.num_ctx:
            opts["num_ctx"] = self.num_ctx
        parts = await self._request(messages=messages, stream=True, options=opts, keep_alive=self.keep_alive, logprobs=True)
        try:
            async for part in parts:
                text = part.message.content or ""
                # Servers without logprob support leave the field out: the stage then uses its prior.
                logprob = math.fsum(lp.logprob for lp in part.logprobs) if part.logprobs else None
                if should_stop is not None and should_stop():
                    break
                if text:
                    yield Token(text, logprob)
        except ollama.ResponseError as exc:  # an {"error": ...} line in the middle of the stream
            raise self._translate(exc) from None
        except (ConnectionError, httpx.TransportError):
            raise self._unreachable() from None
