"""Background LoRA training, the daemon's side: what to train on, when, the job, and deploying.

Data: the exchanges the user rated at least ``[train] min_rating`` (the rating is kept with the
memory, so forgetting a memory drops it from every later run, incognito exchanges are never
stored and so never trained on, and ``memory export``/``import`` carry ratings), the newest
``max_examples``. A stable share (``held_out``, by a hash of the id) is kept out of training to
judge the adapter.

The run is a background job (``runtime/jobs.py``) in its own lane: every job's rules (enabled,
never on ``minimal``, the daily budget, the CPU share) plus ``[train] profiles``. Its work runs
in a ``Trainer`` actor (``actors/trainer.py``) placed like any actor, paused whenever a user
question is in flight or the share is used up, stopped when the job is cancelled. The schedule
starts a run per embedded model when ``min_examples`` new rated exchanges exist and
``interval_h`` has passed since the last run; ``mirador train run`` starts one now.

Deploying: an adapter that passed its judgement (``actors/lora_train.evaluate``) becomes the
active version in the ``AdapterStore``, and every stage actor running that model switches to it
between two generations (``StageActor.set_adapter``). Only llama.cpp models are trained: an
Ollama model's weights live in the Ollama server, which Mirador does not control.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import TYPE_CHECKING, Any

from mirador.actors.adapters import AdapterStore, AdapterStoreError
from mirador.actors.lora_train import missing_dependencies  # imports no ML package itself
from mirador.client.protocol import ProtocolError

from .jobs import Job, JobStopped

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("mirador.training")

MIN_RUN_EXAMPLES = 4  # fewer cannot be split into something to learn from and something to judge by
POLL_S = 0.1  # how often a running job looks at questions in flight (a question waits at most a step)


def split(examples: list[dict[str, Any]], share: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held_out): held out, the ``share`` whose ids hash lowest, at least one. Stable:
    an exchange keeps its side as others come and go."""
    ranked = sorted(examples, key=lambda e: hashlib.sha1(e["id"].encode()).hexdigest())
    n = max(1, round(len(examples) * share))
    held = {e["id"] for e in ranked[:n]}
    return [e for e in examples if e["id"] not in held], [e for e in examples if e["id"] in held]


class Training:
    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon
        self.config = daemon.config.train
        self.store = AdapterStore(daemon.paths.data / "adapters")
        self.running: dict[str, Job] = {}  # model -> its run, while queued or running
        self.failed_at: dict[str, float] = {}  # model -> when its last run failed (the schedule waits as after a run)
        for model in self.models():  # what stage_start names; the actors read the store themselves
            self._announce(model)

    def _announce(self, model: str) -> None:
        """Tell the orchestrator (for ``stage_start``) which adapter version ``model`` runs with."""
        active = self.store.active(model)
        if active is None:
            self.daemon.orchestrator.adapters.pop(model, None)
        else:
            self.daemon.orchestrator.adapters[model] = active["version"]

    # -- what is trained ------------------------------------------------------------------
    def models(self) -> list[str]:
        """The embedded (llama.cpp) models some actor runs: those that can have an adapter."""
        used = {m for models in self.daemon.runs.values() for m in models}
        return [name for name, spec in self.daemon.config.models.items() if spec.backend == "llamacpp" and name in used]

    def system_prompt(self, model: str) -> str:
        """The system prompt the model answers under: that of the first stage that runs it."""
        stages = self.daemon.config.stages
        return next((stages[key].system_prompt for key, models in self.daemon.runs.items()
                     if key in stages and model in models and stages[key].system_prompt), "")

    def _model(self, name: str | None, rid: str) -> str:
        models = self.models()
        if name is None:
            if not models:
                raise ProtocolError("not_trainable", "no stage runs an embedded (llama.cpp) model: only those are "
                                    "trained (an Ollama model's weights live in its server)", rid)
            return models[0]
        if name not in models:
            raise ProtocolError("not_trainable", f"{name!r} cannot be trained: trainable models are "
                                f"{', '.join(models) or 'none'} (embedded models that a stage runs)", rid)
        return name

    def trained_on(self, model: str) -> set[str]:
        return {i for v in self.store.history(model) for i in v.get("example_ids", ())}

    async def data(self, model: str) -> dict[str, Any]:
        """What the next run of ``model`` would train on and judge by."""
        memory = self.daemon.memory
        if memory is None:
            return {"model": model, "train": [], "held_out": [], "new": 0,
                    "why": "memory is off: training learns from remembered exchanges"}
        rated = (await memory.rated.remote(self.config.min_rating))[-self.config.max_examples:]
        examples = [{"id": r["id"], "question": r["question"], "answer": r["answer"], "rating": r["rating"]}
                    for r in rated if r["question"].strip() and r["answer"].strip()]
        train, held = split(examples, self.config.held_out)
        seen = self.trained_on(model)
        return {"model": model, "train": train, "held_out": held, "new": sum(e["id"] not in seen for e in examples),
                "min_rating": self.config.min_rating}

    # -- the rules ------------------------------------------------------------------------
    def _local(self) -> bool:
        return not self.config.num_gpus and not (self.config.placement.resources or self.config.placement.labels)

    def why_not(self) -> str | None:
        """Why a training run may not work now (None: it may)."""
        if (why := self.daemon.jobs.why_not()) is not None:
            return why
        profile = self.daemon.orchestrator.power.get("profile", "maximum")
        if profile not in self.config.profiles:
            return f"training runs on the {' or '.join(self.config.profiles)} power profile, not {profile} ([train] profiles)"
        if self._local() and (missing := missing_dependencies()):
            return (f"training needs {', '.join(missing)}: install them with `scripts/setup.sh --train` "
                    "(or `pip install 'mirador-ai[train]'` after `pip install torch`)")
        return None

    def _due(self, model: str, new: int) -> bool:
        last = max([self.failed_at.get(model, 0.0), *(v["created"] for v in self.store.history(model))])
        return new >= self.config.min_examples and time.time() - last >= self.config.interval_h * 3600

    async def schedule(self) -> None:
        """Start a run for each model that is due, every ``check_every_s`` (from the daemon's loop)."""
        while True:
            await asyncio.sleep(self.config.check_every_s)
            if not self.config.enabled or self.why_not() is not None:
                continue
            for model in self.models():
                try:
                    data = await self.data(model)
                except Exception as exc:  # the store is down: try again at the next look
                    log.error("training: could not read the rated exchanges: %s", exc)
                    break
                if model not in self.running and self._due(model, data["new"]):
                    self.start(model, f"{data['new']} new rated exchanges")

    # -- a run ----------------------------------------------------------------------------
    def start(self, model: str, why: str) -> Job:
        if model in self.running:
            return self.running[model]
        job = self.daemon.jobs.submit("train", model, lambda j: self._work(j, model), f"LoRA for {model}: {why}",
                                      lane="train", why_not=self.why_not)
        self.running[model] = job

        def ended(_: Any) -> None:
            self.running.pop(model, None)
            if job.state == "failed":  # files nothing: without this the schedule would retry at every look
                self.failed_at[model] = time.time()

        self.daemon.jobs.task(job).add_done_callback(ended)
        return job

    def _trainer(self) -> Any:
        import ray

        from mirador.actors.trainer import Trainer

        from .placement import actor_options

        ns = self.daemon.config.ray_namespace
        options = {**actor_options(f"trainer:{time.monotonic_ns()}", self.config.placement, ns), "max_restarts": 0}
        # A GPU when one is configured, or when the node it is placed on (here, by default) has one.
        if self.config.placement.local:
            here = ray.get_runtime_context().get_node_id()
            offered = next((n["Resources"] for n in ray.nodes() if n["NodeID"] == here), {})
        else:
            offered = ray.cluster_resources()
        gpus = self.config.num_gpus or (1 if offered.get("GPU", 0) >= 1 else 0)
        if gpus:
            options["num_gpus"] = gpus
        else:  # one thread, and a quiet one: OpenMP spinning beside llama.cpp slowed both (DESIGN.md)
            options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "passive"}}
        return Trainer.options(**options).remote()

    async def _work(self, job: Job, model: str) -> None:
        import ray

        from mirador.actors.llamacpp import resolve_source

        data = await self.data(model)
        train, held = data["train"], data["held_out"]
        if len(train) + len(held) < MIN_RUN_EXAMPLES or not train:
            raise JobStopped(f"only {len(train) + len(held)} exchanges are rated {self.config.min_rating} or more; "
                             f"training needs at least {MIN_RUN_EXAMPLES} (rate answers with `mirador rate 5`)")
        c = self.config
        params = {"rank": c.rank, "alpha": c.alpha, "epochs": c.epochs, "lr": c.learning_rate, "batch_size": c.batch_size,
                  "max_tokens": c.max_tokens, "threads": 1, "min_gain": c.min_gain, "max_general_drop": c.max_general_drop}
        base = str(resolve_source(self.daemon.config.models[model].source))
        version = self.store.next_version(model)
        out = self.store.path(model, version)
        job.progress = f"v{version}: starting the trainer on {len(train)} exchanges ({len(held)} held out)"
        trainer = self._trainer()
        try:
            pair = lambda e: {"question": e["question"], "answer": e["answer"]}  # noqa: E731
            result = await self._watch(job, trainer, trainer.run.remote(
                base, [pair(e) for e in train], [pair(e) for e in held], self.system_prompt(model), str(out), params))
        finally:
            ray.kill(trainer)  # its process goes, and torch's memory with it
        if "stopped" in result:
            raise JobStopped(job.stop_reason or result["stopped"])
        verdict = result["evaluation"]
        report = {"examples": len(train), "held_out_examples": len(held), "example_ids": [e["id"] for e in train + held],
                  "evaluation": {k: v for k, v in verdict.items() if k not in ("deploy", "why")},
                  "train": result["train"], "paused_s": result["paused_s"]}
        self.store.record(model, version, report, verdict["deploy"], verdict["why"])
        job.result = {"version": version, "deployed": verdict["deploy"], "why": verdict["why"]}
        job.progress = f"v{version} {'deployed' if verdict['deploy'] else 'kept back'}: {verdict['why']}"
        log.info("training %s: %s", model, job.progress)
        if verdict["deploy"] and (errors := await self.apply(model)):
            job.progress += f"; but the stages refused it: {errors[0]}"

    async def _watch(self, job: Job, trainer: Any, run: Any) -> dict[str, Any]:
        """Wait for ``run`` while pausing the trainer for questions and the CPU share, and
        stopping it when the job must stop; count its working time as the job's."""
        jobs, orchestrator = self.daemon.jobs, self.daemon.orchestrator
        pending = asyncio.wrap_future(run.future())
        paused, stopping, last, looked = False, False, time.monotonic(), 0.0
        while not pending.done():
            await asyncio.wait([pending], timeout=POLL_S)
            now = time.monotonic()
            if not paused:
                jobs.account(job, last, now)
            last = now
            if not stopping and (why := job.stop_reason or self.why_not()) is not None:
                job.stop_reason, stopping = job.stop_reason or why, True
                trainer.stop.remote()
            pause = bool(orchestrator.asks) or not jobs.share_left()
            if pause != paused and not stopping:
                paused = pause
                (trainer.pause if pause else trainer.resume).remote()
                log.debug("training %s: %s", job.id, "paused" if pause else "resumed")
                job.state = "waiting" if pause else "running"
            if now - looked >= 1.0:
                looked = now
                with_progress = await trainer.progress.remote()
                if with_progress.get("phase") == "training":
                    job.progress = f"step {with_progress['step']}/{with_progress['steps']}, loss {with_progress['loss']:.3f}"
                else:
                    job.progress = with_progress.get("phase", "")
                if paused:
                    job.progress += " (paused: a question is answered)" if orchestrator.asks else " (resting: [jobs] cpu_share)"
        return pending.result()

    async def apply(self, model: str) -> list[str]:
        """Switch every actor running ``model`` to the store's active adapter (between generations);
        returns the actors' errors. An adapter an actor refuses (its file fails the checks) is not
        left active: the model goes back to its base everywhere."""
        actors = [a for key, a in self.daemon.actors.items() if model in self.daemon.runs.get(key, ())]

        async def switch() -> list[str]:
            self._announce(model)  # named by stage_start from now on: the actors switch before any later turn
            switched = await asyncio.gather(*(a.set_adapter.remote(model) for a in actors))
            return [s["error"] for s in switched if s["error"]]

        errors = await switch()
        if errors and self.store.active(model) is not None:
            log.error("training: %s; %s runs its base model", errors[0], model)
            self.store.off(model)
            await switch()
        return errors

    # -- `mirador train ...` --------------------------------------------------------------
    async def op(self, request: dict[str, Any]) -> dict[str, Any]:
        rid, op = request["id"], request["op"]
        if op == "status":
            return self.status(request.get("model") and self._model(request["model"], rid))
        model = self._model(request.get("model"), rid)
        if op == "data":
            data = await self.data(model)
            return {**data, "trained_on_before": len(self.trained_on(model))}
        if op == "run":
            why = self.why_not()
            if why is not None:
                raise ProtocolError("jobs_off", f"training cannot run now: {why}", rid)
            job = self.start(model, "asked for")
            if request.get("wait"):
                task = self.daemon.jobs.task(job)
                if task is not None:
                    await asyncio.shield(task)
            return {"job": job.public()}
        if op == "history":
            return {"model": model, "active": (self.store.active(model) or {}).get("version"),
                    "versions": [{k: v for k, v in entry.items() if k != "example_ids"} for entry in self.store.history(model)]}
        try:
            if op == "rollback":
                self.store.rollback(model, request.get("version"))
            elif op == "off":
                self.store.off(model)
        except AdapterStoreError as exc:
            raise ProtocolError("not_found", str(exc), rid) from None
        errors = await self.apply(model)
        if errors:
            raise ProtocolError("model_error", f"{errors[0]}; {model} runs its base model", rid)
        return self.status(model)

    def status(self, model: str | None = None) -> dict[str, Any]:
        models = [model] if model else self.models()
        out = {"enabled": self.config.enabled, "allowed": self.why_not(), "models": {}}
        for name in models:
            history = self.store.history(name)
            job = self.running.get(name)
            out["models"][name] = {"active": (self.store.active(name) or {}).get("version"),
                                   "versions": len(history), "last": history[-1]["created"] if history else None,
                                   "last_why": history[-1]["why"] if history else None,
                                   "running": job.public() if job else None}
        return out
