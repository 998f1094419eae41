"""``StageActor``: a Ray actor that owns one model backend and streams its tokens.

The actor is asynchronous, so ``cancel``, ``info``, ``load`` and ``unload`` are answered while a
generation runs. Generations take turns (llama.cpp contexts are not re-entrant), and
``unload`` waits for the running one: a model is never unloaded mid-generation.

``generate`` is a Ray streaming generator (call it with ``.options(num_returns="streaming")``).
It yields small dicts, never raises for a model failure, and always ends with one ``end`` item,
so the actor survives a failed generation and the caller always learns how the stage ended:

    {"text": str, "logprob": float | None, "confidence": float}     one per token
    {"error": code, "message": str}                                  the model failed
    {"end": True, "tokens", "first_token_s", "duration_s", "tokens_per_s", "cancelled"}
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from typing import Any, AsyncIterator

import ray

from .backend import GenerationOptions, Messages, ModelError, make_backend


def token_confidence(logprob: float | None, prior: float) -> float:
    """The model's probability of the token it chose; the stage's prior when the backend gives none."""
    if logprob is None:
        return prior
    return min(1.0, max(0.0, math.exp(logprob)))


@ray.remote(num_cpus=0, max_concurrency=64)
class StageActor:
    def __init__(self, stage: str, model: str, backend: str, source: str, options: dict[str, Any], confidence_prior: float):
        self.stage = stage
        self.prior = confidence_prior
        self.backend = make_backend(model, backend, source, options)
        self._turn = asyncio.Lock()
        self._active: set[str] = set()  # requests waiting for their turn or generating
        self._cancelled: set[str] = set()  # a subset of _active
        self._generating = False
        self.load_error: str | None = None

    async def load(self) -> bool:
        """Load the model now (idempotent). Returns whether it is loaded; the error is kept for ``info``."""
        async with self._turn:
            try:
                await self.backend.load()
                self.load_error = None
            except ModelError as exc:
                self.load_error = str(exc)
        return await self.backend.is_loaded()

    async def unload(self) -> None:
        async with self._turn:
            await self.backend.unload()

    async def info(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {
            "stage": self.stage,
            "model": self.backend.name,
            "backend": self.backend.kind,
            "loaded": await self.backend.is_loaded(),
            "busy": self._generating,
            "error": self.load_error,
            "node_id": ctx.get_node_id(),
            "pid": os.getpid(),
        }

    async def cancel(self, request_id: str) -> bool:
        """Stop (or never start) the generation for ``request_id``. Returns whether it was pending."""
        if request_id not in self._active:
            return False
        self._cancelled.add(request_id)
        return True

    async def generate(self, request_id: str, messages: Messages, max_tokens: int, temperature: float) -> AsyncIterator[dict[str, Any]]:
        started = time.perf_counter()
        first = last = None
        count = 0
        self._active.add(request_id)
        try:
            async with self._turn:
                self._generating = True
                try:
                    if request_id not in self._cancelled:
                        # aclosing: leaving the loop must stop the backend before the next turn starts.
                        stream = self.backend.stream(messages, GenerationOptions(max_tokens, temperature))
                        async with contextlib.aclosing(stream):
                            async for token in stream:
                                last = time.perf_counter()
                                first = first or last
                                count += 1
                                yield {"text": token.text, "logprob": token.logprob, "confidence": token_confidence(token.logprob, self.prior)}
                                if request_id in self._cancelled:
                                    break
                except ModelError as exc:
                    yield {"error": exc.code, "message": str(exc)}
                except Exception as exc:  # a backend bug must not take the stage down with it
                    yield {"error": "model_error", "message": f"{type(exc).__name__}: {exc}"}
                finally:
                    self._generating = False
            decode_s = (last - first) if first and last and count > 1 else 0.0
            yield {
                "end": True,
                "tokens": count,
                "first_token_s": round(first - started, 6) if first else None,
                "duration_s": round(time.perf_counter() - started, 6),
                "tokens_per_s": round((count - 1) / decode_s, 2) if decode_s else None,
                "cancelled": request_id in self._cancelled,
            }
        finally:
            self._active.discard(request_id)
            self._cancelled.discard(request_id)
