"""``miradord``: the daemon process.

Start-up: config (and owner checks of every directory) → pid lock → Ray (private, loopback-only,
with its own token; or joined) → one StageActor per stage, models loaded →
ZeroMQ socket bound (clients that find the socket find a ready daemon) → serve until SIGTERM or
SIGINT. Shutdown: no new request is read; the memory and learner writes in flight finish and are
acknowledged (for at most ``SHUTDOWN_DRAIN_S``); then running asks end with a ``shutting_down``
error, actors are killed, the Ray it started is stopped and its temp dir and token removed, the
socket file is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import signal
import stat
import sys
import time
from importlib import metadata
from logging.handlers import RotatingFileHandler
from typing import IO, Any

from mirador.client.errors import UnsafePath
from mirador.client.paths import Paths
from mirador.client.protocol import ProtocolError

from .access import TcpAccess
from .config import Config, ConfigError, Placement, http_override, load_config

log = logging.getLogger("mirador.daemon")

# At shutdown, how long the memory and learner writes in flight may take to finish before the
# actors are stopped (a write takes ~0.3 s here; systemd allows 90 s for the whole stop).
SHUTDOWN_DRAIN_S = 15.0


def actor_name(key: str) -> str:
    """The Ray actor name of an actor key: stages are ``stage:NAME``, chain-only models ``model:NAME``."""
    return key if key.startswith("model:") else f"stage:{key}"


def version() -> str:
    try:
        return metadata.version("mirador-ai")
    except metadata.PackageNotFoundError:
        return "unknown"


class Daemon:
    def __init__(self, config: Config, paths: Paths, tcp: TcpAccess | None = None, private_ray: Any = None):
        self.config, self.paths = config, paths
        self.tcp = tcp  # the TCP endpoint for CurveZMQ clients, if any
        self.private_ray = private_ray  # ray_boot.PrivateRay, prepared by main; None to join config.ray_address
        self.started_at = time.time()
        self.ray_address = ""
        self.ray_started = private_ray is not None
        self.actors: dict[str, Any] = {}  # stage name, or "model:NAME" for a chain-only model -> StageActor
        self.runs: dict[str, tuple[str, ...]] = {}  # actor key -> the models it can run
        self.memory: Any = None  # the MemoryStore actor, when memory is on
        self.memory_error: str | None = None  # why memory is off although configured on
        self.learner: Any = None  # the Learner actor, when learning is on
        self.energy: Any = None  # the EnergyMonitor actor
        self.preloader: Any = None  # the Preloader actor: every model load and unload goes through it
        self.http: Any = None  # the HTTP API (http_server.HttpApi), unless [http] listen is off
        self.server: Any = None  # the ZeroMQ Server, once bound
        self.jobs: Any = None  # jobs.JobManager: background work (speculation)
        self.speculation: Any = None  # speculation.Speculation
        self.training: Any = None  # training.Training: LoRA adapters for the embedded models
        self.ready = False

    # -- what the server asks of us -------------------------------------------------------
    def pong(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "version": version(), "ready": self.ready}

    async def status(self) -> dict[str, Any]:
        async def one(key: str, actor: Any) -> dict[str, Any]:
            name = actor_name(key)
            placement = self.config.stages[key].placement if key in self.config.stages else Placement()
            where = {"placement": placement.describe()}
            try:
                return {"name": name, **where, **await asyncio.wait_for(actor.info.remote(), 5)}
            except Exception as exc:  # a dead or stuck actor is reported, not fatal
                return {"name": name, "stage": key, **where, "loaded": False,
                        "error": f"not responding ({type(exc).__name__}): {placement.why_not_running()}"}

        actors = await asyncio.gather(*(one(s, a) for s, a in self.actors.items()))
        memory: dict[str, Any] = {"enabled": False, "error": self.memory_error}
        if self.memory is not None:
            where = {"placement": self.config.memory.placement.describe()}
            try:
                memory = {"enabled": True, **where, **await asyncio.wait_for(self.memory.stats.remote(), 10)}
            except Exception as exc:
                memory = {"enabled": True, **where, "error": f"not responding ({type(exc).__name__})"}
        return {
            **self.pong(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "ray_address": self.ray_address,
            "ray_started_here": self.ray_started,
            "ray_namespace": self.config.ray_namespace,
            "socket": str(self.paths.socket),
            "listen": self.tcp.endpoint if self.tcp else None,
            "http": self.http.url if self.http else None,
            "log": str(self.paths.logfile),
            "actors": list(actors),
            "memory": memory,
            "training": self.training.status(),
            "power": self.orchestrator.power,  # status is served only once the orchestrator exists
            "queue": self.orchestrator.queue(),
            "clients": self.server.clients(),
            "routes": {kind: list(stages) for kind, stages in self.config.routes.items()},
            "chains": [{"name": c.name, "description": c.description, "steps": [f"{st.name} ({st.model})" for st in c.steps]}
                       for c in self.config.chains.values()],
        }

    async def stats(self) -> dict[str, Any]:
        summary = await self.metrics.summary()
        cache: dict[str, Any] | None = None
        if self.memory is not None:
            try:
                cache = await asyncio.wait_for(self.memory.cache_stats.remote(), 10)
            except Exception as exc:  # the store is down: the rest of the stats still answer
                cache = {"error": f"not responding ({type(exc).__name__})"}
        jobs = summary.pop("jobs")
        spent = sum(kind["tokens"] for kind in jobs.values())
        used = sum(kind["used_tokens"] for kind in jobs.values()) + ((cache or {}).get("tokens_used") or 0)
        summary["speculation"] = {
            "cache": cache, "jobs": jobs,
            "saved_s": round(sum(kind["saved_s"] for kind in jobs.values()) + ((cache or {}).get("saved_s") or 0.0), 3),
            "background_tokens": {"spent": spent, "used": min(used, spent), "wasted": max(spent - used, 0)},
        }
        return summary

    async def jobs_op(self, request: dict[str, Any]) -> dict[str, Any]:
        """`mirador jobs` and `mirador jobs cancel ID`."""
        if request["op"] == "list":
            return self.jobs.list()
        if not self.jobs.cancel(request["target"]):
            raise ProtocolError("not_found", f"no running or waiting job {request['target']!r}; `mirador jobs` lists them",
                                request["id"])
        return {"cancelled": True}

    async def train_op(self, request: dict[str, Any]) -> dict[str, Any]:
        """`mirador train status|data|run|history|rollback|off`."""
        return await self.training.op(request)

    async def cache_op(self, request: dict[str, Any]) -> dict[str, Any]:
        """`mirador cache list|clear|stats`: the answer cache, kept by the memory store."""
        rid, op = request["id"], request["op"]
        if self.memory is None:
            raise ProtocolError("memory_disabled", "the answer cache lives in the memory store, which is off: "
                                f"{self.memory_error or 'memory.enabled = false in mirador.toml'}", rid)
        if op == "list":
            return {"entries": await self.memory.cache_list.remote(request.get("limit", 50))}
        if op == "clear":
            return {"cleared": await self.memory.cache_clear.remote()}
        return await self.memory.cache_stats.remote()

    async def memory_op(self, request: dict[str, Any]) -> dict[str, Any]:
        """The user's controls over what is remembered (``memory`` requests)."""
        import ray

        rid = request["id"]
        if self.memory is None:
            why = f"memory is unavailable: {self.memory_error}" if self.memory_error else "memory is off (memory.enabled = false in mirador.toml)"
            raise ProtocolError("memory_disabled", why, rid)
        from .orchestrator import store_failure
        from .placement import call_while_restarting

        try:
            # Not an import: had the store written the batch before it died, a second try would
            # skip those memories as already there, and `memory import` could not undo them.
            if request["op"] == "import":
                return await self._memory_op(request, self.memory)
            return await call_while_restarting(lambda: self._memory_op(request, self.memory), self.config.actor_wait_s)
        except ray.exceptions.RayError as exc:  # a failed write says why (a full disk)
            raise ProtocolError("memory_unavailable", store_failure(exc), rid) from None

    async def _memory_op(self, request: dict[str, Any], m: Any) -> dict[str, Any]:
        rid, op = request["id"], request["op"]
        if op == "list":
            return {"records": await m.list.remote(request.get("limit", 50))}
        if op == "export":
            return {"records": await m.list.remote(0)}
        if op == "search":
            return {"records": await m.search.remote(request["query"], request.get("limit", 10))}
        if op == "show":
            record = await m.show.remote(request["target"])
            if record is None:
                raise ProtocolError("not_found", f"no memory with id {request['target']!r}", rid)
            return {"records": [record]}
        if op == "forget" and "target" in request:
            if not await m.forget.remote(request["target"]):
                raise ProtocolError("not_found", f"no memory with id {request['target']!r}", rid)
            return {"forgotten": 1}
        if op == "forget":
            return {"forgotten": await m.forget_many.remote(request["targets"])}
        if op == "forget_all":
            return {"forgotten": await m.forget_all.remote()}
        return await m.import_records.remote(request["records"])  # op == "import"

    def _learner(self, rid: str) -> Any:
        if self.learner is None:
            raise ProtocolError("learning_disabled", "learning is off (learning.enabled = false in mirador.toml)", rid)
        return self.learner

    async def rate(self, request: dict[str, Any]) -> dict[str, Any]:
        import ray  # imported where used: ray_boot configures it before the first import

        rid, learner = request["id"], self._learner(request["id"])
        query_id = request.get("query_id") or await learner.last_query.remote()
        if query_id is None:
            raise ProtocolError("not_found", "there is no answer to rate yet", rid)
        try:
            rated = await learner.rate.remote(query_id, request["score"])
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, KeyError):
                raise ProtocolError("not_found", f"no answered question with id {query_id!r} "
                                    "(incognito questions are not learned from)", rid) from None
            raise
        if self.memory is not None:  # the rating goes with the exchange too: training picks the well-rated ones
            if (storing := self.orchestrator.storing.get(query_id)) is not None:
                await asyncio.wait([storing], timeout=SHUTDOWN_DRAIN_S)
            try:
                rated["stored"] = await self.memory.rate.remote(query_id, request["score"])
            except ray.exceptions.RayError as exc:  # the learner has it; say that the memory does not
                rated["stored"] = False
                log.error("the rating of %s was not kept with its memory: %s", query_id, exc)
        return rated

    async def learn(self, request: dict[str, Any]) -> dict[str, Any]:
        learner = self._learner(request["id"])
        if request["op"] == "reset":
            return {"reset": await learner.reset.remote()}
        return {"types": await learner.stats.remote()}

    async def hint(self, request: dict[str, Any]) -> dict[str, Any]:
        """A partial question: start loading what it will probably need, and prefill its prompt."""
        text = request["text"]
        if not text.strip():
            return {"predictions": [], "jobs": [], "jobs_off": None}
        predictions = await self.preloader.prepare.remote(None, text, self.orchestrator.power.get("profile", "maximum"))
        job = self.speculation.prefill(text, request.get("session")) if request.get("memory", True) else None
        return {"predictions": predictions, "jobs": [job.id] if job else [], "jobs_off": self.jobs.why_not()}

    async def models_op(self, request: dict[str, Any]) -> dict[str, Any]:
        """`mirador models list|ps|load|unload`."""
        rid, op, preloader = request["id"], request["op"], self.preloader
        if op == "ps":
            ps = await preloader.ps.remote()
            for row in ps["models"]:  # the LoRA adapter each embedded model runs with
                row["adapter"] = self.orchestrator.adapters.get(row["model"])
            return ps
        if op == "list":
            return {"models": self._model_list((await preloader.ps.remote())["models"])}
        name = request["name"]
        if name not in self.config.models:
            raise ProtocolError("unknown_model", f"no model {name!r} in the manifest; `mirador models list` shows them "
                                "(add [models.NAME] to models.toml in your config dir)", rid)
        if not await preloader.targets.remote(name):
            raise ProtocolError("model_unused", f"no stage or chain runs {name!r}: name it in a stage's models, "
                                "or give it roles = [\"STAGE\"] in models.toml", rid)
        if op == "unload":
            return {"unloaded": await preloader.unload.remote(name)}
        results = await preloader.load.remote(name)
        if not any(r["loaded"] for r in results):
            raise ProtocolError("model_error", f"{name} did not load: {results[0]['error']}", rid)
        return {"loaded": results}

    def _model_list(self, loaded: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from mirador.actors.backend import ModelError
        from mirador.actors.llamacpp import resolve_source

        out = []
        for spec in self.config.models.values():
            available: bool | str | None = None  # None: Ollama knows, the manifest does not
            if spec.backend == "llamacpp":
                try:
                    available = bool(resolve_source(spec.source))
                except ModelError as exc:
                    available = str(exc)
            out.append({"name": spec.name, "backend": spec.backend, "source": spec.source, "size_mb": spec.size_mb,
                        "roles": list(spec.roles), "triggers": list(spec.triggers), "priority": spec.priority,
                        "actors": [key for key, models in self.runs.items() if spec.name in models],
                        "loaded_in": [row["actor"] for row in loaded if row["model"] == spec.name], "available": available})
        return out

    def new_ask(self, request: dict[str, Any], client: bytes) -> Any:
        return self.orchestrator.new_ask(request, client)

    async def run_ask(self, ask: Any, emit: Any) -> None:
        await self.orchestrator.run(ask, emit)

    def cancel_ask(self, ask: Any) -> None:
        self.orchestrator.cancel(ask)

    async def _watch_power(self) -> None:
        """Keep the orchestrator's power reading fresh, off the path of any question."""
        import ray

        while True:
            await asyncio.sleep(self.config.energy.poll_s)
            try:
                power = await self.energy.read.remote()
            except ray.exceptions.RayError as exc:
                log.error("the energy monitor did not answer: %s", exc)
                continue
            if power["profile"] != self.orchestrator.power.get("profile"):
                log.info("power profile %s -> %s (battery %s)", self.orchestrator.power.get("profile"), power["profile"], power["battery"])
            self.orchestrator.power = power
            if (why := self.jobs.why_not()) is not None:  # e.g. the battery ran low: running jobs stop too
                for job_id in list(self.jobs.jobs):
                    self.jobs.cancel(job_id, why)

    def _record(self, ask: Any, metrics: dict[str, Any]) -> None:
        self.metrics.record(ask.query_id, ask.route.kind, ask.mode, metrics)

    async def _prune(self) -> None:
        """Keep the metrics and the learner's tables within their retention: at start, then every
        ``retention.prune_every_s``; the deletes run on the metrics thread and in the learner actor."""
        import ray

        r = self.config.retention
        while True:
            try:
                dropped = {"metrics": await self.metrics.prune(r.metrics_days, r.metrics_max_rows)}
                if self.learner is not None:
                    dropped.update(await self.learner.prune.remote(r.learning_days, r.learning_max_rows))
                if any(dropped.values()):
                    log.info("retention: dropped %s", ", ".join(f"{n} {what}" for what, n in dropped.items() if n))
            except ray.exceptions.RayError as exc:
                log.error("retention: the learner did not prune: %s", exc)
            await asyncio.sleep(r.prune_every_s)

    async def _await_loads(self, loads: dict[str, Any]) -> None:
        """Wait for the stages' models. A stage whose actor does not answer within ``actor_wait_s``
        (no node of the cluster can hold it) is not waited for: questions skip it until a node
        that can hold it joins; its queued ``load`` then runs there."""
        import ray

        async def one(name: str, load: Any) -> None:
            actor, placement = self.actors[name], self.config.stages[name].placement
            try:  # info is answered while the model loads: this only waits for the actor to exist
                await asyncio.wait_for(actor.info.remote(), self.config.actor_wait_s)
                loaded = await load  # the preloader's report
                info = await actor.info.remote()
            except (TimeoutError, ray.exceptions.RayError) as exc:
                log.error("stage %s: its actor is not running (%s: %s); questions skip it until it starts",
                          name, type(exc).__name__, placement.why_not_running())
                return
            if loaded["loaded"]:
                log.info("stage %s: %s loaded in %.2f s on %s (%s)", name, loaded["model"], loaded["load_s"],
                         info["hostname"], info["node_ip"])
            else:
                log.error("stage %s: %s is not loaded: %s", name, loaded["model"], loaded["error"])

        await asyncio.gather(*(one(name, load) for name, load in loads.items()))

    # -- life cycle -----------------------------------------------------------------------
    async def run(self) -> None:
        import ray

        from mirador.actors.energy import EnergyMonitor, forced_profile
        from mirador.actors.learner import Learner
        from mirador.actors.memory import MemoryStore
        from mirador.actors.preloader import Preloader
        from mirador.actors.stage import StageActor

        from .metrics import MetricsStore
        from .orchestrator import Orchestrator
        from .placement import create
        from .ray_boot import start_ray
        from .server import Server

        log.info("miradord %s starting (pid %d); Ray %s", version(), os.getpid(),
                 f"at {self.config.ray_address}" if self.config.ray_address else "private, local")
        ns = self.config.ray_namespace
        self.ray_address = start_ray(self.config.ray_address, self.config.ray_num_cpus, ns, self.private_ray)
        # Ray installs its own SIGTERM handler in ray.init; ours go in after it.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        server = None
        self.metrics = MetricsStore(self.paths.data / "metrics.sqlite3")
        here = Placement()  # the learner's data and the battery read are this machine's
        if self.config.memory.enabled:
            self.memory = create(MemoryStore, "memory", self.config.memory.placement, ns, "memory.placement",
                                 str(self.paths.data / "memory"), self.config.cache.max_entries)
        if self.config.learning_enabled:
            self.learner = create(Learner, "learner", here, ns, "learner", str(self.paths.data / "learning.sqlite3"))
        energy = self.config.energy
        self.energy = create(EnergyMonitor, "energy", here, ns, "energy", energy.sensor, energy.low_battery_percent,
                             forced_profile())
        try:
            adapters = str(self.paths.data / "adapters")

            def manifest(models: tuple[str, ...]) -> list[dict[str, Any]]:
                entries = [self.config.models[m].manifest_entry() for m in models]
                # embedded models run with the LoRA adapter the store has active (runtime/training.py)
                return [{**e, "options": {**e["options"], "adapters": adapters}} if e["backend"] == "llamacpp" else e
                        for e in entries]

            for name, stage in self.config.stages.items():
                self.runs[name] = self.config.actor_models(name)
                self.actors[name] = create(StageActor, actor_name(name), stage.placement, ns, f"stages.{name}.placement",
                                           name, manifest(self.runs[name]), stage.confidence_prior, stage.system_prompt)
            for chain in self.config.chains.values():  # chain models no stage runs get an actor, loaded on use
                for step in chain.steps:
                    key = self.config.actor_for_model(step.model)
                    if key not in self.actors:
                        self.runs[key] = (step.model,)
                        self.actors[key] = create(StageActor, actor_name(key), here, ns, f"chains.{chain.name}", key,
                                                  manifest(self.runs[key]), 0.6)
            self.preloader = create(Preloader, "preloader", here, ns, "preloader", self.config, self.actors, self.runs,
                                    str(self.paths.data / "metrics.sqlite3"))
            # Each stage's first model, while it fits the budget (asked in stage order: the
            # preloader serves the budget first come, first served).
            loads = {name: self.preloader.ensure.remote(name, stage.models[0], False)
                     for name, stage in self.config.stages.items()}
            if self.memory is not None:
                try:
                    stats = await self.memory.stats.remote()
                    log.info("memory: %d memories in %s", stats["memories"], stats["path"])
                except ray.exceptions.RayError as exc:  # answer without memory rather than not at all
                    log.error("memory is unavailable, answering without it: %s", exc)
                    ray.kill(self.memory)
                    self.memory, self.memory_error = None, str(exc).splitlines()[-1]
            self.orchestrator = Orchestrator(self.config, self.actors, self.memory, self.learner, self._record, self.preloader)
            self.orchestrator.power = await self.energy.read.remote()
            from .jobs import JobManager
            from .speculation import Speculation

            self.jobs = JobManager(self.config.jobs, lambda: self.orchestrator.power.get("profile", "maximum"), self.metrics)
            await self.jobs.start()
            self.speculation = self.orchestrator.speculation = Speculation(self.orchestrator, self.jobs)
            from .training import Training

            self.training = Training(self)
            log.info("power profile: %s (battery %s)", self.orchestrator.power["profile"], self.orchestrator.power["battery"])
            watching = asyncio.ensure_future(self._watch_power())
            pruning = asyncio.ensure_future(self._prune())
            training = asyncio.ensure_future(self.training.schedule())
            await self._await_loads(loads)
            server = self.server = Server(self.paths.endpoint, self, self.tcp, self.config.limits)
            server.bind()
            if self.config.http.listen:
                from .http_server import HttpApi

                self.http = HttpApi(self, self.config.http, self.paths)
                await self.http.start()
            self.ready = True
            log.info("ready in %.1f s at %s", time.time() - self.started_at, self.paths.endpoint)
            stop_copying_log_to_a_file()
            serving = asyncio.ensure_future(server.serve())
            await stop.wait()
            log.info("shutting down: %d pending writes", self.orchestrator.pending_writes)
            serving.cancel()  # no new requests; answers already running go on while writes drain
            watching.cancel()
            pruning.cancel()
            training.cancel()
            await self.jobs.close()
            lost = await self.orchestrator.drain(SHUTDOWN_DRAIN_S)
            if lost:
                log.error("%d memory or learner writes did not finish within %g s of shutdown and may be lost",
                          lost, SHUTDOWN_DRAIN_S)
            else:
                log.info("pending writes finished")
        finally:
            if self.http is not None:
                await self.http.close()
            if server is not None:
                await server.close()
            for actor in [*self.actors.values(), *filter(None, [self.memory, self.learner, self.energy, self.preloader])]:
                ray.kill(actor)  # for good: no_restart is the default
            ray.shutdown()  # stops the Ray it started (main then removes its files); from a joined cluster it only disconnects
            self.metrics.close()
            log.info("stopped")


def setup_logging(paths: Paths, level: str, max_bytes: int, backups: int) -> None:
    """Log to the state dir's miradord.log, rotated at ``max_bytes`` (0: never) keeping ``backups``
    old files, and to stderr."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [RotatingFileHandler(paths.logfile, maxBytes=max_bytes, backupCount=backups),
                                       logging.StreamHandler(sys.stderr)]
    root = logging.getLogger("mirador")
    root.setLevel(level.upper())
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)


def stop_copying_log_to_a_file() -> None:
    """Once ready, stop copying the log to stderr if stderr is a plain file (`mirador daemon start`
    keeps it for start-up errors): the rotated log has every line, and that copy would grow
    without bound. A terminal or the journal keeps getting them."""
    try:
        if not stat.S_ISREG(os.fstat(sys.stderr.fileno()).st_mode):
            return
    except (OSError, ValueError):
        return
    root = logging.getLogger("mirador")
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler and handler.stream is sys.stderr:
            log.info("further log lines go to the log file only")
            root.removeHandler(handler)


def acquire_pid_lock(paths: Paths) -> IO[str] | None:
    """Hold an exclusive lock on the pid file for the daemon's lifetime; None if another holds it.

    The kernel drops the lock when the process dies, however it dies, so a stale pid file never
    blocks a new daemon.
    """
    handle = open(paths.pidfile, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="miradord", description="The Mirador daemon (runs in the foreground).")
    parser.add_argument("--ray-address", help="join this Ray cluster ('auto' or HOST:PORT) instead of starting a private one")
    parser.add_argument("--log-level", help="debug, info, warning or error (default from config: info)")
    parser.add_argument("--listen", metavar="tcp://HOST:PORT",
                        help="also serve CurveZMQ clients whose keys are in authorized_keys on this TCP endpoint "
                             "(keys: `mirador keys init`; default from config: daemon.listen)")
    parser.add_argument("--http", metavar="HOST:PORT",
                        help="serve the HTTP API (Ollama /api, OpenAI /v1, web view /ui) here, or 'off' "
                             "(default from config: http.listen, 127.0.0.1:11435)")
    args = parser.parse_args(argv)

    paths = Paths.from_env()
    try:
        paths.ensure()
        config = load_config(paths)
        listen = args.listen or config.listen
        tcp = TcpAccess.load(listen, paths) if listen else None  # missing keys: said now, not after Ray starts
        if args.http is not None:
            config = config.model_copy(update={"http": http_override(config.http, args.http)})
        from .http_server import check_listen

        check_listen(config.http, paths)  # beyond loopback without an API key: refused now
    except (ConfigError, UnsafePath, OSError, ValueError) as exc:
        print(f"miradord: {exc}", file=sys.stderr)
        return 2
    if args.ray_address:
        config = config.model_copy(update={"ray": config.ray.model_copy(update={"address": args.ray_address})})
    setup_logging(paths, args.log_level or config.log_level, config.retention.log_max_bytes, config.retention.log_backups)

    lock = acquire_pid_lock(paths)
    if lock is None:
        log.error("another miradord is already running for %s (pid file %s)", paths.runtime, paths.pidfile)
        return 1
    from .ray_boot import ClusterJoinError, PrivateRay

    private_ray = None
    try:
        try:
            if not config.ray_address:  # before anything imports Ray: it reads its environment once, at import
                private_ray = PrivateRay.prepare(paths, config.retention.log_max_bytes, config.retention.log_backups)
            from mirador.actors.energy import forced_profile

            forced_profile()  # a wrong MIRADOR_POWER_PROFILE is a start-up error, said plainly
        except (UnsafePath, OSError, ValueError) as exc:
            log.error("%s", exc)
            return 2
        from .placement import ClusterError

        try:
            asyncio.run(Daemon(config, paths, tcp, private_ray).run())
        except (ConfigError, UnsafePath) as exc:  # found only once Ray checks it, e.g. a label selector's syntax
            log.error("%s", exc)
            return 2
        except (ClusterJoinError, ClusterError) as exc:
            log.error("%s", exc)
            return 1
        except Exception:
            log.exception("miradord failed")
            return 1
    finally:
        if private_ray is not None:
            private_ray.remove()  # Ray has stopped: its temp dir and token go
        paths.pidfile.unlink(missing_ok=True)  # still ours: we hold the lock until the close below
        lock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
