"""The logic that keeps control ahead of work, without Ray: a stage model's turns, and the
preloader's pins whatever order Ray runs prepare/need/release in (the real daemon's path is in
test_control.py)."""

from __future__ import annotations

import asyncio

from mirador.actors.preloader import Preloader
from mirador.actors.turns import Turns
from mirador.client.paths import Paths
from mirador.runtime.config import load_config


def test_turns_take_arrival_order_control_first_and_a_withdrawn_waiter_leaves_at_once():
    async def scenario():
        turns, order = Turns(), []
        assert await turns.take("a")  # a generates

        async def generation(key):
            got = await turns.take(key)
            order.append((key, got))
            if got:
                await asyncio.sleep(0)
                turns.give_back()

        async def control():
            async with turns.urgent():
                order.append(("load", True))

        waiting = [asyncio.ensure_future(generation(k)) for k in "bcd"]
        await asyncio.sleep(0)
        assert turns.waiting == 3
        assert turns.withdraw("c")  # its question was cancelled while it waited
        await asyncio.sleep(0)
        assert order == [("c", False)]  # at once, while a still holds the model
        loading = asyncio.ensure_future(control())
        await asyncio.sleep(0)
        turns.give_back()  # a is done: the load goes before b and d, who were there first
        await asyncio.gather(*waiting, loading)
        assert order == [("c", False), ("load", True), ("b", True), ("d", True)]
        assert not turns.withdraw("b")  # no longer waiting

        # A waiter interrupted by ray.cancel leaves the queue; the turn goes on to the next one.
        assert await turns.take("e")
        f, g = asyncio.ensure_future(turns.take("f")), asyncio.ensure_future(turns.take("g"))
        await asyncio.sleep(0)
        f.cancel()
        await asyncio.sleep(0)
        turns.give_back()
        assert await g and turns.waiting == 0
        turns.give_back()
        assert await asyncio.wait_for(turns.take("h"), 1)  # free again
        turns.give_back()

    asyncio.run(scenario())


class _Call:
    def __init__(self, fn):
        self.remote = fn  # returns a coroutine, awaited like an ObjectRef


class _FakeStage:
    """Stands in for a StageActor handle: the preloader only loads and unloads through it."""

    def __init__(self):
        self.load, self.unload = _Call(self._load), _Call(self._unload)

    async def _load(self, model):
        return {"model": model, "loaded": True, "load_s": 0.0, "error": None}

    async def _unload(self, model):
        return [model]


def test_preloader_pins_are_released_whatever_order_the_calls_arrive_in(tmp_path):
    config = load_config(Paths.from_env({"MIRADOR_HOME": str(tmp_path)}))
    stages = list(config.stages)
    model = config.stages["quick"].models[0]
    quick = ("quick", model)

    async def scenario():
        preloader = Preloader.__ray_metadata__.modified_class(
            config, {s: _FakeStage() for s in stages}, {s: config.actor_models(s) for s in stages}, str(tmp_path / "none.db"))
        text = "Explain why the sky is blue."  # medium: quick and deep
        predicted = {(p["actor"], p["model"]) for p in preloader.predict(text) if p["p"] >= config.preload.threshold}
        assert quick in predicted and len(predicted) > 1  # the route's stages: more than the plan below runs

        # The order the orchestrator sends them in.
        await preloader.prepare("q1", text)
        assert preloader._pinned() == predicted
        await preloader.need("q1", [quick])
        assert preloader._pinned() == {quick}  # the plan replaces the prediction
        await preloader.release("q1", None, [quick])
        assert preloader._pinned() == set()

        # need before prepare: the plan still wins.
        await preloader.need("q2", [quick])
        await preloader.prepare("q2", text)
        assert preloader._pinned() == {quick}
        await preloader.release("q2", None, [quick])
        assert preloader._pinned() == set()

        # release first (the question was over before Ray ran the others): nothing is pinned.
        await preloader.release("q3", None, [])
        await preloader.need("q3", [quick])
        await preloader.prepare("q3", text)
        assert preloader._pinned() == set()
        assert (await preloader.ps())["pinned_by"] == 0

    asyncio.run(scenario())


def test_background_work_gets_the_model_last_and_is_told_to_yield_when_a_question_arrives():
    async def scenario():
        turns, order = Turns(), []
        assert await turns.take("job", background=True)  # nobody waits: background work may use the model
        assert not turns.preempt.is_set()

        async def waiter(key, background=False):
            got = await turns.take(key, background=background)
            order.append(key)
            if got:
                await asyncio.sleep(0)
                turns.give_back()

        later_job = asyncio.ensure_future(waiter("job2", background=True))
        await asyncio.sleep(0)
        assert not turns.preempt.is_set()  # more background work does not preempt background work
        question = asyncio.ensure_future(waiter("question"))
        await asyncio.sleep(0)
        assert turns.preempt.is_set()  # a question waits: the holder must give the model back
        assert turns.waiting == 1  # background waiters are not counted as waiting questions
        turns.give_back()  # the job yields
        await asyncio.gather(question, later_job)
        assert order == ["question", "job2"]  # the question first, although the second job came earlier
        assert not turns.preempt.is_set()

        # A waiting background job can be withdrawn (cancelled) like a question.
        assert await turns.take("q")
        job = asyncio.ensure_future(turns.take("job3", background=True))
        await asyncio.sleep(0)
        assert turns.withdraw("job3") and await job is False
        turns.give_back()
        assert await turns.take("free")  # the model is free again

    asyncio.run(scenario())
