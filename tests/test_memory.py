"""Memory on a real daemon: ChromaDB on disk, the real embedding model, recall, sessions, privacy."""

from __future__ import annotations

import json
import os
import signal

from .conftest import done_event, start_daemon, stop_daemon

DOG = "My dog's name is Biscuit and she is a beagle."


def ask(home, text, **kwargs):
    kwargs.setdefault("stages", ["quick"])
    kwargs.setdefault("max_tokens", 12)
    with home.client(idle_timeout=120) as client:
        return list(client.ask(text, **kwargs))


def count(home) -> int:
    with home.client() as client:
        return client.status()["memory"]["memories"]


def event(events, kind):
    return next((e for e in events if e["event"] == kind), None)


def test_a_fact_told_earlier_is_recalled_for_a_paraphrase_and_unrelated_ones_are_not(daemon):
    told = ask(daemon.home, DOG)
    remembered = told[-1]
    assert remembered["event"] == "remembered" and remembered["final"] and remembered["memory_id"] == told[0]["query_id"]

    later = ask(daemon.home, "What breed is my dog?")
    recalled = event(later, "memory")["recalled"]
    assert remembered["memory_id"] in [m["id"] for m in recalled]
    assert all(0.4 <= m["similarity"] <= 1 for m in recalled)
    context = event(later, "context")  # what the quick stage was actually given
    assert context["stage"] == "quick" and remembered["memory_id"] in context["memory_ids"]

    unrelated = ask(daemon.home, "What is the boiling point of water at sea level?")
    assert remembered["memory_id"] not in [m["id"] for m in event(unrelated, "memory")["recalled"]]
    context = event(unrelated, "context")
    assert context is None or remembered["memory_id"] not in context["memory_ids"]


def test_no_memory_reads_and_writes_nothing(daemon):
    before = count(daemon.home)
    events = ask(daemon.home, DOG, memory=False)
    assert event(events, "memory") is None and event(events, "context") is None
    assert events[-1]["event"] == "done" and events[-1]["final"] and event(events, "remembered") is None
    assert count(daemon.home) == before
    cli = daemon.home.mirador("ask", "--no-memory", "--json", "--stages", "quick", "--max-tokens", "4", "Secret plans.")
    assert cli.returncode == 0 and '"remembered"' not in cli.stdout
    assert count(daemon.home) == before


def test_session_turns_come_back_as_history(daemon):
    first = ask(daemon.home, "I am planning a trip to Lisbon in May.", session="trip")
    assert event(first, "memory")["history"] == 0
    second = ask(daemon.home, "Where am I going?", session="trip")
    assert event(second, "memory")["history"] == 1
    assert first[-1]["memory_id"] not in [m["id"] for m in event(second, "memory")["recalled"]]  # not twice
    other = ask(daemon.home, "Where am I going?", session="elsewhere")
    assert event(other, "memory")["history"] == 0


def test_forget_really_deletes(daemon):
    memory_id = ask(daemon.home, "My locker code is 4417.")[-1]["memory_id"]
    found = daemon.home.mirador("memory", "search", "--json", "locker code")
    assert memory_id in [r["id"] for r in json.loads(found.stdout)]
    assert daemon.home.mirador("memory", "forget", memory_id).returncode == 0
    found = daemon.home.mirador("memory", "search", "--json", "locker code")
    assert memory_id not in [r["id"] for r in json.loads(found.stdout)]
    gone = daemon.home.mirador("memory", "show", memory_id)
    assert gone.returncode == 1 and "no memory with id" in gone.stderr
    recalled = event(ask(daemon.home, "What is my locker code?"), "memory")["recalled"]
    assert memory_id not in [m["id"] for m in recalled]


def test_export_forget_all_import_round_trip(daemon, tmp_path):
    ask(daemon.home, "My favourite colour is green.")
    exported = tmp_path / "memories.jsonl"
    assert daemon.home.mirador("memory", "export", str(exported)).returncode == 0
    records = [json.loads(line) for line in exported.read_text().splitlines()]
    assert len(records) == count(daemon.home) > 0
    assert {"id", "question", "answer", "session", "ts", "route"} <= records[0].keys()

    wiped = daemon.home.mirador("memory", "forget", "--all", "--yes")
    assert wiped.returncode == 0 and f"forgot {len(records)} memories" in wiped.stdout
    assert count(daemon.home) == 0 and "no memories" in daemon.home.mirador("memory", "list").stdout

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "question": "q", "answer": "a"}\nnot json\n')
    refused = daemon.home.mirador("memory", "import", str(bad))
    assert refused.returncode == 2 and "bad.jsonl:2" in refused.stderr and count(daemon.home) == 0

    imported = daemon.home.mirador("memory", "import", str(exported))
    assert imported.returncode == 0 and f"imported {len(records)}" in imported.stdout
    listed = json.loads(daemon.home.mirador("memory", "list", "--limit", "0", "--json").stdout)
    assert sorted((r["id"], r["question"], r["ts"]) for r in listed) == sorted((r["id"], r["question"], r["ts"]) for r in records)
    assert event(ask(daemon.home, "Which colour do I like best?"), "memory")["recalled"]


def test_status_shows_the_store(daemon):
    status = daemon.home.mirador("status")
    assert status.returncode == 0 and "memories" in status.stdout and "MB in" in status.stdout


def test_acknowledged_exchanges_survive_sigkill_and_restart(home):
    d = start_daemon(home)
    events = ask(home, "The spare key is under the blue flowerpot.")
    memory_id = events[-1]["memory_id"]
    assert memory_id and done_event(events)
    os.kill(d.proc.pid, signal.SIGKILL)  # right after the acknowledgement: no clean shutdown
    d.proc.wait(timeout=30)
    d = start_daemon(home)
    try:
        shown = home.mirador("memory", "show", memory_id)
        assert shown.returncode == 0 and "blue flowerpot" in json.loads(shown.stdout)["question"]
        recalled = event(ask(home, "Where is the spare key?"), "memory")["recalled"]
        assert memory_id in [m["id"] for m in recalled]
    finally:
        stop_daemon(d)


def test_a_broken_store_leaves_the_daemon_answering_without_memory(home):
    home.paths.ensure()
    (home.paths.data / "memory").write_text("not a directory")  # Chroma cannot open its store here
    d = start_daemon(home)
    try:
        assert "memory:  unavailable:" in home.mirador("status").stdout
        events = ask(home, "Say hello.")
        assert event(events, "token") and event(events, "memory") is None and events[-1]["event"] == "done"
        refused = home.mirador("memory", "list")
        assert refused.returncode == 1 and "memory is unavailable" in refused.stderr
    finally:
        stop_daemon(d)
    assert (home.paths.data / "memory").read_text() == "not a directory"  # nothing of the user's was touched
