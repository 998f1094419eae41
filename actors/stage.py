"""``StageActor``: a Ray actor that owns a stage's models (primary, then fallbacks) and streams tokens.

The actor is asynchronous. Generations take turns on the model (``Turns``: llama.cpp contexts are
not re-entrant), first come, first served. Control never waits behind them: ``cancel``, ``info``,
``load`` and ``unload`` run in their own Ray concurrency group, so they are not queued behind
generation calls however many wait (Ray gives each group its own slots, thread and event loop);
their work then runs on the model's loop, where every model and turn lives. ``load`` and
``unload`` wait only for the running generation, not for the waiting ones (a model is never
unloaded mid-generation). ``cancel`` takes a waiting generation out of the queue at once (it
ends with ``cancelled``, without its turn) and stops a running one at its next token.

Background work (speculative jobs, ``runtime/jobs.py``) comes through ``generate(...,
background=True)`` and ``prefill``: it takes the model only when no question waits, never loads
a model, evaluates its prompt in small chunks and gives the model back at the next token or
chunk when a question arrives (``Turns.preempt``).

``load``/``unload`` take a model name; the ``Preloader`` decides which models are loaded.
``generate`` is a Ray streaming generator (call it with ``.options(num_returns="streaming")``).
It tries the stage's models in order until one answers; it yields small dicts, never raises for
a model failure, and always ends with one ``end`` item, so the actor survives a failed
generation and the caller always learns how the stage ended:

    {"accepted": n}                                                  the actor has the request; n ahead of it
    {"turn": queued_s}                                               its turn on the model has come
    {"context": [memory ids]}                                        memories given to the model
    {"model": name, "cold": bool}                                    this model answers now (cold: not loaded yet)
    {"text": str, "logprob": float | None, "confidence": float}     one per token
    {"error": code, "message": str, "model": name}                   that model failed
    {"end": True, "model", "tokens", "first_token_s", "duration_s", "tokens_per_s", "cancelled", "cold", "queued_s",
     "prompt_tokens", "reused_tokens" (found evaluated in the model's cache), "preempted", "yield_s" (background),
     "adapter" (the version of the LoRA adapter the model answered with, or None)}

``accepted`` comes at once, before the request waits for its turn: a caller that does not get it
soon knows the actor is not running (restarting, or waiting for a node), not merely busy.
``turn`` comes first on the model's turn, before anything that could take time (a caller times
the stage from it, and knows its question no longer waits); a request cancelled while it waited
gets no ``turn``, only its ``end``. ``queued_s`` is how long it waited for its turn.

A model that fails before its first token hands over to the next one; once tokens have gone
out, a failure ends the stage (a fallback would start the answer over).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, AsyncIterator

import ray

from .backend import Backend, GenerationOptions, Messages, ModelError, make_backend
from .confidence import ConfidenceTracker
from .node import node_info
from .turns import Turns

MEMORY_HEADER = "From earlier conversations with this user (use only what is relevant):"


# Generation calls that may be in the actor at once (waiting for their turn or generating). The
# daemon's admission control ([daemon] max_waiting) keeps far fewer waiting; this is high so
# that a call is never queued by Ray, where ``accepted`` could not answer at once and a cancel
# could not reach it.
GENERATIONS = 1000
CONTROL = "control"  # the concurrency group of cancel, info, load and unload
# Prompt tokens a background generation evaluates between checks for a waiting question: a
# question waits at most one chunk (measured with SmolLM2-135M on one thread: 4 tokens ~30 ms,
# 16 ~90 ms; throughput 135 vs 171 tokens/s). The model's own time matters less than the user's.
BACKGROUND_CHUNK = 4


@ray.remote(num_cpus=0, max_concurrency=GENERATIONS, concurrency_groups={CONTROL: 16})
class StageActor:
    def __init__(self, stage: str, models: list[dict[str, Any]], confidence_prior: float, system_prompt: str = ""):
        """``models``: manifest entries {name, backend, source, options}, primary first.
        ``system_prompt`` is run through each llama.cpp model once at load, so that the first
        question finds it in the prompt cache and only its own words need evaluating."""
        self.stage = stage
        self.prior = confidence_prior
        self.system_prompt = system_prompt
        self.backends: dict[str, Backend] = {
            m["name"]: make_backend(m["name"], m["backend"], m["source"], m["options"]) for m in models
        }
        self.primary = models[0]["name"]
        # Ray runs __init__ on the default group's event loop, the one generate runs on: the
        # model's loop. Control methods, on their own group's loop, hand their work to it.
        self._loop = asyncio.get_running_loop()
        self._turns = Turns()
        self._active: set[str] = set()  # requests waiting for their turn or generating
        self._cancelled: set[str] = set()  # a subset of _active
        self._generating: str | None = None  # the model generating now
        self.errors: dict[str, str] = {}  # model -> why its last load failed
        self._prefilled: list[str] = []  # the memory ids of the last prefill's block, in its order
        self._background_work: str | None = None  # the background request holding the model now

    def _backend(self, model: str | None) -> Backend:
        name = model or self.primary
        if name not in self.backends:
            raise ModelError(f"the {self.stage} actor does not run {name!r} (it runs {', '.join(self.backends)})")
        return self.backends[name]

    async def _on_model_loop(self, coro: Any) -> Any:
        """Run ``coro`` on the model's loop (control methods arrive on their own group's loop)."""
        if asyncio.get_running_loop() is self._loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    @ray.method(concurrency_group=CONTROL)
    async def load(self, model: str | None = None) -> dict[str, Any]:
        """Load ``model`` (default: the primary) now; idempotent. Never raises for a model failure:
        returns {model, loaded, load_s, error}; the error is also kept for ``info``."""
        return await self._on_model_loop(self._load(model))

    async def _load(self, model: str | None) -> dict[str, Any]:
        backend = self._backend(model)
        async with self._turns.urgent():
            started = time.perf_counter()
            try:
                if not await backend.is_loaded():
                    await backend.load()
                    if self.system_prompt and backend.kind == "llamacpp":
                        warmup = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": "Hello"}]
                        async with contextlib.aclosing(backend.stream(warmup, GenerationOptions(1, 0.0))) as stream:
                            async for _ in stream:
                                pass
                self.errors.pop(backend.name, None)
            except ModelError as exc:
                self.errors[backend.name] = str(exc)
            return {"model": backend.name, "loaded": await backend.is_loaded(), "error": self.errors.get(backend.name),
                    "load_s": round(time.perf_counter() - started, 4)}

    @ray.method(concurrency_group=CONTROL)
    async def unload(self, model: str | None = None) -> list[str]:
        """Unload ``model`` (default: every model). Waits for a running generation: a model is
        never unloaded mid-answer. Returns the models that were loaded and now are not."""
        return await self._on_model_loop(self._unload(model))

    async def _unload(self, model: str | None) -> list[str]:
        async with self._turns.urgent():
            unloaded = []
            for backend in [self._backend(model)] if model else self.backends.values():
                if await backend.is_loaded():
                    await backend.unload()
                    unloaded.append(backend.name)
            return unloaded

    @ray.method(concurrency_group=CONTROL)
    async def set_adapter(self, model: str) -> dict[str, Any]:
        """Switch ``model`` to the LoRA adapter its AdapterStore has active (or to none), between
        two generations: waits for the running one, goes before the waiting ones, so no answer
        mixes two adapters. Returns {model, adapter: version or None, error}."""
        return await self._on_model_loop(self._set_adapter(model))

    async def _set_adapter(self, model: str) -> dict[str, Any]:
        backend = self._backend(model)
        if backend.kind != "llamacpp":
            return {"model": model, "adapter": None, "error": f"{model} is not an embedded model: it has no adapters"}
        async with self._turns.urgent():
            error = None
            try:
                await backend.use_adapter()
            except ModelError as exc:  # the adapter it had stays
                error = backend.adapter_error = str(exc)
            return {"model": model, "adapter": self._adapters()[model], "error": error}

    def _adapters(self) -> dict[str, Any]:
        """model -> the version of the adapter it runs with (None: base), for embedded models."""
        return {name: (b.adapter or {}).get("version") for name, b in self.backends.items() if b.kind == "llamacpp"}

    @ray.method(concurrency_group=CONTROL)
    async def info(self) -> dict[str, Any]:
        return await self._on_model_loop(self._info())

    async def _info(self) -> dict[str, Any]:
        primary = self.backends[self.primary]
        return {
            "stage": self.stage,
            "model": self.primary,
            "fallbacks": [name for name in self.backends if name != self.primary],
            "backend": primary.kind,
            "server": primary.server,
            "loaded": await primary.is_loaded(),
            "models": {name: await b.is_loaded() for name, b in self.backends.items()},
            "busy": self._generating is not None,
            "generating": self._generating,
            "background": self._background_work,  # a background job's request holding the model now, if any
            "waiting": self._turns.waiting,
            "error": self.errors.get(self.primary),
            "adapters": self._adapters(),
            "adapter_errors": {name: b.adapter_error for name, b in self.backends.items() if getattr(b, "adapter_error", None)},
            **node_info(),
        }

    @ray.method(concurrency_group=CONTROL)
    async def cancel(self, request_id: str) -> bool:
        """Stop the generation for ``request_id``: at once if it waits for its turn, at its next
        token if it runs. Returns whether it was pending."""
        return await self._on_model_loop(self._cancel(request_id))

    async def _cancel(self, request_id: str) -> bool:
        if request_id not in self._active:
            return False
        self._cancelled.add(request_id)
        self._turns.withdraw(request_id)
        return True

    def _with_memories(self, messages: Messages, memories: list[dict[str, Any]], budget: int) -> tuple[Messages, list[str]]:
        """Add as many recalled memories as fit ``budget`` tokens of the answering model (the most
        similar first), as a system message right after the stage's own (which stays first for
        the prompt cache). The block does not list them by similarity, which changes with every
        word typed, but those of the last prefill first (in its order), then the others, oldest
        first: a prompt prefilled while the question was typed is then still the prefix once it
        is complete, as long as the memories it had are recalled again."""
        backend = self.backends[self.primary]
        lines: list[tuple[float, str, str]] = []  # (ts, id, line)
        tokens = backend.count_tokens(MEMORY_HEADER)
        for memory in memories:
            line = f"\n- The user said: {memory['question'].strip()}\n  You answered: {memory['answer'].strip()}"
            tokens += backend.count_tokens(line)  # each line once: this runs before the first token
            if tokens > budget:
                break
            lines.append((float(memory.get("ts") or 0.0), memory["id"], line))
        if not lines:
            return messages, []
        prefilled = {id_: n for n, id_ in enumerate(self._prefilled)}
        lines.sort(key=lambda line: (prefilled.get(line[1], len(prefilled)), line[0]))
        block, used = MEMORY_HEADER + "".join(line for _, _, line in lines), [id_ for _, id_, _ in lines]
        at = 1 if messages and messages[0]["role"] == "system" else 0
        return messages[:at] + [{"role": "system", "content": block}] + messages[at:], used

    def _should_stop(self, request_id: str, background: bool) -> Any:
        """What the model's thread checks before each token (or prompt chunk): a cancel, or, for
        background work, a question waiting for the model."""
        preempt = self._turns.preempt
        return lambda: request_id in self._cancelled or (background and preempt.is_set())

    async def prefill(self, request_id: str, messages: Messages, memories: list[dict[str, Any]] | None,
                      memory_tokens: int, chunk: int) -> dict[str, Any]:
        """Background work: evaluate the prompt a question will have, as far as it is known
        (``messages`` end with the user's words typed so far), into the primary model's cache,
        ``chunk`` tokens at a time, giving the model back at once when a question wants it.
        Returns the backend's report ({tokens, reused, evaluated, eval_s, stopped}) plus
        {supported (False: the backend keeps no prompt cache we can fill), cancelled, preempted,
        memories}."""
        backend = self.backends[self.primary]
        self._active.add(request_id)
        try:
            if request_id in self._cancelled or not await self._turns.take(request_id, background=True):
                return {"cancelled": True, "preempted": False}
            try:
                if not await backend.is_loaded():  # background work never loads a model: the preloader decides that
                    return {"error": f"{backend.name} is not loaded", "cancelled": False, "preempted": False}
                used: list[str] = []
                if memories and memory_tokens > 0:
                    messages, used = self._with_memories(messages, memories, memory_tokens)
                self._prefilled, self._background_work = used, request_id
                report = await backend.prefill(messages, self._should_stop(request_id, True), chunk)
                return {**(report or {"tokens": 0}), "supported": report is not None, "memories": used,
                        "cancelled": request_id in self._cancelled,
                        "preempted": bool(report and report["stopped"]) and request_id not in self._cancelled}
            finally:
                self._background_work = None
                self._turns.give_back()
        except ModelError as exc:
            return {"error": str(exc), "cancelled": False, "preempted": False}
        finally:
            self._active.discard(request_id)
            self._cancelled.discard(request_id)

    async def generate(self, request_id: str, messages: Messages, max_tokens: int, temperature: float,
                       models: list[str] | None = None, memories: list[dict[str, Any]] | None = None,
                       memory_tokens: int = 0, seed: int | None = None,
                       background: bool = False) -> AsyncIterator[dict[str, Any]]:
        """Stream an answer from the first of ``models`` (default: all of the stage's, in order) that works,
        with as many of ``memories`` as fit ``memory_tokens``. ``background``: nobody waits for
        it (a speculative job): it takes the model only when no question wants it and stops at
        the next token when one does (its ``end`` says ``preempted``)."""
        started = time.perf_counter()
        first = last = None
        count = 0
        answered_by = None
        cold = False
        prompt: dict[str, int] = {}
        should_stop = self._should_stop(request_id, background)
        self._active.add(request_id)
        try:
            yield {"accepted": len(self._active) - 1}
            # Checked first: a cancel may have come between ``accepted`` and here.
            has_turn = request_id not in self._cancelled and await self._turns.take(request_id, background=background)
            preempted = False
            turn = time.perf_counter()
            if has_turn:  # else withdrawn: cancelled while it waited, it ends now without its turn
                try:
                    yield {"turn": round(turn - started, 6)}
                    if memories and memory_tokens > 0:
                        with contextlib.suppress(ModelError):  # counting needs the model; a failing one is reported below
                            await self.backends[self.primary].load()
                        messages, used = self._with_memories(messages, memories, memory_tokens)
                        yield {"context": used}
                    for name in models or list(self.backends):
                        if request_id in self._cancelled:
                            break
                        answered_by = name
                        self._generating = name
                        self._background_work = request_id if background else None
                        # cold: this answer waits for the model to load (the preloader missed it)
                        cold = not await self.backends[name].is_loaded()
                        if background and cold:  # background work never loads a model: the preloader decides that
                            yield {"error": "not_loaded", "message": f"{name} is not loaded", "model": name}
                            continue
                        yield {"model": name, "cold": cold}
                        confidence = ConfidenceTracker(self.prior)
                        backend = self.backends[name]
                        try:
                            if background:  # its prompt in small chunks, so that a question waits at most one
                                await backend.prefill(messages, should_stop, BACKGROUND_CHUNK)
                                if should_stop():
                                    break
                            # aclosing: leaving the loop must stop the backend before the next turn starts.
                            stream = backend.stream(messages, GenerationOptions(max_tokens, temperature, seed), should_stop)
                            async with contextlib.aclosing(stream):
                                async for token in stream:
                                    last = time.perf_counter()
                                    first = first or last
                                    count += 1
                                    yield {"text": token.text, "logprob": token.logprob,
                                           "confidence": confidence.update(token.logprob)}
                                    if request_id in self._cancelled:
                                        break
                            prompt.update(backend.prompt_stats)
                        except ModelError as exc:
                            yield {"error": exc.code, "message": str(exc), "model": name}
                        except Exception as exc:  # a backend bug must not take the stage down with it
                            yield {"error": "model_error", "message": f"{type(exc).__name__}: {exc}", "model": name}
                        else:
                            break  # answered (even if briefly): no fallback
                        if count:
                            break  # failed mid-answer: a fallback would start the answer over
                finally:
                    preempted = self._turns.preempt.is_set() and request_id not in self._cancelled
                    self._generating = self._background_work = None
                    self._turns.give_back()
                    if preempted:
                        prompt["yield_s"] = round(self._turns.last_yield_s or 0.0, 6)  # preempt to model given back
            decode_s = (last - first) if first and last and count > 1 else 0.0
            yield {
                "end": True,
                "model": answered_by,
                "tokens": count,
                "first_token_s": round(first - started, 6) if first else None,
                "duration_s": round(time.perf_counter() - started, 6),
                "tokens_per_s": round((count - 1) / decode_s, 2) if decode_s else None,
                "cancelled": request_id in self._cancelled,
                "preempted": background and preempted,
                "cold": cold,
                "queued_s": round(turn - started, 6),
                "adapter": self._adapters().get(answered_by) if answered_by else None,  # the LoRA it answered with
                **prompt,
            }
        finally:
            self._active.discard(request_id)
            self._cancelled.discard(request_id)
