"""Background jobs: work the daemon does that no user is waiting for.

A job (``Job``) is a coroutine the ``JobManager`` runs on the daemon's loop; its model work runs
on Ray, in the stage actors that hold the models (placed like any actor), as *background* calls:
a stage actor gives such a call the model only when no question waits for it, and takes it back
at the next token (or the next prompt chunk) when one arrives (``actors/turns.py``). Jobs with a
process of their own lower its OS priority (``lower_priority``).

Rules every job obeys, checked before it starts and before each step (``step``):
  * ``[jobs] enabled``; the power profile: none on ``minimal``, on ``balanced`` only with
    ``on_balanced``;
  * a CPU share: over any minute, jobs hold models at most ``cpu_share`` of it (a step waits
    until the last minute's share is below it);
  * a daily budget of model time (``daily_cpu_s``), counted from the jobs of today, kept across
    restarts in the metrics database.
Jobs of one lane run one at a time, in order (speculation's jobs share the ``model`` lane;
training has its own, so that a run of minutes does not hold up a typing-time prefill); a job
that is told to stop (``cancel``, shutdown, the profile
turning ``minimal``) ends at its next step with state ``cancelled``, after its running model
call stops at its next token.

States: queued → running ⇄ waiting (paused for the share, or preempted by a question and
retrying) → done | cancelled | failed | skipped (the rules said no when its turn came).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from .config_schema import JobsConfig

log = logging.getLogger("mirador.jobs")

WINDOW_S = 60.0  # the CPU share is kept over this sliding window
ENDED = ("done", "cancelled", "failed", "skipped")


def lower_priority(niceness: int = 10) -> None:
    """Run the calling process at a lower OS priority (for a job's own process)."""
    with contextlib.suppress(OSError):
        os.nice(niceness)


class JobStopped(Exception):
    """The job must stop: cancelled, shutting down, or the rules no longer allow it; says why."""


@dataclass(eq=False)
class Job:
    kind: str  # prefill | followups | train
    stage: str  # the stage whose model it uses
    detail: str = ""  # what it works on, for people
    id: str = field(default_factory=lambda: "j" + uuid.uuid4().hex[:9])
    state: str = "queued"
    progress: str = ""
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    model_s: float = 0.0  # model time spent (what the budget counts)
    tokens: int = 0  # prompt tokens evaluated and tokens generated
    saved_s: float = 0.0  # user time it saved, once known
    used_tokens: int = 0  # of ``tokens``, those a question then used
    result: dict[str, Any] = field(default_factory=dict)  # what the kind reports (e.g. a prefill's tokens)
    stop_reason: str | None = None
    calls: set[Callable[[], None]] = field(default_factory=set)  # cancels the model calls running now

    def spend(self, model_s: float, tokens: int) -> None:
        self.model_s += model_s
        self.tokens += tokens

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "stage": self.stage, "state": self.state, "detail": self.detail,
                "progress": self.progress, "created": self.created, "started": self.started, "ended": self.ended,
                "cost": {"model_s": round(self.model_s, 3), "tokens": self.tokens},
                "saved": {"s": round(self.saved_s, 3), "tokens": self.used_tokens},
                "why": self.stop_reason, "result": self.result}


Work = Callable[[Job], Awaitable[None]]


class JobManager:
    def __init__(self, config: JobsConfig, profile: Callable[[], str], metrics: Any):
        """``profile()``: the power profile now; ``metrics``: the MetricsStore that keeps ended jobs."""
        self.config, self.profile, self.metrics = config, profile, metrics
        self.jobs: dict[str, Job] = {}  # running and waiting, by id
        self.recent: deque[Job | dict[str, Any]] = deque(maxlen=config.keep)  # ended, newest last
        self._lanes: dict[str, asyncio.Lock] = {}  # one job at a time per lane: two would share the same cores
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._spans: deque[tuple[float, float]] = deque()  # (start, end) of model work, monotonic
        self._spent_today = 0.0
        self._day = time.localtime().tm_yday
        self.closed = False

    async def start(self) -> None:
        """Read what jobs of earlier runs spent today and the recent ones, for the budget and ``list``."""
        spent, recent = await self.metrics.jobs_history(self._midnight(), self.config.keep)
        self._spent_today = spent
        self.recent.extend(recent)

    @staticmethod
    def _midnight() -> float:
        now = time.localtime()
        return time.mktime((now.tm_year, now.tm_mon, now.tm_mday, 0, 0, 0, 0, 0, -1))

    # -- the rules --------------------------------------------------------------------------
    def why_not(self) -> str | None:
        """Why no job may run now (None: they may)."""
        if self.closed:
            return "the daemon is shutting down"
        if not self.config.enabled:
            return "background jobs are off ([jobs] enabled = false)"
        profile = self.profile()
        if profile == "minimal":
            return "the power profile is minimal (battery low): no background jobs"
        if profile == "balanced" and not self.config.on_balanced:
            return "on battery (balanced profile) background jobs are off ([jobs] on_balanced = false)"
        if self.config.daily_cpu_s and self.spent_today() >= self.config.daily_cpu_s:
            return f"today's budget of {self.config.daily_cpu_s:g} s of model time for jobs is spent ([jobs] daily_cpu_s)"
        return None

    def spent_today(self) -> float:
        if time.localtime().tm_yday != self._day:
            self._day, self._spent_today = time.localtime().tm_yday, 0.0
        return self._spent_today + sum(job.model_s for job in self.jobs.values())

    def _share_used(self) -> float:
        now = time.monotonic()
        while self._spans and self._spans[0][1] < now - WINDOW_S:
            self._spans.popleft()
        return sum(end - max(start, now - WINDOW_S) for start, end in self._spans) / WINDOW_S

    # -- running ----------------------------------------------------------------------------
    def submit(self, kind: str, stage: str, work: Work, detail: str = "", lane: str = "model",
               why_not: Callable[[], str | None] | None = None) -> Job:
        """Queue a job; it runs when the jobs before it in its lane have ended and the rules allow
        (``why_not``: a kind's rules on top of every job's)."""
        job = Job(kind, stage, detail)
        self.jobs[job.id] = job
        self._tasks[job.id] = asyncio.ensure_future(self._run(job, work, lane, why_not or self.why_not))
        return job

    def task(self, job: Job) -> asyncio.Task[None] | None:
        """The task running ``job`` (to wait for it), while it is queued or running."""
        return self._tasks.get(job.id)

    async def _run(self, job: Job, work: Work, lane: str, why_not: Callable[[], str | None]) -> None:
        try:
            async with self._lanes.setdefault(lane, asyncio.Lock()):
                if job.stop_reason is None and (why := why_not()) is not None:
                    job.stop_reason = why
                    job.state = "skipped"
                    return
                if job.stop_reason is not None:
                    job.state = "cancelled"
                    return
                job.state, job.started = "running", time.time()
                await work(job)
                job.state = "done"
        except JobStopped as exc:
            job.stop_reason = job.stop_reason or str(exc)
            job.state = "cancelled"
        except asyncio.CancelledError:
            job.state = "cancelled"
            job.stop_reason = job.stop_reason or "cancelled"
        except Exception as exc:  # a job's failure is logged and shown; it never takes the daemon down
            log.exception("job %s (%s) failed", job.id, job.kind)
            job.state, job.stop_reason = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            job.ended = time.time()
            self.jobs.pop(job.id, None)
            self._tasks.pop(job.id, None)
            self._spent_today += job.model_s
            self.recent.append(job)
            self.metrics.record_job(job.public())

    async def step(self, job: Job, call: Callable[[], Awaitable[Any]], cancel: Callable[[], None]) -> Any:
        """Run one piece of model work of ``job`` within the rules: wait for the CPU share, stop if
        the job must (``JobStopped``). ``cancel`` stops the call (at its next token) when the job
        is cancelled meanwhile. The call's wall time counts as model time."""
        while True:
            if job.stop_reason is not None:
                raise JobStopped(job.stop_reason)
            if (why := self.why_not()) is not None:
                job.stop_reason = why
                raise JobStopped(why)
            if self.share_left():
                break
            job.state = "waiting"
            job.progress = f"resting: jobs may use {self.config.cpu_share:.0%} of the time ([jobs] cpu_share)"
            await asyncio.sleep(1.0)
        job.state = "running"
        started = time.monotonic()
        job.calls.add(cancel)
        try:
            return await call()
        finally:
            job.calls.discard(cancel)
            self.account(job, started, time.monotonic())

    def account(self, job: Job, started: float, ended: float) -> None:
        """Count work of ``job`` from ``started`` to ``ended`` (monotonic) in its cost, the share and the budget."""
        self._spans.append((started, ended))
        job.model_s += ended - started

    def share_left(self) -> bool:
        """Whether jobs may work now within ``cpu_share``."""
        return self._share_used() < self.config.cpu_share

    def cancel(self, job_id: str, why: str = "cancelled by the user") -> bool:
        """Stop a queued or running job; False if no such job is running or waiting."""
        job = self.jobs.get(job_id)
        if job is None:
            return False
        job.stop_reason = job.stop_reason or why  # the first reason is the one to show
        for stop in list(job.calls):
            stop()
        return True

    def cancel_kind(self, kind: str, why: str) -> None:
        for job in list(self.jobs.values()):
            if job.kind == kind:
                self.cancel(job.id, why)

    def latest(self, kind: str, stage: str) -> Job | None:
        """The newest job of ``kind`` on ``stage``, running or ended (this run's)."""
        candidates = [j for j in [*self.recent, *self.jobs.values()] if isinstance(j, Job) and j.kind == kind and j.stage == stage]
        return max(candidates, key=lambda j: j.created, default=None)

    def list(self) -> dict[str, Any]:
        ended = [j.public() if isinstance(j, Job) else j for j in self.recent]
        running = [j.public() for j in self.jobs.values()]
        return {"jobs": sorted([*running, *ended], key=lambda j: j["created"], reverse=True), "allowed": self.why_not(),
                "budget": {"daily_cpu_s": self.config.daily_cpu_s, "spent_today_s": round(self.spent_today(), 3),
                           "cpu_share": self.config.cpu_share, "share_used": round(self._share_used(), 3)}}

    async def close(self, timeout: float = 10.0) -> None:
        """Stop every job (their model calls stop at the next token) and wait for them."""
        self.closed = True
        for job_id in list(self.jobs):
            self.cancel(job_id, "the daemon is shutting down")
        tasks = list(self._tasks.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
