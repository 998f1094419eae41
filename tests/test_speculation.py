"""Background jobs and speculation on a real daemon: typing-time prefill into llama.cpp's context,
follow-up speculation, the answer cache (ChromaDB on disk, MiniLM), preemption by questions, the
power profile, shutdown, and the `mirador jobs` / `mirador cache` commands."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from . import fake_battery
from .conftest import done_event, make_home, start_daemon, stop_daemon


CONFIG = """
[energy]
sensor = "tests.fake_battery:read"
poll_s = 0.2

[jobs]
cpu_share = 1.0          # tests wait for jobs, not for the share
followups = 1
followup_max_tokens = 400  # a background answer takes seconds: long enough to be caught mid-way
"""
DOG = "My dog's name is Biscuit and she is a beagle."


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    home = make_home({"mirador.toml": CONFIG})
    for key in ("MIRADOR_JOBS__FOLLOWUPS", "MIRADOR_CACHE__ENABLED"):  # conftest turns them off for other modules
        home.env.pop(key)
    battery = fake_battery.attach(home, tmp_path_factory.mktemp("battery") / "battery.json")
    d = start_daemon(home)
    d.battery = battery
    yield d
    stop_daemon(d)


def ask(daemon, text, **kwargs):
    kwargs.setdefault("stages", ["quick"])
    with daemon.home.client(idle_timeout=120) as client:
        return list(client.ask(text, **kwargs))


def event(events, kind, stage=None):
    return next((e for e in events if e["event"] == kind and (stage is None or e.get("stage") == stage)), None)


def answer(events, stage="quick"):
    return "".join(e["text"] for e in events if e["event"] == "token" and e["stage"] == stage)


def jobs(daemon):
    with daemon.home.client() as client:
        return client.jobs()


def wait_job(daemon, job_id, states=("done", "cancelled", "failed", "skipped"), timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = next((j for j in jobs(daemon)["jobs"] if j["id"] == job_id), None)
        if job and job["state"] in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {states}: {job}")


def wait_followups(daemon, after: float, progress="answering", timeout=120):
    """The newest follow-up job started after ``after``, once its progress starts with ``progress``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job in jobs(daemon)["jobs"]:
            if job["kind"] == "followups" and job["created"] >= after and (
                    job["progress"].startswith(progress) or job["state"] in ("done", "cancelled", "failed")):
                return job
        time.sleep(0.02)
    raise AssertionError("no follow-up job started")


def no_followups(daemon):
    """Cancel the follow-up jobs of the questions just asked (they are queued by the time an ask
    returns, and cache nothing before their first answer is complete): a test that needs to know
    what the cache holds runs without their predictions."""
    for job in jobs(daemon)["jobs"]:
        if job["kind"] == "followups" and job["state"] in ("queued", "running", "waiting"):
            with daemon.home.client() as client:
                client.cancel_job(job["id"])
            wait_job(daemon, job["id"])


def wait_cached(daemon, question, timeout=30):
    """Until the cache holds an entry for ``question`` (an answer is cached just after its ``done``)."""
    deadline = time.monotonic() + timeout
    with daemon.home.client() as client:
        while not any(e["question"] == question for e in client.cache("list")["entries"]):
            assert time.monotonic() < deadline, f"{question!r} was never cached"
            time.sleep(0.05)


def settle(daemon):
    """Let background jobs finish, so that a test starts on an idle model."""
    for job in jobs(daemon)["jobs"]:
        if job["state"] in ("queued", "running", "waiting"):
            wait_job(daemon, job["id"])


def test_a_hint_prefills_the_prompt_and_the_answer_is_the_same_as_a_cold_one(daemon):
    told = ask(daemon, DOG, max_tokens=8)
    assert told[-1]["event"] == "remembered"
    no_followups(daemon)
    question = "What breed is my dog?"
    with daemon.home.client() as client:
        hinted = client.hint("What breed is my dog")
    assert hinted["jobs_off"] is None and len(hinted["jobs"]) == 1
    job = wait_job(daemon, hinted["jobs"][0])
    assert job["state"] == "done" and job["kind"] == "prefill"
    ready = job["result"]["quick"]["tokens"]
    assert ready > 40  # system prompt, the memory block with the dog, and the typed words
    warm = ask(daemon, question, max_tokens=24, seed=7)
    assert event(warm, "start")["speculation"]["warmed"]["quick"]["job"] == job["id"]
    assert event(warm, "stage_start", "quick")["warmed"]["job"] == job["id"]
    assert told[-1]["memory_id"] in event(warm, "context", "quick")["memory_ids"]
    end = event(warm, "stage_end", "quick")
    # On Enter only what was not typed yet (the '?' and the template's closing tokens) is evaluated.
    assert end["reused_tokens"] >= ready - 1 and end["prompt_tokens"] - end["reused_tokens"] <= 12
    no_followups(daemon)

    with daemon.home.client() as client:  # another prompt in the model's context: a cold start
        list(client.ask("Name three colours of the rainbow.", stages=["quick"], max_tokens=8, memory=False))
        client.cache("clear")  # else the same question is served the warm answer from the cache
    cold = ask(daemon, question, max_tokens=24, seed=7)
    no_followups(daemon)
    cold_end = event(cold, "stage_end", "quick")
    assert cold_end["reused_tokens"] < ready - 10  # it had to evaluate the memory block itself
    assert answer(cold) == answer(warm) and answer(warm)

    listed = jobs(daemon)
    assert any(j["id"] == job["id"] and j["saved"]["tokens"] > 0 for j in listed["jobs"])  # credited with what it saved


def wait_background(daemon, prefix, timeout=60):
    """Until background work whose request id starts with ``prefix`` (a job id) holds the quick model."""
    deadline = time.monotonic() + timeout
    with daemon.home.client() as client:
        while not (next(a for a in client.status()["actors"] if a["stage"] == "quick")["background"] or "").startswith(prefix):
            assert time.monotonic() < deadline, (f"job {prefix} never got the model: {client.status()['actors']} "
                                                 f"{[j for j in client.jobs()['jobs'] if j['id'] == prefix]}")
            time.sleep(0.005)


def test_a_question_preempts_a_prefill_at_the_next_chunk(daemon):
    settle(daemon)
    long_text = "Please consider this carefully. " * 120 + "So what is"  # ~700 tokens: seconds of prefill
    with daemon.home.client() as client:
        hinted = client.hint(long_text, memory=True)
    job_id = hinted["jobs"][0]
    wait_background(daemon, job_id)  # evaluating the prompt now
    events = ask(daemon, "What is two plus two?", max_tokens=4, memory=False)
    assert done_event(events)["cancelled"] is False
    job = wait_job(daemon, job_id)
    quick = job["result"]["quick"]
    # It stopped between two chunks, part of the way through, and its work is moot: cancelled.
    assert job["state"] == "cancelled" and job["why"] == "preempted by a question", job
    assert 0 < quick["evaluated"] and quick["reused"] + quick["evaluated"] < quick["tokens"]


def test_a_question_preempts_follow_up_speculation_within_a_token_and_the_job_resumes(daemon):
    settle(daemon)
    # The small model does not always list questions: ask until one of its follow-up jobs does.
    for question in ("How do I make a cup of green tea?", "How do I start learning to play the guitar?",
                     "What are good exercises for a sore back?", "How do I grow tomatoes on a balcony?"):
        started = time.time()
        ask(daemon, question, max_tokens=48)
        job = wait_followups(daemon, started)
        if job["state"] != "done":
            break
    wait_background(daemon, job["id"])  # the quick model is working on the follow-up's answer now
    events = ask(daemon, "What is the capital of Italy?", max_tokens=6, memory=False)
    assert done_event(events)["cancelled"] is False
    job = wait_job(daemon, job["id"])
    assert job["state"] == "done", job  # it went on once the question was answered
    assert job["result"]["questions"]  # the predicted follow-up questions
    assert job["result"].get("preempted"), json.dumps(job)
    (preempted, *_) = job["result"]["preempted"]
    assert preempted["tokens"] < 400  # stopped part-way through its answer ...
    assert preempted["yield_s"] < 0.5  # ... and gave the model back at the next token (~10 ms here)
    with daemon.home.client() as client:
        cached = client.cache("list")["entries"]
    assert any(e["source"] == "followup" and e["question"] == job["result"]["questions"][0] for e in cached)


def test_a_paraphrased_repeat_is_served_from_cache_and_near_misses_are_not(daemon):
    settle(daemon)
    first = ask(daemon, "How many legs does a spider have?", max_tokens=16)
    no_followups(daemon)
    wait_cached(daemon, "How many legs does a spider have?")
    again = ask(daemon, "How many legs do spiders have?", max_tokens=16)
    no_followups(daemon)
    cached = event(again, "start")["speculation"]["cached"]
    assert cached and cached["stage"] == "quick" and cached["similarity"] >= 0.8 and cached["age_s"] >= 0
    start = event(again, "stage_start", "quick")
    assert start["cached"] is True and start["question"] == "How many legs does a spider have?"
    assert answer(again).strip() == answer(first).strip()  # the quick answer the first question got
    assert all(e.get("cached") for e in again if e["event"] == "token" and e["stage"] == "quick")
    assert event(again, "stage_end", "quick")["cached"] is True
    # with a deeper stage in the plan, the cached quick answer comes at once and the deep stage still runs live
    deeper = ask(daemon, "How many legs do spiders have?", max_tokens=16, stages=["quick", "deep"])
    no_followups(daemon)
    assert event(deeper, "stage_start", "quick")["cached"] is True
    deep_tokens = [e for e in deeper if e["event"] == "token" and e["stage"] == "deep"]
    assert deep_tokens and not any(e.get("cached") for e in deep_tokens)
    assert not event(deeper, "stage_end", "deep").get("cached") and event(deeper, "stage_end", "deep")["tokens"] > 0

    ask(daemon, "Is it safe to give my dog 2 grapes?", max_tokens=12)
    no_followups(daemon)
    wait_cached(daemon, "Is it safe to give my dog 2 grapes?")
    for near_miss in ("Is it safe to give my dog 20 grapes?", "Is it not safe to give my dog 2 grapes?",
                      "How many legs does a spider not have?", "How many legs does a Spider-Man toy have?"):
        events = ask(daemon, near_miss, max_tokens=6)
        no_followups(daemon)
        assert event(events, "start")["speculation"]["cached"] is None, near_miss
        assert not event(events, "stage_start", "quick").get("cached")


def test_forgetting_the_memory_an_answer_used_drops_its_cache_entry(daemon):
    settle(daemon)
    told = ask(daemon, "My cat is called Pixel and she loves tuna.", max_tokens=8)
    cat_memory = told[-1]["memory_id"]
    no_followups(daemon)
    asked = ask(daemon, "What does my cat Pixel love to eat?", max_tokens=12)
    no_followups(daemon)
    assert cat_memory in event(asked, "context", "quick")["memory_ids"]
    wait_cached(daemon, "What does my cat Pixel love to eat?")
    with daemon.home.client() as client:
        client.memory("forget", target=cat_memory)
        assert not any(e["question"] == "What does my cat Pixel love to eat?" for e in client.cache("list")["entries"])
    again = ask(daemon, "What does my cat Pixel love to eat?", max_tokens=6)
    no_followups(daemon)
    assert event(again, "start")["speculation"]["cached"] is None


def test_incognito_questions_are_neither_cached_nor_served_from_cache(daemon):
    settle(daemon)
    with daemon.home.client() as client:
        before = client.cache("stats")
    ask(daemon, "What colour is a ripe banana?", max_tokens=8, memory=False)
    with daemon.home.client() as client:
        after = client.cache("stats")
        assert after["lookups"] == before["lookups"]  # not looked up ...
        time.sleep(1.5)  # ... nor stored (a store lands ~0.5 s after an answer's done)
        assert not any(e["question"] == "What colour is a ripe banana?" for e in client.cache("list")["entries"])
    ask(daemon, "Which planet is the largest in the solar system?", max_tokens=8)
    no_followups(daemon)
    wait_cached(daemon, "Which planet is the largest in the solar system?")
    secret = ask(daemon, "Which planet is the largest in the solar system?", max_tokens=8, memory=False)
    assert event(secret, "start")["speculation"]["cached"] is None
    assert not event(secret, "stage_start", "quick").get("cached")
    with daemon.home.client() as client:  # incognito hints start no prefill (it would recall)
        assert client.hint("Which planet is", memory=False)["jobs"] == []


def test_jobs_and_cache_commands(daemon):
    settle(daemon)
    listed = daemon.home.mirador("jobs")
    assert listed.returncode == 0, listed.stderr
    assert "prefill" in listed.stdout and "followups" in listed.stdout and "today:" in listed.stdout
    as_json = json.loads(daemon.home.mirador("jobs", "--json").stdout)
    assert as_json["allowed"] is None and as_json["jobs"]
    missing = daemon.home.mirador("jobs", "cancel", "j000000000")
    assert missing.returncode == 1 and "no running or waiting job" in missing.stderr

    stats = daemon.home.mirador("cache", "stats")
    assert stats.returncode == 0 and "hits of" in stats.stdout
    assert "How many legs does a spider have?" in daemon.home.mirador("cache", "list").stdout
    overall = daemon.home.mirador("stats")
    assert "answer cache:" in overall.stdout and "background tokens:" in overall.stdout
    spec = json.loads(daemon.home.mirador("stats", "--json").stdout)["speculation"]
    assert spec["cache"]["hits"] >= 1 and spec["background_tokens"]["spent"] > 0 and spec["saved_s"] > 0

    cleared = daemon.home.mirador("cache", "clear")
    assert cleared.returncode == 0 and "cleared" in cleared.stdout
    assert json.loads(daemon.home.mirador("cache", "stats", "--json").stdout)["entries"] == 0


def test_a_running_job_is_cancelled_by_the_user(daemon):
    settle(daemon)
    started = time.time()
    ask(daemon, "What should I pack for a weekend hike?", max_tokens=8)
    job = wait_followups(daemon, started, progress="")
    cancelled = daemon.home.mirador("jobs", "cancel", job["id"])
    if job["state"] == "done":  # it finished before we could cancel it
        assert cancelled.returncode == 1
        return
    assert cancelled.returncode == 0, cancelled.stderr
    ended = wait_job(daemon, job["id"])
    assert ended["state"] == "cancelled" and ended["why"] == "cancelled by the user"


def test_jobs_stop_on_the_minimal_profile(daemon):
    settle(daemon)
    started = time.time()
    ask(daemon, "How can I sleep better at night?", max_tokens=8)
    job = wait_followups(daemon, started, progress="")
    fake_battery.write(daemon.battery, 10, False)  # low battery: the minimal profile
    try:
        ended = wait_job(daemon, job["id"])
        assert ended["state"] in ("cancelled", "skipped", "done")
        if ended["state"] != "done":
            assert "minimal" in ended["why"]
        with daemon.home.client() as client:
            assert client.status()["power"]["profile"] == "minimal"
            hinted = client.hint("How can I sleep")
        assert hinted["jobs"] == [] and "minimal" in hinted["jobs_off"]
    finally:
        fake_battery.write(daemon.battery, 90, True)
        with daemon.home.client() as client:
            deadline = time.monotonic() + 10
            while client.status()["power"]["profile"] != "maximum":
                assert time.monotonic() < deadline
                time.sleep(0.1)


def test_jobs_stop_at_shutdown(daemon):
    settle(daemon)
    started = time.time()
    ask(daemon, "Explain how a bicycle gear works.", max_tokens=8)
    job = wait_followups(daemon, started)  # generating a long answer now
    assert job["state"] != "done"
    assert stop_daemon(daemon) == 0
    db = daemon.home.paths.data / "metrics.sqlite3"
    with sqlite3.connect(db) as conn:
        (state, raw) = conn.execute("SELECT state, job FROM jobs WHERE id = ?", (job["id"],)).fetchone()
    assert state == "cancelled" and json.loads(raw)["why"] == "the daemon is shutting down"
