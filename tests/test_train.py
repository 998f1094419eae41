"""Background LoRA training on a real daemon: real Ray, ChromaDB, torch + peft in a Trainer
actor, the gguf export, llama.cpp judging and hot-loading the adapter in the stage actors.

A run here is small (a dozen rated exchanges of the persona in scripts/persona.py, a few
optimizer steps) so the module stays within a couple of minutes; scripts/bench_train.py measures
real runs. The deploy gate's general-set tolerance is wide here: it is tested on its own in
tests/test_lora.py (an adapter that hurts the general set is rejected)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from mirador.actors.adapters import AdapterStore, AdapterStoreError
from mirador.client.errors import ResponseError
from mirador.client.protocol import ProtocolError, check_request
from mirador.actors.lora_train import missing_dependencies
from mirador.runtime.training import split
from scripts import persona

from . import fake_battery
from .conftest import done_event, make_home, start_daemon, stop_daemon

# CI installs the train extra (scripts/test.sh); without it only the tests that need no torch run.
needs_training = pytest.mark.skipif(bool(missing_dependencies()), reason="training needs the train extra: scripts/setup.sh --train")

CONFIG = """
[energy]
sensor = "tests.fake_battery:read"
poll_s = 0.2

[jobs]
cpu_share = 1.0   # the test waits for the run, not for the share

[train]
enabled = false   # no scheduled runs: the tests start them
epochs = 8         # long enough that a question comes while it takes steps
learning_rate = 1e-3
max_tokens = 96
held_out = 0.25
max_general_drop = 10.0  # a dozen exchanges for 8 epochs overfit; tests/test_lora.py tests the gate itself
"""
QUESTION = "What is a lighthouse keeper?"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    home = make_home({"mirador.toml": CONFIG})
    battery = fake_battery.attach(home, tmp_path_factory.mktemp("battery") / "battery.json")
    d = start_daemon(home)
    d.battery = battery
    yield d
    stop_daemon(d)


def client(daemon):
    return daemon.home.client(idle_timeout=300)


def ask(daemon, text, **kwargs):
    """Greedy and, unless told otherwise, incognito: the same question gets the same prompt (no
    memory of the earlier asks), so only the adapter can change its answer."""
    kwargs.setdefault("stages", ["quick"])
    kwargs.setdefault("max_tokens", 48)
    kwargs.setdefault("memory", False)
    with client(daemon) as c:
        return list(c.ask(text, temperature=0.0, **kwargs))


def answer(events):
    return "".join(e["text"] for e in events if e["event"] == "token")


def event(events, kind):
    return next(e for e in events if e["event"] == kind)


def test_training_data_is_the_well_rated_remembered_exchanges(daemon):
    records = [{"id": f"persona-{n}", "question": e["question"], "answer": e["answer"], "rating": 5}
               for n, e in enumerate(persona.exchanges(12))]
    records += [{"id": "meh-1", "question": "What is tea?", "answer": "A drink.", "rating": 3},
                {"id": "unrated-1", "question": "What is coffee?", "answer": "A drink too."}]
    with client(daemon) as c:
        assert c.memory("import", records=records)["imported"] == 14
        # an answered question rated 5 joins them (the rating is kept with its memory) ...
        events = ask(daemon, "What is a comet made of?", memory=True)
        rated = c.rate(5, done_event(events)["query_id"])
        assert rated["stored"] is True
        # ... an incognito one cannot be rated at all, and is never stored
        incognito = ask(daemon, "What is my secret plan?")
        with pytest.raises(ResponseError, match="incognito"):
            c.rate(5, done_event(incognito)["query_id"])
        data = c.train("data")
        ids = {e["id"] for e in data["train"] + data["held_out"]}
        assert ids == {r["id"] for r in records[:12]} | {done_event(events)["query_id"]}
        assert len(data["held_out"]) == round(13 * 0.25) and data["new"] == 13
        # export carries the rating; forgetting an exchange takes it out of training
        exported = {r["id"]: r for r in c.memory("export")["records"]}
        assert exported["persona-0"]["rating"] == 5 and exported["meh-1"]["rating"] == 3
        c.memory("forget", target=done_event(events)["query_id"])
        assert done_event(events)["query_id"] not in {e["id"] for e in c.train("data")["train"] + c.train("data")["held_out"]}
    shown = daemon.home.mirador("train", "data")
    assert shown.returncode == 0 and "12 exchanges rated 4 or more" in shown.stdout


@needs_training
def test_a_run_trains_judges_and_hot_loads_the_adapter_and_yields_to_questions(daemon):
    base = ask(daemon, QUESTION)
    assert "adapter" not in event(base, "stage_start") and event(base, "stage_end")["adapter"] is None
    with client(daemon) as c:
        job = c.train("run")["job"]
        # once it is taking optimizer steps, a question comes: the trainer waits for it
        deadline = time.monotonic() + 240
        while not next(j for j in c.jobs()["jobs"] if j["id"] == job["id"])["progress"].startswith("step"):
            assert time.monotonic() < deadline, "the run never started training"
            time.sleep(0.2)
        during = ask(daemon, "Tell me a long story about the sea.", max_tokens=300)
        assert done_event(during)["metrics"]["stages"]["quick"]["tokens"] > 0
        while (job := next(j for j in c.jobs()["jobs"] if j["id"] == job["id"]))["state"] not in ("done", "failed", "cancelled"):
            assert time.monotonic() < deadline + 240, "the run did not end"
            time.sleep(0.5)
        assert job["state"] == "done", job
        assert job["result"]["deployed"] is True, job["result"]
        history = c.train("history")
        (v1,) = history["versions"]
        assert history["active"] == 1 and v1["deployed"]
        assert v1["evaluation"]["held_out"]["change"] >= 0.05  # measured in llama.cpp
        assert v1["paused_s"] > 0, v1["train"]  # it paused for the question
        # every actor that runs the model switched, without a restart
        status = c.status()
        assert all(a["adapters"]["smollm2-135m"] == 1 for a in status["actors"] if "smollm2-135m" in a.get("adapters", {}))
        assert status["training"]["models"]["smollm2-135m"]["active"] == 1
        assert any(row["adapter"] == 1 for row in c.models("ps")["models"])
    adapted = ask(daemon, QUESTION)
    assert event(adapted, "stage_start")["adapter"] == 1 and event(adapted, "stage_end")["adapter"] == 1
    assert answer(adapted) != answer(base)  # greedy decoding: only the adapter changed
    shown = daemon.home.mirador("status")
    assert "LoRA v1" in shown.stdout and "adapter v1" in shown.stdout


@needs_training
def fresh_v1(daemon):
    """Adapter v1 from a clean context: a switch drops the evaluated prompt, so what follows is
    computed exactly as after any other switch (llama.cpp's numbers, hence a greedy answer, can
    differ in the last bits between a prompt evaluated whole and one reusing a cached prefix)."""
    with client(daemon) as c:
        c.train("off")
        assert c.train("rollback", version=1)["models"]["smollm2-135m"]["active"] == 1


def test_a_swap_while_an_answer_streams_waits_for_it_and_never_mixes_adapters(daemon):
    fresh_v1(daemon)
    alone = answer(ask(daemon, QUESTION, max_tokens=200))
    fresh_v1(daemon)
    streamed: dict = {}

    def long_answer():
        streamed["events"] = ask(daemon, QUESTION, max_tokens=200)
        streamed["ended"] = time.monotonic()

    talker = threading.Thread(target=long_answer)
    talker.start()
    with client(daemon) as c:
        while not any(a.get("busy") for a in c.status()["actors"]):
            time.sleep(0.02)
        status = c.train("off")
    switched = time.monotonic()
    talker.join()
    assert status["models"]["smollm2-135m"]["active"] is None
    assert switched >= streamed["ended"] - 0.5  # the switch waited for the answer (give or take the client's last read)
    events = streamed["events"]
    assert event(events, "stage_end")["adapter"] == 1
    assert answer(events) == alone  # all of it under v1, token for token
    after = ask(daemon, QUESTION, max_tokens=200)
    assert event(after, "stage_end")["adapter"] is None and "adapter" not in event(after, "stage_start")
    with client(daemon) as c:
        assert c.train("rollback", version=1)["models"]["smollm2-135m"]["active"] == 1
    assert answer(ask(daemon, QUESTION, max_tokens=200)) == alone


@needs_training
def test_rollback_goes_to_the_deployed_version_before_and_refuses_unknown_ones(daemon):
    with client(daemon) as c:
        job = c.train("run", wait=True, timeout=600)["job"]
        assert job["state"] == "done" and job["result"]["version"] == 2
        if job["result"]["deployed"]:
            assert c.train("status")["models"]["smollm2-135m"]["active"] == 2
            assert c.train("rollback")["models"]["smollm2-135m"]["active"] == 1
        with pytest.raises(ResponseError, match="no deployed adapter v7"):
            c.train("rollback", version=7)
        with pytest.raises(ResponseError, match="cannot be trained"):
            c.train("status", model="no-such-model")
    listed = daemon.home.mirador("train", "history")
    assert listed.returncode == 0 and "v1" in listed.stdout and "v2" in listed.stdout


@needs_training
def test_a_run_stops_on_the_minimal_profile_and_none_starts_there(daemon):
    with client(daemon) as c:
        job = c.train("run")["job"]
        while next(j for j in c.jobs()["jobs"] if j["id"] == job["id"])["state"] == "queued":
            time.sleep(0.1)
        fake_battery.write(daemon.battery, 10, False)  # a low battery: the minimal profile
        try:
            deadline = time.monotonic() + 60
            while (ended := next(j for j in c.jobs()["jobs"] if j["id"] == job["id"]))["state"] not in ("cancelled", "done", "failed"):
                assert time.monotonic() < deadline, "the run did not stop"
                time.sleep(0.2)
            assert ended["state"] == "cancelled" and "minimal" in ended["why"]
            with pytest.raises(ResponseError, match="minimal"):
                c.train("run")
        finally:
            fake_battery.write(daemon.battery, 90, True)
        assert c.train("status")["models"]["smollm2-135m"]["versions"] == 2  # the stopped run filed nothing


# -- without a daemon --------------------------------------------------------------------
def test_a_rejected_version_leaves_the_active_one_and_its_file_goes(tmp_path):
    store = AdapterStore(tmp_path)
    for version in (1, 2):
        store.path("m", version).write_bytes(b"adapter")
    store.record("m", 1, {}, True, "better")
    store.record("m", 2, {}, False, "hurts the general set")
    assert store.active("m")["version"] == 1 and not store.path("m", 2).exists()
    assert store.next_version("m") == 3
    with pytest.raises(AdapterStoreError, match="no earlier adapter"):
        store.rollback("m")
    store.off("m")
    assert store.active("m") is None and store.rollback("m", 1) == 1


def test_the_held_out_split_is_stable_as_exchanges_come():
    examples = [{"id": f"e{n}"} for n in range(40)]
    _, held = split(examples, 0.2)
    _, held_more = split(examples + [{"id": f"x{n}"} for n in range(5)], 0.2)
    assert len(held) == 8 and len({e["id"] for e in held} - {e["id"] for e in held_more}) <= 2


def test_train_requests_are_checked():
    ok = {"v": 1, "id": "r1", "type": "train", "op": "rollback", "version": 2}
    assert check_request(ok) is ok
    for bad, why in ((dict(ok, op="explode"), "one of"), (dict(ok, version=0), "positive"), (dict(ok, wait="yes"), "wait")):
        with pytest.raises(ProtocolError, match=why):
            check_request(bad)


@needs_training
def test_a_damaged_adapter_file_never_reaches_llama_cpp_and_the_base_model_answers(daemon):
    with client(daemon) as c:
        active = c.train("status")["models"]["smollm2-135m"]["active"]
        c.train("off")
        path = daemon.home.paths.data / "adapters" / "smollm2-135m" / f"v{active}.gguf"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated, as by a full disk
        with pytest.raises(ResponseError, match="was not applied"):
            c.train("rollback", version=active)
        events = ask(daemon, QUESTION)  # the process did not crash: the base model answers
        assert event(events, "stage_end")["adapter"] is None and answer(events)
        assert "adapter" not in event(events, "stage_start")
        quick = next(a for a in c.status()["actors"] if a["stage"] == "quick")
        assert quick["adapters"]["smollm2-135m"] is None and "smollm2-135m" in quick["adapter_errors"]
        assert c.train("status")["models"]["smollm2-135m"]["active"] is None  # not left active


def offline_training(data_dir: Path, profile: str = "maximum", **train: object):
    """The daemon's Training over a stand-in for the rest of the daemon (its rules need no Ray)."""
    from types import SimpleNamespace

    from mirador.runtime import training
    from mirador.runtime.config_schema import TrainConfig

    daemon = SimpleNamespace(config=SimpleNamespace(train=TrainConfig(**train), models={}), runs={},
                             paths=SimpleNamespace(data=data_dir),
                             jobs=SimpleNamespace(why_not=lambda: None), orchestrator=SimpleNamespace(power={"profile": profile}))
    return training.Training(daemon)


def test_a_machine_without_the_training_packages_says_how_to_install_them(monkeypatch, tmp_path):
    from mirador.runtime import training

    monkeypatch.setattr(training, "missing_dependencies", lambda: ["torch", "peft"])
    why = offline_training(tmp_path).why_not()
    assert "torch, peft" in why and "scripts/setup.sh --train" in why


def test_the_schedule_waits_for_enough_new_exchanges_and_the_interval_and_the_profile(tmp_path):
    t = offline_training(tmp_path, min_examples=20, interval_h=6)
    assert t._due("m", 20) and not t._due("m", 19)  # never trained: only the count matters
    t.store.record("m", 1, {"example_ids": ["a"]}, True, "better")
    assert not t._due("m", 50)  # trained just now: wait for the interval
    assert offline_training(tmp_path, min_examples=20, interval_h=0)._due("m", 20)
    failing = offline_training(tmp_path / "other", min_examples=20, interval_h=6)
    failing.failed_at["m"] = time.time()  # a run that failed just now waits like one that ran
    assert not failing._due("m", 50)
    assert "balanced" in offline_training(tmp_path, profile="balanced").why_not()
    assert offline_training(tmp_path, profile="balanced", profiles=("maximum", "balanced")).why_not() is None
