"""Answering one question: pick the stages, stream each stage actor's tokens out as events.

The hot path is here: a token goes from the actor's Ray stream to the client's socket with one
dict built and one msgpack encode in between. Stages run in the configured order.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray

from mirador.client.protocol import ProtocolError

from .config import Config, StageConfig
from .server import Emit

log = logging.getLogger("mirador.orchestrator")


@dataclass
class Ask:
    """One question in flight."""

    request_id: str
    text: str
    stages: list[str]
    route: str
    options: dict[str, Any]
    query_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    cancelled: bool = False
    running: dict[str, Any] = field(default_factory=dict)  # stage -> actor generating for it


class Orchestrator:
    def __init__(self, config: Config, actors: dict[str, Any]):
        self.config = config
        self.actors = actors  # stage name -> StageActor handle

    def new_ask(self, request: dict[str, Any]) -> Ask:
        requested = request.get("stages")
        if requested:
            unknown = [s for s in requested if s not in self.config.stages]
            if unknown:
                raise ProtocolError(
                    "unknown_stage",
                    f"unknown stage {', '.join(map(repr, unknown))}; configured stages: {', '.join(self.config.stages)}",
                    request["id"],
                )
            # Keep the configured order whatever order they were named in.
            stages, route = [s for s in self.config.stages if s in requested], "requested"
        else:
            stages, route = list(self.config.stages), "default"
        return Ask(request["id"], request["text"], stages, route, dict(request.get("options") or {}))

    def cancel(self, ask: Ask) -> None:
        ask.cancelled = True
        for actor in ask.running.values():
            actor.cancel.remote(ask.query_id)

    def _messages(self, stage: StageConfig, ask: Ask) -> list[dict[str, str]]:
        # The system prompt goes first and never changes, so llama.cpp reuses its KV cache.
        messages = [{"role": "system", "content": stage.system_prompt}] if stage.system_prompt else []
        return messages + [{"role": "user", "content": ask.text}]

    async def run(self, ask: Ask, emit: Emit) -> None:
        started = time.perf_counter()
        await emit("start", query_id=ask.query_id, route=ask.route, stages=ask.stages)
        metrics: dict[str, Any] = {}
        for name in ask.stages:
            if ask.cancelled:
                break
            metrics[name] = await self._run_stage(self.config.stages[name], ask, emit)
        await emit(
            "done",
            final=True,
            query_id=ask.query_id,
            cancelled=ask.cancelled,
            metrics={"duration_s": round(time.perf_counter() - started, 6), "stages": metrics},
        )

    async def _run_stage(self, stage: StageConfig, ask: Ask, emit: Emit) -> dict[str, Any]:
        actor, model = self.actors[stage.name], stage.model
        await emit("stage_start", stage=stage.name, model=model)
        max_tokens = ask.options.get("max_tokens", stage.max_tokens)
        temperature = ask.options.get("temperature", stage.temperature)
        end: dict[str, Any] | None = None
        ask.running[stage.name] = actor
        try:
            stream = actor.generate.options(num_returns="streaming").remote(
                ask.query_id, self._messages(stage, ask), max_tokens, temperature
            )
            async for ref in stream:
                item = await ref
                if "text" in item:
                    await emit("token", stage=stage.name, model=model, text=item["text"],
                               confidence=item["confidence"], logprob=item["logprob"])
                elif "error" in item:
                    log.warning("stage %s (%s) failed: %s", stage.name, model, item["message"])
                    await emit("error", stage=stage.name, code=item["error"], message=item["message"])
                else:
                    end = item
        except ray.exceptions.RayError as exc:
            log.error("stage %s actor failed: %s", stage.name, exc)
            await emit("error", stage=stage.name, code="stage_unavailable",
                       message=f"the {stage.name} stage's actor is not available: {type(exc).__name__}")
        finally:
            ask.running.pop(stage.name, None)
            if end is None:  # the client went away or we failed: stop the model
                actor.cancel.remote(ask.query_id)
        stats = {k: v for k, v in (end or {}).items() if k != "end"}
        stats.setdefault("cancelled", ask.cancelled)
        await emit("stage_end", stage=stage.name, model=model, **stats)
        return {"model": model, **stats}
