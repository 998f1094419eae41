"""The Python API on a real daemon: concurrent requests on one AsyncClient, the exception tree,
replies nobody reads dropped, and `memory import` in batches, all or nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time

import pytest

from mirador.client import (AsyncClient, BadRequest, MiradorError, NotFound, ResponseError, Unavailable)

from .conftest import BIN, done_event


def test_many_asks_at_once_on_one_async_client_each_get_their_own_events(daemon):
    questions = [f"Name a fruit that starts with the letter {letter}." for letter in "ABCDEFGH"]

    async def main():
        async with AsyncClient(daemon.home.paths.endpoint, idle_timeout=240) as client:
            async def one(question, memory):
                return [e async for e in client.ask(question, stages=["quick"], max_tokens=8, memory=memory)]

            async def controls():  # control requests interleaved with the answers on the same socket
                replies = []
                for _ in range(6):
                    replies += [await client.ping(timeout=30), await client.status(timeout=60)]
                    await asyncio.sleep(0.2)
                return replies

            results = await asyncio.gather(*(one(q, i % 2 == 0) for i, q in enumerate(questions)), controls())
            return results[:-1], results[-1], dict(client._open)

    asks, controls, still_open = asyncio.run(main())
    assert [r["event"] for r in controls] == ["pong", "status"] * 6
    ids = set()
    for i, events in enumerate(asks):
        (rid,) = {e["id"] for e in events}  # every event of an ask carries that ask's request id
        ids.add(rid)
        assert events[0]["event"] == "start" and events[0]["stages"] == ["quick"]
        assert any(e["event"] == "token" for e in events)
        assert done_event(events)["query_id"] == events[0]["query_id"]
        assert events[-1]["event"] == ("remembered" if i % 2 == 0 else "done") and events[-1]["final"]
    assert len(ids) == len(questions)
    assert still_open == {}  # nothing kept for finished requests


def test_error_replies_raise_the_right_subclass(daemon):
    with daemon.home.client(idle_timeout=60) as client:
        with pytest.raises(NotFound) as unknown_stage:
            list(client.ask("hi", stages=["nope"]))
        assert unknown_stage.value.code == "unknown_stage" and "configured stages: quick" in unknown_stage.value.message
        with pytest.raises(NotFound, match="no model 'ghost' in the manifest") as unknown_model:
            client.models("load", "ghost")
        assert unknown_model.value.code == "unknown_model"
        with pytest.raises(NotFound) as no_memory:
            client.memory("show", target="no-such-memory")
        assert no_memory.value.code == "not_found"
        with pytest.raises(BadRequest) as bad:
            client.memory("import", records=[{"id": "x", "question": "q", "answer": "a", "ts": "yesterday"}])
        assert bad.value.code == "bad_request" and "'ts' must be a number" in str(bad.value)
        assert client.ping()["event"] == "pong"  # the connection still serves

    async def main():
        async with AsyncClient(daemon.home.paths.endpoint, idle_timeout=60) as client:
            with pytest.raises(BadRequest) as bad:
                async for _ in client.ask("hi", max_tokens="lots"):  # type: ignore[arg-type]
                    pass
            with pytest.raises(ResponseError) as unknown_chain:
                async for _ in client.ask("hi", chain="nope"):
                    pass
            return bad.value, unknown_chain.value

    bad, unknown_chain = asyncio.run(main())
    assert bad.code == "bad_request" and "max_tokens" in bad.message
    assert isinstance(unknown_chain, NotFound) and unknown_chain.code == "unknown_chain"
    assert issubclass(Unavailable, ResponseError) and issubclass(ResponseError, MiradorError)


def test_abandoned_streams_leave_nothing_behind(daemon):
    with daemon.home.client(idle_timeout=60) as client:
        first = client.ask("Write a long story about a lighthouse.", stages=["quick"], max_tokens=400, memory=False)
        second = client.ask("Say hello.", stages=["quick"], max_tokens=8)
        while next(first)["event"] != "token":
            pass
        assert next(second)["event"] == "start"  # two streams read in turn on one client
        first.close()  # abandoned mid-answer: cancelled, its later replies dropped
        rest = list(second)
        assert rest[-1]["event"] == "remembered"
        left_at_done = client.ask("Say hi.", stages=["quick"], max_tokens=4)
        for event in left_at_done:
            if event["event"] == "done":
                break  # `remembered` is still to come: nobody will read it
        left_at_done.close()
        for _ in range(5):
            assert client.ping()["event"] == "pong"
        time.sleep(1)
        assert client.ping()["event"] == "pong"
        assert client._open == {}  # the dropped replies were not stashed anywhere


def _export(daemon) -> dict[str, dict]:
    listed = daemon.home.mirador("memory", "list", "--limit", "0", "--json")
    assert listed.returncode == 0, listed.stderr
    return {r["id"]: r for r in json.loads(listed.stdout)}


def _memories(n: int, prefix: str, pad: int = 0) -> list[dict]:
    return [{"id": f"{prefix}-{i}", "question": f"Imported question {prefix} number {i}?",
             "answer": f"Imported answer {i}." + " padding" * pad, "route": "simple", "session": "", "ts": 1_700_000_000 + i}
            for i in range(n)]


def _write(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_import_goes_in_batches_with_progress_and_skips_what_is_there(daemon, tmp_path):
    before = _export(daemon)
    records = _memories(230, "batch")
    _write(tmp_path / "m.jsonl", records)
    result = daemon.home.mirador("memory", "import", str(tmp_path / "m.jsonl"))
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if line.startswith("importing")]
    assert progress == [f"importing {tmp_path / 'm.jsonl'}: {n} of 230 memories" for n in (100, 200, 230)]
    assert "imported 230 memories" in result.stdout
    after = _export(daemon)
    assert set(before) <= set(after) and {r["id"] for r in records} <= set(after)
    assert after["batch-7"]["question"] == records[7]["question"] and after["batch-7"]["ts"] == records[7]["ts"]

    # Again, with one changed memory and one new: what is stored is kept, the new one is added.
    changed = [{**records[0], "answer": "changed"}, *_memories(1, "later")]
    _write(tmp_path / "again.jsonl", changed)
    again = daemon.home.mirador("memory", "import", str(tmp_path / "again.jsonl"))
    assert again.returncode == 0 and "imported 1 memories (1 already there" in again.stdout
    assert _export(daemon)["batch-0"]["answer"] == records[0]["answer"]


def test_a_bad_line_imports_nothing(daemon, tmp_path):
    before = _export(daemon)
    records = _memories(150, "badline")
    lines = [json.dumps(r) for r in records]
    lines[120] = json.dumps({**records[120], "ts": "last tuesday"})  # in the second batch
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    refused = daemon.home.mirador("memory", "import", str(tmp_path / "bad.jsonl"))
    assert refused.returncode == 2 and "bad.jsonl:121: 'ts' must be a number" in refused.stderr
    assert "nothing was imported" in refused.stderr
    after = _export(daemon)
    assert set(before) <= set(after) and not [i for i in after if i.startswith("badline")]


def test_a_failure_mid_file_removes_what_the_file_added(daemon, tmp_path):
    """The memory store's process is killed while the import runs (Ray restarts it): the batch
    in flight fails, and the batches already written are removed again."""
    before = _export(daemon)
    _write(tmp_path / "big.jsonl", _memories(1500, "midfile", pad=20))
    with daemon.home.client() as client:
        store_pid = client.status()["memory"]["pid"]
    proc = subprocess.Popen([str(BIN / "mirador"), "memory", "import", str(tmp_path / "big.jsonl")], env=daemon.home.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()
    assert first.startswith("importing") and " 100 of 1500 " in first, first
    os.kill(store_pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, (out, err)
    assert "the import failed after" in err and "were removed again: nothing was imported" in err, err
    after = _export(daemon)
    assert set(before) <= set(after) and not [i for i in after if i.startswith("midfile")]
    with daemon.home.client() as client:  # the restarted store serves the next exchange
        events = list(client.ask("Say hello.", stages=["quick"], max_tokens=4))
    assert events[-1]["event"] == "remembered"
