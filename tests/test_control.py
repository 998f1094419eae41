"""Control never waits behind work, on one real daemon: admission control (`busy`), cancels and
an actor's info answered at once while a hundred generations wait, a client that stops reading
dropped after its allowance, and every question's preloader pins released.

Raw DEALER sockets stand in for clients, so that each connection is one client and the test
decides exactly when it reads.
"""

from __future__ import annotations

import time

import psutil
import pytest
import zmq

from mirador.client import protocol

from .conftest import daemon_in_new_home

LONG = "Write a long, detailed essay about the history of astronomy, from ancient times to today."
COUNTING = "Count from 1 to 1000, separated by commas."  # long, and SmolLM2 does not end it early
TOPICS = ["rain", "snow", "wind", "fog", "hail", "thunder", "rainbows", "tides", "comets", "volcanoes"]
MAX_WAITING, PER_CLIENT = 72, 16  # more than the 64 calls a stage actor used to run at once
BUFFER_MB, STALL_S = 0.25, 4


@pytest.fixture(scope="module")
def daemon():
    config = (f"[daemon]\nmax_waiting = {MAX_WAITING}\nmax_waiting_per_client = {PER_CLIENT}\n"
              f"client_buffer_mb = {BUFFER_MB}\nclient_stall_s = {STALL_S}\n[memory]\nenabled = false\n")
    yield from daemon_in_new_home({"mirador.toml": config})


def connect(daemon, **options):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    for option, value in options.items():
        sock.setsockopt(getattr(zmq, option), value)
    sock.connect(daemon.home.paths.endpoint)
    return sock


def ask(sock, rid, text, max_tokens, stages=("quick",)):
    sock.send(protocol.request("ask", rid, text=text, stages=list(stages), options={"max_tokens": max_tokens}, memory=False))


def read(sock, replies, until, timeout):
    """Read replies into ``replies`` (id -> events, with ``at``: when it came) until ``until()``."""
    deadline = time.monotonic() + timeout
    while not until():
        left = deadline - time.monotonic()
        assert left > 0 and sock.poll(left * 1000), "the daemon stopped answering"
        event = protocol.decode_event(sock.recv())
        event["at"] = time.monotonic()
        replies.setdefault(event["id"], []).append(event)


def finals(replies):
    return {rid: events[-1] for rid, events in replies.items() if events[-1]["final"]}


def test_200_questions_at_once_are_answered_or_refused_busy_and_control_answers_at_once(daemon):
    blocker = connect(daemon)
    clients = [connect(daemon) for _ in range(8)]
    try:
        # One long answer holds the quick model, so that everything asked next waits for it.
        ask(blocker, "long", LONG, 400)
        held = {}
        read(blocker, held, lambda: any(e["event"] == "token" for e in held.get("long", [])), 120)

        sent = time.monotonic()
        replies = [{} for _ in clients]

        def burst(sock, c):
            for i in range(25):
                ask(sock, f"q{i}", f"What is {TOPICS[(c + i) % len(TOPICS)]}?", 1)

        # One client first, alone: it meets its own limit. Then seven more at once (25 each),
        # who fill the daemon-wide limit. Every ask is admitted (start) or refused, at once.
        burst(clients[0], 0)
        read(clients[0], replies[0], lambda: len(replies[0]) == 25, 30)
        for c, sock in enumerate(clients[1:], 1):
            burst(sock, c)
        for sock, got in zip(clients[1:], replies[1:]):
            read(sock, got, lambda: len(got) == 25, 30)
        refused = [[rid for rid, events in got.items() if events[0]["event"] == "error"] for got in replies]
        admitted = [[rid for rid, events in got.items() if events[0]["event"] == "start"] for got in replies]
        for got, no in zip(replies, refused):
            for rid in no:
                assert got[rid][0]["code"] == "busy" and got[rid][0]["final"], got[rid]
                assert got[rid][0]["at"] - sent < 5  # at once, not after minutes of waiting
        assert [len(a) + len(r) for a, r in zip(admitted, refused)] == [25] * 8
        # The first client's own limit, then the daemon-wide one: exactly MAX_WAITING wait.
        assert len(admitted[0]) == PER_CLIENT and all(len(a) <= PER_CLIENT for a in admitted)
        assert all("max_waiting_per_client" in replies[0][rid][0]["message"] for rid in refused[0])
        assert sum(map(len, admitted)) == MAX_WAITING
        assert any("max_waiting = " in got[rid][0]["message"] for got, no in zip(replies, refused) for rid in no)

        with daemon.home.client(idle_timeout=30) as client:
            # The quick actor's info answers although more generations wait in it than the 64
            # calls an actor used to run at once, and the queue is as admission left it.
            # The admitted calls reach the actor over a moment; every status meanwhile answers at once.
            deadline = time.monotonic() + 15
            while True:
                started = time.monotonic()
                status = client.status()
                assert time.monotonic() - started < 2.0
                quick = next(a for a in status["actors"] if a["stage"] == "quick")
                assert "error" not in quick or quick["error"] is None, quick
                if quick["waiting"] > 64 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert quick["busy"] and quick["waiting"] > 64, quick
            assert status["queue"]["waiting"] <= MAX_WAITING and status["queue"]["max_waiting"] == MAX_WAITING

            # A cancel of the last question in line ends it now, not when its turn comes.
            target = admitted[0][-1]
            cancelled = time.monotonic()
            clients[0].send(protocol.request("cancel", "c1", target=target))
            read(clients[0], replies[0], lambda: replies[0][target][-1]["event"] == "done", 10)
            assert replies[0][target][-1]["cancelled"] is True
            assert replies[0][target][-1]["at"] - cancelled < 1.0
            ends = [e for e in replies[0][target] if e["event"] == "stage_end"]
            assert ends and ends[0]["tokens"] == 0 and ends[0]["cancelled"] is True

            # The long answer's cancel reaches its actor past the waiting generations and stops
            # it within a token.
            cancelled = time.monotonic()
            blocker.send(protocol.request("cancel", "c2", target="long"))
            read(blocker, held, lambda: held["long"][-1]["final"], 10)
            assert held["long"][-1]["event"] == "done" and held["long"][-1]["cancelled"] is True
            assert held["long"][-1]["at"] - cancelled < 2.0  # ~1 s, plus a loaded 2-core machine

        # Then everyone admitted is answered, in turn; no stage timed out while it waited.
        # (~0.05 s each on a quiet machine; far more when other work shares the 2 cores.)
        for sock, got, yes in zip(clients, replies, admitted):
            read(sock, got, lambda: all(got[rid][-1]["final"] for rid in yes), 600)
            for rid in yes:
                done = [e for e in got[rid] if e["event"] == "done"]
                assert len(done) == 1 and not [e for e in got[rid] if e["event"] == "error"], got[rid]
                assert done[0]["cancelled"] is (sock is clients[0] and rid == admitted[0][-1])
        with daemon.home.client(idle_timeout=30) as client:
            queue = client.status()["queue"]
        assert queue["waiting"] == 0 and queue["in_flight"] == 0
    finally:
        for sock in [blocker, *clients]:
            sock.close(linger=0)


def test_every_question_released_its_preloader_pins(daemon):
    with daemon.home.client(idle_timeout=30) as client:
        for _ in range(50):  # the releases are sent without waiting: give them a moment
            ps = client.models("ps")
            if ps["pinned_by"] == 0:
                break
            time.sleep(0.1)
    assert ps["pinned_by"] == 0 and not any(row["in_use"] for row in ps["models"])


def daemon_rss(daemon):
    return psutil.Process(daemon.proc.pid).memory_info().rss


def test_a_client_that_stops_reading_is_dropped_and_others_are_answered(daemon):
    # A small high-water mark: the client's replies back up into the daemon soon.
    stalled = connect(daemon, RCVHWM=1)
    rss_before = daemon_rss(daemon)
    try:
        ask(stalled, "essay", COUNTING, 1500)
        got = {}
        read(stalled, got, lambda: sum(e["event"] == "token" for e in got.get("essay", [])) >= 10, 120)
        stopped = time.monotonic()  # it reads nothing from now on

        # Others are answered meanwhile, by another stage's model.
        with daemon.home.client(idle_timeout=60) as client:
            events = list(client.ask("What is fog?", stages=["deep"], max_tokens=8, memory=False))
            assert events[-1]["event"] in ("done", "remembered") and any(e["event"] == "token" for e in events)

            # Its replies wait in the daemon, never more than the allowance; then it is dropped.
            peak, status = 0, client.status()
            while status["clients"]["dropped"] == 0:
                assert time.monotonic() - stopped < 120, status["clients"]
                peak = max(peak, status["clients"]["queued_bytes"])
                time.sleep(0.2)
                status = client.status()
            assert peak <= BUFFER_MB * 2**20 + protocol.MAX_FRAME_BYTES
            why = [line for line in daemon.home.paths.logfile.read_text().splitlines() if "dropped:" in line]
            assert len(why) == 1 and ("client_stall_s" in why[0] or "client_buffer_mb" in why[0]), why
            assert status["clients"]["queued_bytes"] < 4096  # its replies were freed
            # Its generation was cancelled: the quick model is free at once.
            for _ in range(20):
                quick = next(a for a in client.status()["actors"] if a["stage"] == "quick")
                if not quick["busy"]:
                    break
                time.sleep(0.1)
            assert not quick["busy"]
        assert daemon_rss(daemon) - rss_before < 100 * 2**20  # the daemon process itself stayed small
    finally:
        stalled.close(linger=0)
