"""Many clients at once on one real daemon: everyone is served, nothing is lost, nobody waits for
a client that is slow, cancelled or gone.

Each stage actor serves its generations one at a time, first come first served, so under load
a client's first token waits for the generations ahead of it (see scripts/bench_load.py for the
numbers); these tests assert behaviour, and time only where the issue names a bound (~1 s).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time

import pytest
import zmq

from mirador.client import AsyncClient, protocol

from .conftest import BIN, daemon_in_new_home, done_event

LONG = "Write a long, detailed essay about the history of astronomy, from ancient times to today."
TOPICS = ["rain", "snow", "wind", "fog", "hail", "thunder", "rainbows", "tides", "comets", "volcanoes",
          "glaciers", "deserts", "coral", "moss", "owls", "bees"]


@pytest.fixture(scope="module")
def daemon():
    # Memory off: these tests are about the stages and the socket, and it saves a model load.
    yield from daemon_in_new_home({"mirador.toml": "[memory]\nenabled = false\n"})


def tokens_by_stage(events):
    counts = {}
    for e in events:
        if e["event"] == "token":
            counts[e["stage"]] = counts.get(e["stage"], 0) + 1
    return counts


def test_sixteen_clients_at_once_all_complete_without_losing_a_token(daemon):
    async def one(i):
        stages = ["quick"] if i % 2 else ["quick", "deep"]  # two stage actors, both queued up
        async with AsyncClient(daemon.home.paths.endpoint, idle_timeout=120) as client:
            return stages, [e async for e in client.ask(f"What are {TOPICS[i]}?", stages=stages, max_tokens=8)]

    async def everyone():
        return await asyncio.gather(*(one(i) for i in range(16)))

    answers = asyncio.run(everyone())
    assert len({events[0]["query_id"] for _, events in answers}) == 16
    for stages, events in answers:
        assert not [e for e in events if e["event"] == "error"], events
        done = done_event(events)
        assert done["cancelled"] is False
        ends = {e["stage"]: e for e in events if e["event"] == "stage_end"}
        assert sorted(ends) == sorted(stages)
        received = tokens_by_stage(events)
        for stage in stages:  # every token the model produced reached this client
            assert received[stage] == ends[stage]["tokens"] == done["metrics"]["stages"][stage]["tokens"] > 0
            assert ends[stage]["queued_s"] >= 0
    # First come, first served: someone waited for the others, and everyone got a turn.
    waits = sorted(ends["quick"]["queued_s"] for _, events in answers
                   for ends in [{e["stage"]: e for e in events if e["event"] == "stage_end"}])
    assert waits[-1] > waits[0]


def test_a_client_that_reads_nothing_does_not_hold_up_the_others(daemon):
    slow = zmq.Context.instance().socket(zmq.DEALER)
    slow.setsockopt(zmq.RCVHWM, 1)
    slow.connect(daemon.home.paths.endpoint)
    try:
        slow.send(protocol.request("ask", "slow-1", text=LONG, stages=["quick"], options={"max_tokens": 200}, memory=False))
        time.sleep(0.2)  # it is generating (or queued) for the slow client, who reads nothing
        # The next question waits for the model's turn, not for the slow reader.
        with daemon.home.client(idle_timeout=60) as client:
            events = list(client.ask("What is fog?", stages=["quick"], max_tokens=8, memory=False))
        assert done_event(events) and tokens_by_stage(events)["quick"] > 0
        # The slow client then gets everything, in order, nothing dropped.
        replies = []
        while not replies or not replies[-1]["final"]:
            assert slow.poll(30_000), "the slow client's answer stopped"
            replies.append(protocol.decode_event(slow.recv()))
        end = next(e for e in replies if e["event"] == "stage_end")
        assert sum(e["event"] == "token" for e in replies) == end["tokens"] > 0
    finally:
        slow.close(linger=0)


def test_cancel_stops_every_stage_within_a_second(daemon):
    with daemon.home.client(idle_timeout=60) as client:
        events = client.ask(LONG, stages=["quick", "deep", "synthesis"], max_tokens=1500, memory=False)
        seen = []
        for event in events:
            seen.append(event)
            if {"quick", "deep"} <= set(tokens_by_stage(seen)):  # both generating
                break
        cancelled = time.monotonic()
        client.cancel(seen[0]["id"])
        rest = list(events)
        stopped = time.monotonic() - cancelled
        status = client.status()
    assert rest[-1]["event"] == "done" and rest[-1]["cancelled"] is True
    ends = [e for e in seen + rest if e["event"] == "stage_end"]
    assert {e["stage"] for e in ends} == {"quick", "deep"}  # synthesis never started
    assert all(e["cancelled"] for e in ends)
    # ~1 s per the issue, plus 1 s for a loaded 2-core machine; the answers had ~1500 tokens to go.
    assert stopped < 2.0
    assert not any(a["busy"] for a in status["actors"])


def test_a_client_killed_mid_answer_frees_its_generation(daemon):
    proc = subprocess.Popen([str(BIN / "mirador"), "ask", "--json", "--no-memory", "--stages", "quick",
                             "--max-tokens", "1500", LONG], env=daemon.home.env, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if json.loads(line)["event"] == "token":
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = time.monotonic()
    # The next question on the same model: its first token must not wait for the dead client's
    # answer (up to 1500 tokens, ~15 s here). The daemon notices at its next frame to the dead
    # client and the model stops at its next token; ~1 s per the issue, plus 1 s of margin for a
    # loaded 2-core machine (the question's own prompt is part of it).
    with daemon.home.client(idle_timeout=60) as client:
        for event in client.ask("What is hail?", stages=["quick"], max_tokens=4, memory=False):
            if event["event"] == "token":
                first_token = time.monotonic() - killed
                break
    assert first_token < 2.0
