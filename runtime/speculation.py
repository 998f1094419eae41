"""Speculation: background jobs that work ahead of the user, and what they saved.

Two jobs, both on the background-job machinery (``jobs.py``), so both yield to every question:

* ``prefill`` (typing-time prefill), started by a ``hint``: recall memories for the words typed
  so far, then evaluate, in each stage of the plan the router expects whose prompt does not need
  another stage's answer, the prompt that stage will get (its system prompt, the memory block,
  the session's history, the typed words) into its llama.cpp context. On Enter llama.cpp finds
  that prefix already evaluated and evaluates only the rest; if the recall or history turned
  out different, the common part is still reused: the answer is the same, only less is saved.
  A newer hint supersedes the job of an older one.
* ``followups``, started after an answer (not for incognito questions): the quick model predicts
  the questions the user is most likely to ask next and precomputes their quick-stage answers
  into the answer cache (``actors/answer_cache.py``). A hint stops it: the user is typing, the
  model's time is better spent on that.

Every answered question's quick answer is cached too (no model work: it is what the user saw).
A question that matches a cached one is served from it by the orchestrator.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import uuid
from typing import Any


from .jobs import Job, JobManager, JobStopped
from .orchestrator import Ask, Orchestrator, Step, StepResult, build_messages

log = logging.getLogger("mirador.speculation")

PREEMPT_RETRIES = 3  # a step preempted by questions this many times is given up
# Asked as the user's next turn of the conversation: SmolLM2-135M echoed a "predict the next
# questions" system prompt back, but lists questions when asked this way.
FOLLOWUP_PROMPT = "List {n} other questions I might ask you about this topic, numbered 1 to {n}."
FRESH_PREFILL_S = 300.0  # a prefill older than this is not counted as having warmed a question


def cache_key(step: Step) -> str:
    """What a cached answer is valid for: its stage, its model and its prompt (a change of either drops it)."""
    digest = hashlib.sha256(step.system_prompt.encode()).hexdigest()[:12]
    return f"{step.name}|{step.models[0]}|{digest}"


QUESTION_WORDS = ("what", "how", "why", "when", "where", "which", "who", "can", "could", "should", "is", "are",
                  "do", "does", "will", "would")


def parse_followups(text: str, n: int, asked: str) -> list[str]:
    """The questions in the model's reply: numbering and bullets stripped; a line counts when it
    ends with '?' or starts with a question word (SmolLM2 sometimes drops the '?'), not when it is
    a heading ("1. Brewing green tea:"); duplicates and the question just asked are dropped."""
    out: list[str] = []
    for line in text.splitlines():
        question = re.sub(r"^\s*(?:[-*•]|\d+[.)]|Q\d*:)\s*", "", line).strip().strip('"')
        if not question.endswith("?"):
            if question.endswith(":") or question.split(" ", 1)[0].lower() not in QUESTION_WORDS:
                continue
            question = question.rstrip(".") + "?"
        if len(question) >= 8 and question.lower() != asked.strip().lower() and question not in out:
            out.append(question)
    return out[:n]


class Speculation:
    def __init__(self, orchestrator: Orchestrator, jobs: JobManager):
        self.orchestrator, self.jobs = orchestrator, jobs
        self.config = orchestrator.config
        self.memory = orchestrator.memory
        self._cache_writes: set[asyncio.Future[Any]] = set()

    # -- model calls, as background work --------------------------------------------------
    async def _generate(self, job: Job, step: Step, messages: list[dict[str, str]], max_tokens: int,
                        memories: list[dict[str, Any]] | None) -> tuple[str, dict[str, Any]]:
        """One background generation on the step's actor: (text, its end item). Retried when a
        question preempted it; raises JobStopped when the job must stop."""
        actor = self.orchestrator.actors[step.actor_key]
        for attempt in range(PREEMPT_RETRIES):
            rid = f"{job.id}-{uuid.uuid4().hex[:6]}"

            async def call() -> tuple[str, dict[str, Any]]:
                stream = actor.generate.options(num_returns="streaming").remote(
                    rid, messages, max_tokens, step.temperature, list(step.models), memories,
                    self.config.memory.context_tokens, None, True)
                pieces, confidences, end = [], [], {}
                async for ref in stream:
                    item = await ref
                    if "text" in item:
                        pieces.append(item["text"])
                        confidences.append(item["confidence"])
                    elif "end" in item:
                        end = {**item, "confidence": sum(confidences) / len(confidences) if confidences else 0.0}
                return "".join(pieces), end

            text, end = await self.jobs.step(job, call, lambda: actor.cancel.remote(rid))
            job.tokens += end.get("tokens", 0) + end.get("prompt_tokens", 0) - end.get("reused_tokens", 0)
            if not end.get("preempted"):
                if end.get("cancelled"):
                    raise JobStopped(job.stop_reason or "cancelled")
                return text, end
            job.result.setdefault("preempted", []).append({"tokens": end.get("tokens", 0), "yield_s": end.get("yield_s")})
            job.progress = f"preempted by a question ({attempt + 1}/{PREEMPT_RETRIES}); waiting for the model"
            log.info("job %s: preempted by a question, trying again", job.id)
        raise JobStopped(f"preempted by questions {PREEMPT_RETRIES} times")

    async def _recall(self, text: str, session: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Memories for ``text`` and the session's last turns, as the orchestrator would give them."""
        if self.memory is None:
            return [], []
        mem = self.config.memory
        history = await self.memory.session_turns.remote(session, mem.session_turns) if session else []
        in_history = {turn.get("id") for turn in history}
        memories = [m for m in await self.memory.recall.remote(text, mem.recall_k, mem.min_similarity)
                    if m["id"] not in in_history]
        return memories, history

    # -- typing-time prefill -----------------------------------------------------------------
    def prefill(self, text: str, session: str | None) -> Job | None:
        """Start prefilling for the words typed so far (superseding an earlier prefill and any
        follow-up speculation); None when jobs may not run now or no stage takes a prefill."""
        if not self.config.jobs.prefill or self.jobs.why_not() is not None:
            return None
        steps = [s for s in self.orchestrator.expected_steps(text) if not s.needs]
        if not steps:
            return None
        self.jobs.cancel_kind("prefill", "superseded by a newer hint")
        self.jobs.cancel_kind("followups", "the user is typing a new question")

        async def work(job: Job) -> None:
            memories, history = await self._recall(text, session)
            job.progress = f"recalled {len(memories)} memories"
            for step in steps:
                actor = self.orchestrator.actors[step.actor_key]
                if self.orchestrator.preloader is not None:  # loaded through the budget (the hint started it)
                    await self.orchestrator.preloader.ensure.remote(step.actor_key, step.models[0])
                messages = build_messages(step.system_prompt, text, {}, history if step.memory else ())
                rid = f"{job.id}-{step.name}"
                report = await self.jobs.step(job, lambda: actor.prefill.remote(
                    rid, messages, memories if step.memory else None, self.config.memory.context_tokens,
                    self.config.jobs.prefill_chunk), lambda: actor.cancel.remote(rid))
                if report.get("error"):
                    raise JobStopped(report["error"])
                job.tokens += report.get("evaluated", 0)
                job.result[step.name] = {k: report.get(k) for k in ("tokens", "reused", "evaluated", "eval_s", "supported", "memories")}
                if report.get("cancelled"):
                    raise JobStopped(job.stop_reason or "cancelled")
                if report.get("preempted"):  # a question came: it evaluates its own prompt, ours is moot
                    raise JobStopped("preempted by a question")
                job.progress = ", ".join(f"{name}: {r['tokens']} tokens ready" for name, r in job.result.items())

        return self.jobs.submit("prefill", steps[0].name, work, detail=text[-80:])

    def warmed(self, stage: str) -> dict[str, Any] | None:
        """The recent finished prefill of ``stage``, if any: {job, tokens}."""
        job = self.jobs.latest("prefill", stage)
        if job is None or job.state != "done" or stage not in job.result or time.time() - (job.ended or 0) > FRESH_PREFILL_S:
            return None
        return {"job": job.id, "tokens": job.result[stage]["tokens"]}

    # -- after an answer -------------------------------------------------------------------------
    def after_answer(self, ask: Ask, results: dict[str, StepResult]) -> None:
        """Credit the prefill that warmed the question, cache its quick answer and start the
        follow-up job. Only for questions that are remembered (never incognito ones)."""
        self._credit_prefill(results)
        step = self._cache_step(ask)
        result = results.get(step.name) if step else None
        if step is None or result is None or not result.text.strip() or result.stats.get("cached"):
            return
        if self.config.cache.enabled:
            self._cache_put({"question": ask.text, "answer": result.text, "key": cache_key(step), "source": "answered",
                             "memories": result.stats.get("memories", []), "query_id": ask.query_id, "tokens": 0,
                             "duration_s": result.stats.get("duration_s") or 0.0,
                             "confidence": result.stats.get("confidence") or 0.0})
            if self.config.jobs.followups and self.jobs.why_not() is None:
                final = next((r.text for r in reversed(results.values()) if r.text.strip()), result.text)
                self._start_followups(ask, step, final)

    def _cache_step(self, ask: Ask) -> Step | None:
        """The ask's step whose answers the cache keeps: the first configured stage's."""
        return next((s for s in ask.steps if s.name == self.orchestrator.cache_stage), None)

    def _cache_put(self, entry: dict[str, Any]) -> None:
        future = asyncio.ensure_future(self.memory.cache_put.remote(entry))
        self._cache_writes.add(future)

        def finished(f: asyncio.Future[Any]) -> None:
            self._cache_writes.discard(f)
            if not f.cancelled() and f.exception() is not None:
                log.warning("could not cache an answer: %s", f.exception())

        future.add_done_callback(finished)

    def _start_followups(self, ask: Ask, step: Step, answer: str) -> None:
        n = self.config.jobs.followups

        async def work(job: Job) -> None:
            # The stage's system prompt first, as in every prompt of its model: a question that
            # preempts this finds it evaluated already.
            predict = build_messages(step.system_prompt, FOLLOWUP_PROMPT.format(n=n), {},
                                     [{"question": ask.text, "answer": answer[:800]}])
            text, _ = await self._generate(job, step, predict, 24 * n + 16, None)
            questions = parse_followups(text, n, ask.text)
            job.result["questions"] = questions
            history = [*ask.history, {"question": ask.text, "answer": answer}]
            for i, question in enumerate(questions, 1):
                job.progress = f"answering {i}/{len(questions)}: {question[:60]}"
                memories, _ = await self._recall(question, None)
                messages = build_messages(step.system_prompt, question, {}, history[-self.config.memory.session_turns:])
                before = job.tokens
                answer_text, end = await self._generate(job, step, messages, min(step.max_tokens, self.config.jobs.followup_max_tokens),
                                                        memories)
                if answer_text.strip():  # awaited: a job that is done has its answers in the cache
                    await self.memory.cache_put.remote({
                        "question": question, "answer": answer_text, "key": cache_key(step), "source": "followup",
                        "memories": [m["id"] for m in memories], "query_id": "", "tokens": job.tokens - before,
                        "duration_s": end.get("duration_s") or 0.0, "confidence": end.get("confidence") or 0.0})
            job.progress = f"cached {len(questions)} follow-up answers"

        self.jobs.submit("followups", step.name, work, detail=ask.text[-80:])

    def _credit_prefill(self, results: dict[str, StepResult]) -> None:
        """A prefill saved the question the evaluation of the tokens it reused that the prefill had evaluated."""
        for stage, result in results.items():
            job = self.jobs.latest("prefill", stage)
            report = job.result.get(stage) if job else None
            reused = result.stats.get("reused_tokens")
            if not report or reused is None or job.state != "done" or job.result.get("credited", {}).get(stage):
                continue
            job.result.setdefault("credited", {})[stage] = True
            evaluated = report.get("evaluated") or 0
            used = max(0, min(reused, report["tokens"]) - (report.get("reused") or 0))
            used = min(used, evaluated)
            if used:
                job.used_tokens += used
                job.saved_s += (report.get("eval_s") or 0.0) * used / evaluated
                self.jobs.metrics.record_job(job.public())
