"""Answering one question: route it, plan its stages, stream every stage's tokens out as events.

Three ways to run the stages of a question:
  progressive (default)  stages run concurrently as their inputs allow: a stage with
                         ``after_first_token_of`` starts once that stage has produced its first
                         token; a stage with ``needs`` starts when those stages have finished and
                         receives their answers (the Mixture-of-Agents aggregator pattern).
  sequential             one stage after another, each receiving all previous answers.
  chain                  a named chain's steps, one after another, the same way.

A stage that fails, times out or has no model left is skipped with an ``error`` event naming it;
the others go on and the question still ends with ``done``. The hot path per token is one dict
and one msgpack encode between the actor's Ray stream and the client's socket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from mirador.client.protocol import ProtocolError

from .config import Config, Placement
from .placement import RETRY_PAUSE_S as ACTOR_RETRY_PAUSE_S
from .placement import call_while_restarting
from .router import Route, classify, question_type
from .server import Emit, PeerGone

log = logging.getLogger("mirador.orchestrator")


def store_failure(exc: BaseException) -> str:
    """Why a call to the memory store (or the learner) failed, in the user's terms."""
    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        return str(exc.cause)  # the store says why: a full disk, a directory it cannot write
    if isinstance(exc, ray.exceptions.RayError):
        return (f"the store's actor is not running ({type(exc).__name__}); Ray restarts it, so the next "
                "ones are stored again")
    return f"{type(exc).__name__}: {exc}"


class StageUnavailable(Exception):
    """A stage's actor did not take the request within ``actor_wait_s``; the message says why."""


@dataclass(frozen=True)
class Step:
    """One thing to generate: a stage of the plan, or a step of a chain."""

    name: str
    actor_key: str  # which actor runs it
    models: tuple[str, ...]
    system_prompt: str
    max_tokens: int
    temperature: float
    timeout_s: float
    after_first_token_of: str | None = None
    needs: tuple[str, ...] = ()
    memory: bool = False  # receives recalled memories and the session's history


@dataclass
class StepResult:
    text: str
    stats: dict[str, Any]


@dataclass(eq=False)  # compared and hashed by identity: the orchestrator keeps a set of them
class Ask:
    """One question in flight."""

    request_id: str
    text: str
    steps: list[Step]
    route: Route
    mode: str  # progressive | sequential | chain
    session: str | None = None
    use_memory: bool = True  # False: incognito, nothing read, written or learned
    qtype: str = ""  # what the learner keys on: router class + topic
    plan: str = ""  # which plan answers: "quick+synthesis", "chain:NAME"
    routed: bool = False  # the router chose the plan, so the learner may choose instead
    options: dict[str, Any] = field(default_factory=dict)
    query_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    memories: list[dict[str, Any]] = field(default_factory=list)  # recalled for this question
    history: list[dict[str, Any]] = field(default_factory=list)  # earlier turns: the client's, else the session's
    system: str = ""  # the client's own instructions, after each stage's system prompt
    cancelled: bool = False
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # set by a cancel: waiting steps end at once
    running: dict[str, Any] = field(default_factory=dict)  # step -> actor generating for it
    errors: list[dict[str, str]] = field(default_factory=list)  # {stage, model, code} for metrics
    cached: dict[str, Any] | None = None  # the answer cache's hit for the cache stage, if any
    client: bytes = b""  # the connection that asked, for admission control
    turns: int = 0  # how many of its stages hold a model's turn now
    over: bool = False  # its stages have all finished

    @property
    def waiting(self) -> bool:
        """Admitted, with stages still to run, none of them on a model now (see DaemonSection in config_schema.py)."""
        return self.turns == 0 and not self.over and not self.cancelled


def build_messages(system_prompt: str, question: str, previous: dict[str, str],
                   history: list[dict[str, Any]] = ()) -> list[dict[str, str]]:
    """The system prompt goes first and never changes, so llama.cpp reuses its KV cache for it;
    then the session's earlier turns, then the question (with earlier stages' answers)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for turn in history:
        messages += [{"role": "user", "content": turn["question"]}, {"role": "assistant", "content": turn["answer"]}]
    if not previous:
        return messages + [{"role": "user", "content": question}]
    context = "".join(f"## {name} answer\n{text.strip()}\n\n" for name, text in previous.items())
    return messages + [{"role": "user", "content": f"## Question\n{question}\n\n{context}Now write your answer to the question."}]


class Orchestrator:
    def __init__(self, config: Config, actors: dict[str, Any], memory: Any = None, learner: Any = None,
                 on_done: Callable[[Ask, dict[str, Any]], None] | None = None, preloader: Any = None):
        self.config = config
        self.preloader = preloader  # the Preloader actor: loads what a question needs, within the budget
        self.actors = actors  # actor key (stage name, or "model:NAME" for chain-only models) -> handle
        self.memory = memory  # the MemoryStore actor, None when memory is off
        self.learner = learner  # the Learner actor, None when learning is off
        self.on_done = on_done
        self.speculation: Any = None  # speculation.Speculation, set by the daemon when jobs can run
        self.cache_stage = next(iter(config.stages), None)  # whose answers the answer cache keeps and serves
        # Memory and learner writes in flight, and the acknowledgements that follow them: the
        # daemon's shutdown waits for these (``drain``) before it stops the actors.
        self._writes: set[asyncio.Future[Any]] = set()
        self.storing: dict[str, asyncio.Future[Any]] = {}  # query id -> its exchange's write, until done
        self.adapters: dict[str, int] = {}  # model -> the LoRA adapter version deployed for it (runtime/training.py)
        self.power: dict[str, Any] = {"profile": "maximum"}  # the EnergyMonitor's last reading, kept fresh by the daemon
        self.asks: set[Ask] = set()  # admitted and not over
        # What the learner chooses among: every routing stage set, then every chain.
        routed_plans = dict.fromkeys("+".join(stages) for stages in config.routes.values())
        self.candidate_plans = [*routed_plans, *(f"chain:{name}" for name in config.chains)]

    # -- admission -----------------------------------------------------------------------
    def queue(self) -> dict[str, Any]:
        """How many questions wait and how many generate, against the limits (for ``status``)."""
        limits = self.config.limits
        waiting = sum(ask.waiting for ask in self.asks)
        return {"waiting": waiting, "generating": sum(ask.turns > 0 for ask in self.asks), "in_flight": len(self.asks),
                "max_waiting": limits.max_waiting, "max_waiting_per_client": limits.max_waiting_per_client}

    def _admit(self, ask: Ask) -> None:
        """Refuse the ask at once with ``busy`` when too many questions wait, else count it in."""
        limits, rid = self.config.limits, ask.request_id
        waiting = [a for a in self.asks if a.waiting]
        if len(waiting) >= limits.max_waiting:
            raise ProtocolError("busy", f"the daemon is busy: {len(waiting)} questions are waiting for a model "
                                f"([daemon] max_waiting = {limits.max_waiting}); try again when some are answered", rid)
        mine = sum(a.client == ask.client for a in waiting)
        if mine >= limits.max_waiting_per_client:
            raise ProtocolError("busy", f"this client has {mine} questions waiting for a model already ([daemon] "
                                f"max_waiting_per_client = {limits.max_waiting_per_client}); wait for their answers "
                                "or cancel some, then ask again", rid)
        self.asks.add(ask)

    # -- planning ------------------------------------------------------------------------
    def new_ask(self, request: dict[str, Any], client: bytes = b"") -> Ask:
        """Plan a question; raises ProtocolError for a bad request, or ``busy`` (see ``_admit``).
        The ask counts as admitted until ``run`` ends (run it)."""
        ask = self._model_ask(request) if request.get("model") else self._planned_ask(request)
        ask.client = client
        self._admit(ask)
        return ask

    def _planned_ask(self, request: dict[str, Any]) -> Ask:
        """A question answered by stages: the router's plan, the stages requested, or a chain."""
        rid, text = request["id"], request["text"]
        chain, requested = request.get("chain"), request.get("stages")
        if chain and chain not in self.config.chains:
            raise ProtocolError("unknown_chain", f"unknown chain {chain!r}; configured chains: {', '.join(self.config.chains) or 'none'}", rid)
        unknown = [s for s in requested or () if s not in self.config.stages]
        if unknown:
            raise ProtocolError(
                "unknown_stage",
                f"unknown stage {', '.join(map(repr, unknown))}; configured stages: {', '.join(self.config.stages)}",
                rid,
            )
        routed = classify(text)
        ask = Ask(rid, text, [], routed, "sequential" if request.get("sequential") else "progressive",
                  session=request.get("session"), use_memory=request.get("memory", True),
                  qtype=question_type(text, routed), options=request.get("options") or {},
                  history=list(request.get("history") or ()), system=request.get("system") or "")
        if chain:
            self._set_plan(ask, f"chain:{chain}")
            ask.route = Route("chain", 0, f"chain {chain}")
        elif requested:
            self._set_plan(ask, "+".join(s for s in self.config.stages if s in requested))  # configured order
            ask.route = Route("requested", 0, "requested: " + ask.plan.replace("+", ", "))
        else:
            self._set_plan(ask, self._default_plan(routed))
            ask.routed = True
        return ask

    def _model_ask(self, request: dict[str, Any]) -> Ask:
        """One manifest model alone, on the actor that runs it: no stages, nothing recalled or
        stored; the client's system prompt is its system prompt, the client's history its history."""
        rid, name, options = request["id"], request["model"], request.get("options") or {}
        if name not in self.config.models:
            raise ProtocolError("unknown_model", f"no model {name!r} in the manifest; `mirador models list` shows them", rid)
        key = self.config.actor_for_model(name)
        if key not in self.actors:
            raise ProtocolError("model_unused", f"no stage or chain runs {name!r}: name it in a stage's models, "
                                "or give it roles = [\"STAGE\"] in models.toml", rid)
        step = Step(name, key, (name,), request.get("system") or "", options.get("max_tokens", 256),
                    options.get("temperature", 0.7), 300.0, memory=True)
        return Ask(rid, request["text"], [step], Route("requested", 0, f"model {name} alone"), "sequential",
                   use_memory=False, qtype=question_type(request["text"], classify(request["text"])), plan=f"model:{name}",
                   options=options, history=list(request.get("history") or ()))

    def expected_steps(self, text: str) -> list[Step]:
        """The steps the router would plan for ``text`` now (power profile applied), without asking."""
        ask = self._planned_ask({"id": "expected", "text": text})
        self._apply_power(ask)
        return ask.steps

    def _default_plan(self, route: Route) -> str:
        return "+".join(self.config.routes.get(route.kind, self.config.stages))

    def _set_plan(self, ask: Ask, plan: str) -> None:
        ask.plan = plan
        if plan.startswith("chain:"):
            ask.mode = "chain"
            ask.steps = [self._chain_step(step, ask.options) for step in self.config.chains[plan[len("chain:"):]].steps]
        else:
            ask.steps = [self._stage_step(name, ask.text, ask.options) for name in plan.split("+")]
        if ask.system:  # after the stage's own prompt, which stays the cached prefix
            ask.steps = [dataclasses.replace(s, system_prompt=f"{s.system_prompt}\n\n{ask.system}".strip()) for s in ask.steps]

    def _stage_step(self, name: str, text: str, options: dict[str, Any]) -> Step:
        stage = self.config.stages[name]
        return Step(name, name, self.config.stage_models(name, text), stage.system_prompt, options.get("max_tokens", stage.max_tokens),
                    options.get("temperature", stage.temperature), stage.timeout_s, stage.after_first_token_of, stage.needs,
                    stage.memory)

    def _chain_step(self, step: Any, options: dict[str, Any]) -> Step:
        return Step(step.name, self.config.actor_for_model(step.model), (step.model,), step.prompt,
                    options.get("max_tokens", 256), options.get("temperature", 0.5), 300.0, memory=True)

    def cancel(self, ask: Ask) -> None:
        """Stop the question: a step waiting for its model ends now, a generating one at its next token."""
        ask.cancelled = True
        ask.stop.set()
        for actor in ask.running.values():
            actor.cancel.remote(ask.query_id)

    # -- running -------------------------------------------------------------------------
    async def run(self, ask: Ask, emit: Emit) -> None:
        used: list[tuple[str, str]] = []  # (actor, model) pairs that answered
        try:
            await self._run(ask, emit, used)
        finally:
            self.asks.discard(ask)
            if self.preloader is not None:
                self.preloader.release.remote(ask.query_id, ask.route.kind if ask.routed else None, used)

    async def _run(self, ask: Ask, emit: Emit, used: list[tuple[str, str]]) -> None:
        started = time.perf_counter()
        if self.preloader is not None and ask.routed:  # predicted loads start while we plan
            self.preloader.prepare.remote(ask.query_id, ask.text, self.power.get("profile", "maximum"))
        learning = self.learner is not None and ask.use_memory
        # Recall starts first: it needs only the question, and runs while the learner is asked.
        recall = self._start_recall(ask) if ask.use_memory and self.memory is not None else None
        learned = await self._learned_plan(ask) if learning and ask.routed else None
        power = self._apply_power(ask)
        speculation = await self._speculation(ask)
        if self.preloader is not None:  # the plan's own models, pinned until the question is over
            self.preloader.need.remote(ask.query_id, [(s.actor_key, s.models[0]) for s in ask.steps])
        await emit("start", query_id=ask.query_id, route=ask.route.kind, reason=ask.route.reason, mode=ask.mode,
                   stages=[s.name for s in ask.steps], session=ask.session, type=ask.qtype, plan=ask.plan, learned=learned,
                   power=power, speculation=speculation)
        if recall is not None:
            await self._finish_recall(ask, recall, emit)
        if ask.mode == "progressive":
            results = await self._run_progressive(ask, emit)
        else:
            results = {}
            for step in ask.steps:
                if ask.cancelled:
                    break
                results[step.name] = await self._run_step(step, ask, emit, dict((k, r.text) for k, r in results.items()))
        ask.over = True
        steps = {s.name: s for s in ask.steps}
        used += [(steps[name].actor_key, r.stats["model"]) for name, r in results.items() if r.stats.get("tokens")]
        metrics = {"duration_s": round(time.perf_counter() - started, 6),
                   "stages": {name: r.stats for name, r in results.items()}, "errors": ask.errors}
        # The answer is complete for the user at `done`; storing it (a durable write, ~0.3 s
        # here) starts just before, and `remembered` acknowledges it once it is on disk.
        exchange = self._exchange(ask, results) if ask.use_memory and self.memory is not None and not ask.cancelled else None
        write = self._track(self._remember(exchange), f"storing {ask.query_id}") if exchange else None
        if write is not None:  # a rating that comes before the write is done waits for it (``stored``)
            self.storing[ask.query_id] = write
            write.add_done_callback(lambda _: self.storing.pop(ask.query_id, None))
        await emit("done", final=write is None, query_id=ask.query_id, cancelled=ask.cancelled, metrics=metrics)
        if self.on_done:
            self.on_done(ask, metrics)
        if self.speculation is not None and exchange is not None:  # remembered: not incognito, not cancelled
            self.speculation.after_answer(ask, results)
        if learning and not ask.cancelled:  # no text: type and plan only
            self._track(self.learner.observe.remote(ask.query_id, ask.qtype, ask.plan), f"noting {ask.query_id} for the learner")
        if write is not None:
            # Its own task, so that a shutdown that stops this ask still lets the user hear
            # whether the exchange was stored.
            await asyncio.shield(self._track(self._acknowledge(ask, write, emit), f"acknowledging {ask.query_id}"))

    async def _remember(self, exchange: dict[str, Any]) -> str:
        # An upsert by query id: sending it again to a store that Ray restarts stores it once.
        return await call_while_restarting(lambda: self.memory.remember.remote(exchange), self.config.actor_wait_s)

    async def _acknowledge(self, ask: Ask, write: asyncio.Future[Any], emit: Emit) -> None:
        """Tell the client that its exchange is on disk (``remembered``) or why it is not."""
        try:
            try:
                memory_id = await write
            except ray.exceptions.RayError as exc:
                await emit("error", final=True, code="memory_unavailable",
                           message=f"this exchange was not stored: {store_failure(exc)}")
                return
            await emit("remembered", final=True, query_id=ask.query_id, memory_id=memory_id)
        except PeerGone:  # the client left; the exchange is stored all the same
            pass

    def _track(self, pending: Any, what: str) -> asyncio.Future[Any]:
        """Keep a write (an ObjectRef or a coroutine) in sight of ``drain``; log its failure."""
        future = asyncio.ensure_future(pending)
        self._writes.add(future)

        def finished(f: asyncio.Future[Any]) -> None:
            self._writes.discard(f)
            if not f.cancelled() and f.exception() is not None:  # retrieved: never "never retrieved"
                log.error("%s failed: %s", what, store_failure(f.exception()))

        future.add_done_callback(finished)
        return future

    @property
    def pending_writes(self) -> int:
        return len(self._writes)

    async def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for the writes in flight (and those of answers that finish
        meanwhile) to finish and be acknowledged; returns how many did not."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._writes and (left := deadline - loop.time()) > 0:
            await asyncio.wait(set(self._writes), timeout=left)
        return len(self._writes)

    def _apply_power(self, ask: Ask) -> dict[str, Any]:
        """Trim the plan to what the power profile allows; say what changed."""
        profile = self.power.get("profile", "maximum")
        limits = self.config.energy.limits.get(profile)
        info: dict[str, Any] = {"profile": profile, "battery": self.power.get("battery"), "changed": False}
        if limits is None:  # maximum
            return info
        before = [(s.name, s.models[0]) for s in ask.steps]
        if ask.mode == "chain":
            ask.steps = ask.steps if limits.stages is None else ask.steps[:1]
        else:
            kept = limits.keep([s.name for s in ask.steps])
            ask.steps = [s for s in ask.steps if s.name in kept]
        if limits.smallest_model:
            ask.steps = [dataclasses.replace(s, models=self.config.smallest_first(s.models)) for s in ask.steps]
        after = [(s.name, s.models[0]) for s in ask.steps]
        if after != before:
            info.update(changed=True, dropped=[name for name, _ in before if name not in dict(after)],
                        models={name: model for name, model in after if (name, model) not in before})
        return info

    async def _learned_plan(self, ask: Ask) -> dict[str, Any] | None:
        """Ask the learner; switch plans when the user's ratings favour another one for this type."""
        default = ask.plan
        try:
            choice = await self.learner.choose.remote(ask.qtype, self.candidate_plans, default)
        except ray.exceptions.RayError as exc:
            log.error("the learner did not answer; using the router's plan: %s", exc)
            return None
        if not choice["learned"]:
            return None
        self._set_plan(ask, choice["plan"])
        ask.route = Route(ask.route.kind, ask.route.score, f"{ask.route.reason}; learned: {choice['plan']} instead of {default}")
        return {"plan": choice["plan"], "default": default, "evidence": choice["evidence"]}

    async def _speculation(self, ask: Ask) -> dict[str, Any]:
        """What speculation did for this question: a cached quick answer it may be served (looked
        up now: the quick stage's prompt is fixed once the plan is), and the stages a typing-time
        prefill warmed."""
        warmed = {s.name: w for s in ask.steps if self.speculation and (w := self.speculation.warmed(s.name))}
        step = next((s for s in ask.steps if s.name == self.cache_stage), None)
        cache = self.config.cache
        if step is None or not cache.enabled or not ask.use_memory or self.memory is None or ask.mode == "chain" or ask.history:
            return {"cached": None, "warmed": warmed}
        from .speculation import cache_key

        try:
            found = await self.memory.cache_lookup.remote(ask.text, cache_key(step), cache.threshold, cache.ttl_s)
        except ray.exceptions.RayError as exc:  # the cache only saves time: answer without it
            log.error("the answer cache did not answer: %s", exc)
            return {"cached": None, "warmed": warmed}
        hit = found["hit"]
        if hit is not None:
            ask.cached = {**hit, "stage": step.name}
        return {"cached": None if hit is None else {k: hit.get(k) for k in ("question", "similarity", "age_s", "source")}
                | {"stage": step.name}, "warmed": warmed, "rejected": found.get("rejected", [])[:3]}

    async def _serve_cached(self, step: Step, ask: Ask, emit: Emit, on_first_token: Callable[[], None] | None) -> StepResult:
        """Stream the cached answer as the step's tokens, word by word (the deeper stages run live)."""
        hit, started = ask.cached or {}, time.perf_counter()
        model = step.models[0]
        await emit("stage_start", stage=step.name, model=model, cached=True, similarity=hit.get("similarity"),
                   age_s=hit.get("age_s"), question=hit.get("question"))
        pieces = re.findall(r"\s*\S+", hit["answer"]) or [hit["answer"]]
        first = None
        for piece in pieces:
            if ask.cancelled:
                break
            await emit("token", stage=step.name, model=model, text=piece, confidence=hit.get("confidence") or 0.0,
                       logprob=None, cached=True)
            if first is None:
                first = time.perf_counter() - started
                if on_first_token:
                    on_first_token()
        stats = {"tokens": len(pieces), "first_token_s": round(first or 0.0, 6), "duration_s": round(time.perf_counter() - started, 6),
                 "tokens_per_s": None, "cancelled": ask.cancelled, "cold": False, "queued_s": 0.0, "cached": True,
                 "similarity": hit.get("similarity"), "age_s": hit.get("age_s")}
        await emit("stage_end", stage=step.name, model=model, **stats)
        return StepResult("".join(pieces), {"model": model, "memories": [], **stats})

    def _start_recall(self, ask: Ask) -> tuple[Any, Any]:
        """Ask the memory for memories like the question, and the session's last turns."""
        mem = self.config.memory
        turns = self.memory.session_turns.remote(ask.session, mem.session_turns) if ask.session else None
        return self.memory.recall.remote(ask.text, mem.recall_k, mem.min_similarity), turns

    async def _finish_recall(self, ask: Ask, refs: tuple[Any, Any], emit: Emit) -> None:
        recalled, turns = refs
        try:
            if turns is not None:  # else: the client's own history, if it gave one
                ask.history = await turns
            in_history = {turn.get("id") for turn in ask.history}  # those come in as history already
            ask.memories = [m for m in await recalled if m["id"] not in in_history]
        except ray.exceptions.RayError as exc:
            log.error("recall failed: %s", exc)
            await emit("error", code="memory_unavailable", message=f"memory could not be read: {type(exc).__name__}")
            return
        await emit("memory", recalled=[{"id": m["id"], "question": m["question"], "similarity": m["similarity"]}
                                       for m in ask.memories], history=len(ask.history))

    @staticmethod
    def _exchange(ask: Ask, results: dict[str, StepResult]) -> dict[str, Any] | None:
        """What memory keeps of a question: it and the last stage's answer (None if no answer)."""
        answer = next((r.text for r in reversed(results.values()) if r.text.strip()), "")
        if not answer:
            return None
        return {"query_id": ask.query_id, "question": ask.text, "answer": answer, "route": ask.route.kind,
                "models": sorted({r.stats.get("model") for r in results.values() if r.stats.get("model")}),
                "session": ask.session or "", "ts": time.time()}

    async def _run_progressive(self, ask: Ask, emit: Emit) -> dict[str, StepResult]:
        in_plan = {s.name for s in ask.steps}
        first_token = {s.name: asyncio.Event() for s in ask.steps}
        finished: dict[str, asyncio.Future[StepResult]] = {s.name: asyncio.get_running_loop().create_future() for s in ask.steps}

        async def run_one(step: Step) -> None:
            try:
                if step.after_first_token_of in in_plan:
                    await first_token[step.after_first_token_of].wait()
                answers = {n: (await finished[n]).text for n in step.needs if n in in_plan}
                needed = {n: text for n, text in answers.items() if text.strip()}  # failed stages give nothing
                if ask.cancelled:
                    return
                result = await self._run_step(step, ask, emit, needed, on_first_token=first_token[step.name].set)
                finished[step.name].set_result(result)
            finally:
                first_token[step.name].set()  # a stage that failed early must not hold others back
                if not finished[step.name].done():
                    finished[step.name].set_result(StepResult("", {"skipped": True}))

        tasks = [asyncio.ensure_future(run_one(step)) for step in ask.steps]
        try:
            await asyncio.gather(*tasks)
        finally:  # a vanished client or a shutdown stops every stage of the question
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return {name: fut.result() for name, fut in finished.items() if fut.done() and not fut.result().stats.get("skipped")}

    def _placement(self, step: Step) -> Placement:
        stage = self.config.stages.get(step.actor_key)
        return stage.placement if stage else Placement()  # chain-only models run on the daemon's node

    @staticmethod
    def _generate(actor: Any, args: tuple[Any, ...]) -> Any:
        return actor.generate.options(num_returns="streaming").remote(*args)

    async def _open(self, actor: Any, args: tuple[Any, ...], step: Step, stream: Any) -> Any:
        """Wait until the stage's actor has taken the generation ``stream`` (its ``accepted`` item).

        An actor that is down (crashed, or its node gone) refuses calls with a RayActorError while
        Ray restarts it: such a call never started, so it is sent again. An actor that no node can
        hold never answers at all. Either way the stage is given up after ``actor_wait_s``. A
        call that failed after ``accepted`` is not sent again: it may have produced tokens, and
        it may be what crashed the actor.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.actor_wait_s
        last: Exception | None = None
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        await (await anext(stream))
                    return stream
                except TimeoutError:
                    break
                except ray.exceptions.RayActorError as exc:
                    last = exc
                    if loop.time() + ACTOR_RETRY_PAUSE_S >= deadline:
                        break
                    log.warning("stage %s: actor unavailable (%s); trying again", step.name, type(exc).__name__)
                    await asyncio.sleep(ACTOR_RETRY_PAUSE_S)
                    stream = self._generate(actor, args)
        except BaseException:
            ray.cancel(stream)  # the question stopped meanwhile; the call must not run later
            raise
        ray.cancel(stream)  # may still be queued for an actor that a node could hold later
        why = f"; last error: {type(last).__name__}" if last else ""
        raise StageUnavailable(
            f"the {step.name} stage's actor is not running ({self._placement(step).why_not_running()}); "
            f"skipped after {self.config.actor_wait_s:g} s{why}"
        )

    @staticmethod
    async def _next(stream: Any, ask: Ask, has_turn: bool) -> dict[str, Any] | None:
        """The stream's next item; None at its end, or at once when the question is cancelled
        while its step waits for the model (the generation is cancelled by the caller)."""
        async def read() -> dict[str, Any] | None:
            try:
                return await (await anext(stream))
            except StopAsyncIteration:
                return None

        if has_turn or ask.cancelled:
            return None if ask.cancelled and not has_turn else await read()
        reading, stopping = asyncio.ensure_future(read()), asyncio.ensure_future(ask.stop.wait())
        try:
            await asyncio.wait((reading, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not reading.done():
                reading.cancel()
        return reading.result() if reading.done() and not reading.cancelled() else None

    async def _run_step(self, step: Step, ask: Ask, emit: Emit, previous: dict[str, str],
                        on_first_token: Callable[[], None] | None = None) -> StepResult:
        if ask.cached is not None and step.name == ask.cached["stage"]:
            return await self._serve_cached(step, ask, emit, on_first_token)
        actor = self.actors[step.actor_key]
        model = step.models[0]

        async def error(code: str, message: str, failed_model: str) -> None:
            ask.errors.append({"stage": step.name, "model": failed_model, "code": code})
            await emit("error", stage=step.name, model=failed_model, code=code, message=message)

        pieces: list[str] = []
        end: dict[str, Any] | None = None
        ask.running[step.name] = actor
        remembered = step.memory and ask.use_memory
        # History is the conversation itself (the client's or the session's), so it goes to the
        # stages that take it even when incognito; an incognito ask has no session turns.
        args = (ask.query_id, build_messages(step.system_prompt, ask.text, previous, ask.history if step.memory else ()),
                step.max_tokens, step.temperature, list(step.models),
                ask.memories if remembered else None, self.config.memory.context_tokens, ask.options.get("seed"))
        # The actor starts on the prompt first; the stage_start frame goes out while it works.
        stream = self._generate(actor, args)
        loop = asyncio.get_running_loop()
        asked = loop.time()
        has_turn = False
        used: list[str] = []  # the memories the stage was given
        confidences: list[float] = []
        warmed = self.speculation.warmed(step.name) if self.speculation is not None else None
        try:
            extra = {"warmed": warmed} if warmed else {}
            if model in self.adapters:  # deployed before this question: the actor switches before its turn
                extra["adapter"] = self.adapters[model]
            await emit("stage_start", stage=step.name, model=model, **extra)
            # The stage's time (timeout_s) starts with its model's turn: waiting behind other
            # questions is queued_s, and emit never waits for the client (see server.Outbox).
            async with asyncio.timeout(None) as deadline:
                stream = await self._open(actor, args, step, stream)
                while (item := await self._next(stream, ask, has_turn)) is not None:
                    if "turn" in item:  # the model is ours: the stage's time starts
                        has_turn = True
                        ask.turns += 1
                        deadline.reschedule(loop.time() + step.timeout_s)
                    elif "text" in item:
                        if not pieces and on_first_token:
                            on_first_token()
                        pieces.append(item["text"])
                        confidences.append(item["confidence"])
                        await emit("token", stage=step.name, model=model, text=item["text"],
                                   confidence=item["confidence"], logprob=item["logprob"])
                    elif "end" in item:
                        end = item
                    elif "context" in item:
                        used = item["context"]
                        await emit("context", stage=step.name, memory_ids=used)
                    elif "error" in item:
                        log.warning("stage %s (%s) failed: %s", step.name, item["model"], item["message"])
                        await error(item["error"], item["message"], item["model"])
                    else:  # {"model", "cold"}: this model answers now
                        model = item["model"]
        except StageUnavailable as exc:
            log.error("%s", exc)
            await error("stage_unavailable", str(exc), model)
        except TimeoutError:
            await error("timeout", f"the {step.name} stage took longer than {step.timeout_s:g} s and was stopped", model)
        except ray.exceptions.RayError as exc:  # after ``accepted``: the actor died while it answered
            log.error("stage %s actor failed: %s", step.name, exc)
            await error("stage_unavailable", f"the {step.name} stage's actor stopped while answering (its process or its "
                        f"node went away: {type(exc).__name__}); Ray restarts it for the next question", model)
        finally:
            ask.running.pop(step.name, None)
            ask.turns -= has_turn
            if end is None:  # cancelled while waiting, timed out, the client went away, or we failed: stop the model.
                # ray.cancel interrupts the actor's coroutine wherever it waits, so a backend that
                # hangs (a stalled server) cannot keep the model's turn from the next question.
                ray.cancel(stream)
        if end is None and ask.cancelled and not has_turn:  # ended here, at once, without waiting for the actor
            end = {"tokens": 0, "cancelled": True, "queued_s": round(loop.time() - asked, 6)}
        stats = {k: v for k, v in (end or {"tokens": len(pieces)}).items() if k not in ("end", "model")}
        stats.setdefault("cancelled", ask.cancelled)
        await emit("stage_end", stage=step.name, model=model, **stats)
        confidence = round(sum(confidences) / len(confidences), 4) if confidences else None
        return StepResult("".join(pieces), {"model": model, "memories": used, "confidence": confidence, **stats})
