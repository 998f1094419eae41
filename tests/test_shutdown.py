"""Nothing acknowledged is lost: a daemon told to stop while it stores an exchange finishes and
acknowledges it first; a daemon killed while storing loses none of what it acknowledged."""

from __future__ import annotations

import json
import os
import re
import signal

from .conftest import done_event, start_daemon, stop_daemon


def _memory_ids(home) -> set[str]:
    listed = home.mirador("memory", "list", "--limit", "0", "--json")
    assert listed.returncode == 0, listed.stderr
    return {r["id"] for r in json.loads(listed.stdout)}


def test_sigterm_while_an_exchange_is_stored_finishes_and_acknowledges_it(home):
    d = start_daemon(home)
    try:
        with home.client(idle_timeout=120) as client:
            events = []
            for event in client.ask("My passport is in the top drawer of the desk.", stages=["quick"], max_tokens=8):
                events.append(event)
                if event["event"] == "done":  # the exchange's write has started: stop the daemon now
                    d.proc.send_signal(signal.SIGTERM)
        assert events[-1]["event"] == "remembered" and events[-1]["final"], events[-3:]
        assert d.proc.wait(timeout=60) == 0
    finally:
        stop_daemon(d)
    log = home.paths.logfile.read_text()
    pending = re.search(r"shutting down: (\d+) pending writes", log)
    assert pending and int(pending.group(1)) >= 1, "the write was not in flight when SIGTERM came"
    assert "pending writes finished" in log

    d = start_daemon(home)
    try:
        memory_id = events[-1]["memory_id"]
        assert memory_id == done_event(events)["query_id"] and memory_id in _memory_ids(home)
        found = home.mirador("memory", "search", "--json", "where is my passport")
        assert memory_id in [r["id"] for r in json.loads(found.stdout)]
    finally:
        stop_daemon(d)


def test_sigkill_while_remembering_loses_nothing_acknowledged(home):
    d = start_daemon(home)
    acknowledged: list[str] = []
    killed_during = None
    with home.client(idle_timeout=120) as client:
        store_pid = client.status()["memory"]["pid"]
        for i in range(4):
            for event in client.ask(f"Note {i}: the code for locker {i} is {4410 + i}.", stages=["quick"], max_tokens=4):
                if event["event"] == "remembered":
                    acknowledged.append(event["memory_id"])
                elif event["event"] == "done" and i == 3:
                    # Its write is under way: the store's process and the daemon die mid-write.
                    os.kill(store_pid, signal.SIGKILL)
                    os.kill(d.proc.pid, signal.SIGKILL)
                    killed_during = event["query_id"]
                    break
    d.proc.wait(timeout=30)
    assert len(acknowledged) == 3 and killed_during

    d = start_daemon(home)  # the store opens cleanly after the kill
    try:
        with home.client() as client:
            memory = client.status()["memory"]
        assert memory["enabled"] and not memory.get("error") and memory["memories"] >= 3
        stored = _memory_ids(home)
        assert set(acknowledged) <= stored  # every acknowledged exchange is there
        with home.client(idle_timeout=120) as client:
            events = list(client.ask("Which code opens locker 1?", stages=["quick"], max_tokens=4))
        assert events[-1]["event"] == "remembered"  # and it takes new ones
        recalled = next(e for e in events if e["event"] == "memory")["recalled"]
        assert acknowledged[1] in [m["id"] for m in recalled]
    finally:
        stop_daemon(d)
