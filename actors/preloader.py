"""``Preloader``: which models are loaded where, within a memory budget, and loading ahead of need.

Every load decision goes through this actor; the stage actors only carry them out. It keeps:

* what is loaded: (actor key, model) -> when last used, the sizes coming from the manifest's
  ``size_mb`` (a model without one counts as 0);
* pins: the (actor, model) pairs a running question needs (predicted by ``prepare``, then those
  of its plan from ``need``, until ``release``). The budget evicts the least recently
  used pair that is not pinned; a stage actor also waits for its running generation before it
  unloads anything, so no model is ever unloaded mid-answer. When nothing can be evicted, the
  load goes ahead over budget (an answer matters more than the ceiling) and ``ps`` shows it;
* what questions of each route class used, seeded from the metrics database, for prediction.

Prediction (``predict``): for each stage of the route the question gets (trimmed by the power
profile), the model that would answer it: 0.9 when a trigger chose it, 0.8 for the stage's own
model; and every pair that earlier questions of the same class used, with the share of those
questions that used it. Pairs at or above ``preload.threshold`` are loaded ahead.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import Counter, OrderedDict, defaultdict
from pathlib import Path
from typing import Any

import ray

from mirador.runtime.config import Config
from mirador.runtime.router import classify

log = logging.getLogger("mirador.preloader")

Pair = tuple[str, str]  # (actor key, model)
P_TRIGGER, P_ROUTE = 0.9, 0.8
# Released question ids remembered, so that a late prepare/need pins nothing. A call is late by
# at most the calls in flight, which admission control bounds ([daemon] max_waiting) far below this.
RELEASED_KEPT = 10_000


def route_history(metrics_db: Path, stages: list[str]) -> dict[str, tuple[int, Counter[Pair]]]:
    """Per route class: how many questions, and how many of them each (stage, model) answered."""
    if not metrics_db.is_file():
        return {}
    try:
        with sqlite3.connect(f"file:{metrics_db}?mode=ro", uri=True) as conn:
            totals = dict(conn.execute("SELECT route, COUNT(*) FROM queries GROUP BY route"))
            rows = conn.execute("SELECT q.route, s.stage, s.model, COUNT(DISTINCT q.query_id) FROM queries q "
                                "JOIN stage_runs s ON s.query_id = q.query_id GROUP BY q.route, s.stage, s.model").fetchall()
    except sqlite3.Error as exc:  # history only sharpens predictions: go on without it
        log.warning("could not read %s for preloading: %s", metrics_db, exc)
        return {}
    used: dict[str, Counter[Pair]] = defaultdict(Counter)
    for route, stage, model, n in rows:
        if stage in stages and model:
            used[route][(stage, model)] = n
    return {route: (n, used[route]) for route, n in totals.items()}


@ray.remote(num_cpus=0, max_concurrency=64)
class Preloader:
    def __init__(self, config: Config, actors: dict[str, Any], runs: dict[str, tuple[str, ...]], metrics_db: str):
        """``actors``: actor key -> StageActor handle; ``runs``: actor key -> the models it can run."""
        import psutil

        self.config, self.actors, self.runs = config, actors, runs
        budget = config.preload.budget_mb or config.preload.budget_share * psutil.virtual_memory().available / 2**20
        self.budget_mb = round(budget, 1)
        self.loaded: dict[Pair, float] = {}  # -> last used (monotonic)
        self.loading: dict[Pair, asyncio.Future[dict[str, Any]]] = {}
        self.predicted: dict[str, set[Pair]] = {}  # request id -> pairs ``prepare`` expects it to need
        self.needed: dict[str, set[Pair]] = {}  # request id -> pairs its plan runs (wins over predicted)
        self.released: OrderedDict[str, None] = OrderedDict()  # request ids already over, newest last
        self.load_s: dict[str, float] = {}  # model -> its last load time
        self.history = {route: (n, Counter(used)) for route, (n, used) in route_history(Path(metrics_db), list(config.stages)).items()}
        self._room = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()  # loads started ahead (held: the loop keeps only weak references)

    # -- accounting ----------------------------------------------------------------------
    def _size(self, model: str) -> float:
        return self.config.models[model].size_mb or 0.0

    def used_mb(self) -> float:
        return round(sum(self._size(model) for _, model in self.loaded), 1)

    def _pinned(self) -> set[Pair]:
        pins = [*self.needed.values(), *(pairs for rid, pairs in self.predicted.items() if rid not in self.needed)]
        return set().union(*pins)


    def _make_room(self, size: float, keep: Pair | None = None) -> list[Pair]:
        """Drop least recently used, unpinned pairs from the books until ``size`` more fits;
        returns them. Called under ``_room``; the caller unloads them (after the lock)."""
        evicted = []
        pinned = self._pinned()
        for pair in sorted(self.loaded, key=self.loaded.get):
            if self.used_mb() + size <= self.budget_mb:
                break
            if pair in pinned or pair == keep or pair in self.loading:
                continue
            del self.loaded[pair]
            evicted.append(pair)
        if self.used_mb() + size > self.budget_mb:
            log.warning("loading %.0f MB goes over the %.0f MB budget: the loaded models are in use", size, self.budget_mb)
        return evicted

    async def _unload(self, pairs: list[Pair]) -> None:
        for key, model in pairs:
            log.info("budget: unloading %s from %s (least recently used)", model, key)
        await asyncio.gather(*(self.actors[key].unload.remote(model) for key, model in pairs), return_exceptions=True)

    async def ensure(self, key: str, model: str, evict: bool = True) -> dict[str, Any]:
        """Have ``model`` loaded in actor ``key``, evicting for room when ``evict``; returns how it went."""
        pair = (key, model)
        if pair in self.loaded and pair not in self.loading:
            self.loaded[pair] = time.monotonic()
            return {"actor": key, "model": model, "loaded": True, "load_s": 0.0, "evicted": [], "error": None}
        if pair in self.loading:
            return await asyncio.shield(self.loading[pair])
        done = asyncio.get_running_loop().create_future()
        self.loading[pair] = done
        result: dict[str, Any] = {"actor": key, "model": model, "loaded": False, "load_s": 0.0, "evicted": [], "error": None}
        try:
            async with self._room:
                if not evict and self.used_mb() + self._size(model) > self.budget_mb:
                    result["error"] = f"not loaded: {self._size(model):.0f} MB would exceed the {self.budget_mb:.0f} MB budget"
                    return result
                evicted = self._make_room(self._size(model), keep=pair)
                self.loaded[pair] = time.monotonic()  # counted from now, so concurrent loads see it
            unloading = asyncio.ensure_future(self._unload(evicted))
            try:
                loaded = await self.actors[key].load.remote(model)
            finally:
                await unloading
            result.update(loaded, actor=key, evicted=[f"{m} ({k})" for k, m in evicted])
            if loaded["loaded"]:
                self.load_s[model] = loaded["load_s"]
                log.info("loaded %s in %s in %.2f s", model, key, loaded["load_s"])
            return result
        except ray.exceptions.RayError as exc:
            result["error"] = f"the {key} actor did not answer: {type(exc).__name__}"
            return result
        finally:
            if not result["loaded"]:
                self.loaded.pop(pair, None)
            self.loading.pop(pair, None)
            done.set_result(result)

    # -- prediction ----------------------------------------------------------------------
    def predict(self, text: str, profile: str = "maximum") -> list[dict[str, Any]]:
        """The (actor, model) pairs this question will probably need, most likely first."""
        route = classify(text).kind
        limits = self.config.energy.limits.get(profile)
        stages = list(self.config.routes.get(route, self.config.stages))
        if limits is not None:
            stages = limits.keep(stages)
        found: dict[Pair, tuple[float, str]] = {}
        for stage in stages:
            models = self.config.stage_models(stage, text)
            if limits is not None and limits.smallest_model:
                models = self.config.smallest_first(models)
            triggered = models[0] != self.config.stages[stage].models[0]
            found[(stage, models[0])] = (P_TRIGGER, "trigger") if triggered else (P_ROUTE, f"route {route}")
        asked, used = self.history.get(route, (0, Counter()))
        for pair, n in used.items():
            p = n / (asked + 1)  # +1: one question of a class is no certainty
            if pair[0] in self.actors and pair[1] in self.runs.get(pair[0], ()) and p > found.get(pair, (0.0, ""))[0]:
                found[pair] = (round(p, 3), f"used by {n} of {asked} {route} questions")
        return [{"actor": key, "model": model, "p": p, "why": why, "loaded": (key, model) in self.loaded}
                for (key, model), (p, why) in sorted(found.items(), key=lambda kv: -kv[1][0])]

    async def prepare(self, request_id: str | None, text: str, profile: str = "maximum") -> list[dict[str, Any]]:
        """Predict, and start loading the likely pairs (pinned for ``request_id``, if any).
        Returns the predictions at once; the loads go on in the background."""
        predictions = self.predict(text, profile)
        if not self.config.preload.enabled:
            return predictions
        if request_id in self.released:  # came after its question was over: nothing to do
            return predictions
        likely = [(p["actor"], p["model"]) for p in predictions if p["p"] >= self.config.preload.threshold]
        if request_id is not None:
            self.predicted[request_id] = set(likely)
        for key, model in likely:
            if (key, model) not in self.loaded:
                task = asyncio.ensure_future(self.ensure(key, model))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        return predictions

    async def need(self, request_id: str, pairs: list[Pair]) -> None:
        """The pairs a question's plan runs: pin them for it and have them loaded."""
        if request_id in self.released:  # came after its question was over: nothing to do
            return
        self.needed[request_id] = {tuple(p) for p in pairs}
        await asyncio.gather(*(self.ensure(key, model) for key, model in self.needed[request_id]))

    async def release(self, request_id: str, route: str | None = None, used: list[Pair] = ()) -> None:
        """The question is over: unpin its pairs; learn which pairs its route class used."""
        self.predicted.pop(request_id, None)
        self.needed.pop(request_id, None)
        self.released[request_id] = None
        while len(self.released) > RELEASED_KEPT:
            self.released.popitem(last=False)
        now = time.monotonic()
        for pair in map(tuple, used):
            self.loaded[pair] = now  # a generation may have loaded it itself
        if route is not None:
            asked, counts = self.history.get(route, (0, Counter()))
            counts.update({tuple(p) for p in used})
            self.history[route] = (asked + 1, counts)
        async with self._room:  # a generation's own load may have gone over budget
            evicted = self._make_room(0)
        await self._unload(evicted)

    # -- what `mirador models` asks ------------------------------------------------------
    def targets(self, model: str) -> list[str]:
        """The actors that can run ``model``."""
        return [key for key, models in self.runs.items() if model in models]

    async def load(self, model: str) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self.ensure(key, model) for key in self.targets(model))))

    async def unload(self, model: str) -> list[str]:
        """Unload ``model`` from every actor that has it (each waits for its running answer)."""
        keys = self.targets(model)
        for key in keys:
            self.loaded.pop((key, model), None)
        results = await asyncio.gather(*(self.actors[key].unload.remote(model) for key in keys))
        return [key for key, unloaded in zip(keys, results) if unloaded]

    async def ps(self) -> dict[str, Any]:
        """What every actor actually holds (the books are corrected from it), with budget figures."""
        async def info(key: str) -> dict[str, Any] | None:
            try:
                return await asyncio.wait_for(self.actors[key].info.remote(), 5)
            except Exception:  # a dead actor holds nothing
                return None

        infos = dict(zip(self.actors, await asyncio.gather(*(info(key) for key in self.actors))))
        now, pinned, rows = time.monotonic(), self._pinned(), []
        for key, i in infos.items():
            for model, is_loaded in (i or {}).get("models", {}).items():
                pair = (key, model)
                if not is_loaded:
                    if pair not in self.loading:
                        self.loaded.pop(pair, None)
                    continue
                self.loaded.setdefault(pair, now)
                rows.append({"model": model, "actor": key, "backend": self.config.models[model].backend,
                             "size_mb": self._size(model), "node_id": i["node_id"], "pid": i["pid"],
                             "idle_s": round(now - self.loaded[pair], 1), "load_s": self.load_s.get(model),
                             "in_use": pair in pinned or i.get("generating") == model})
        return {"budget_mb": self.budget_mb, "used_mb": self.used_mb(), "models": rows,
                "pinned_by": len(self.predicted.keys() | self.needed.keys())}  # questions holding pins
