"""The spine end to end: a real miradord process (real Ray, llama.cpp with SmolLM2, ZeroMQ)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time

import msgpack
import pytest
import zmq

from mirador.client import AsyncClient
from mirador.client import protocol

from .conftest import BIN, done_event

LONG = "Write a long, detailed essay about the history of astronomy, from ancient times to today."


def collect(client, text, **kwargs):
    return list(client.ask(text, **kwargs))


def assert_models_become_idle(daemon, within_s: float, why: str) -> None:
    with daemon.home.client() as client:
        deadline = time.monotonic() + within_s
        while any(a["busy"] for a in client.status()["actors"]):
            assert time.monotonic() < deadline, why
            time.sleep(0.1)


def test_ask_streams_tokens_with_stage_model_confidence(daemon):
    with daemon.home.client(idle_timeout=60) as client:
        events = collect(client, "Tell me about the ocean.", max_tokens=40)
    assert events[0]["route"] == "simple" and events[0]["stages"] == ["quick"]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-2:] == ["done", "remembered"]
    assert kinds.index("stage_start") < kinds.index("token") < kinds.index("stage_end")
    assert events[-1]["final"] is True and not any(e["final"] for e in events[:-1])
    assert events[-1]["memory_id"] == events[0]["query_id"]  # stored, then acknowledged
    tokens = [e for e in events if e["event"] == "token"]
    assert len(tokens) >= 20
    for tok in tokens:
        assert tok["stage"] == "quick" and tok["model"] == "smollm2-135m"
        assert 0.0 <= tok["confidence"] <= 1.0
        assert tok["logprob"] <= 0.0  # a real log-probability from the model
        assert tok["t"] > 0
    # The confidence comes from the model, token by token, not a constant per stage.
    assert len({round(t["confidence"], 3) for t in tokens}) > 5
    # Timestamps grow: tokens arrive while they are generated, not in one batch at the end.
    assert tokens[-1]["t"] - tokens[0]["t"] > 0.05
    end = next(e for e in events if e["event"] == "stage_end")
    assert end["tokens"] == len(tokens) and end["first_token_s"] > 0
    assert done_event(events)["metrics"]["stages"]["quick"]["tokens"] == len(tokens)
    assert events[0]["query_id"] == done_event(events)["query_id"]


def test_cli_json_prints_ndjson_events(daemon):
    result = daemon.home.mirador("ask", "--json", "--stages", "quick", "--max-tokens", "24", "What is a star?")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in events][:3] == ["start", "memory", "stage_start"]
    assert events[0]["stages"] == ["quick"] and events[0]["route"] == "requested"
    assert events[-1]["event"] == "remembered" and done_event(events)
    tokens = [e for e in events if e["event"] == "token"]
    assert 1 <= len(tokens) <= 24
    assert all({"stage", "model", "text", "confidence", "t"} <= e.keys() for e in tokens)


def test_cli_renders_header_and_plain_text_when_not_a_tty(daemon):
    result = daemon.home.mirador("ask", "--max-tokens", "16", "Name a colour.")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("── quick · smollm2-135m ──\n")
    assert "\x1b[" not in result.stdout  # no colour codes when stdout is not a terminal
    assert len(result.stdout.splitlines()[1]) > 0
    assert "quick: " in result.stderr and "tokens" in result.stderr


def test_cancel_stops_generation(daemon):
    with daemon.home.client(idle_timeout=60) as client:
        events = client.ask(LONG, max_tokens=1500)
        seen = []
        for event in events:
            seen.append(event)
            if sum(e["event"] == "token" for e in seen) == 5:
                break
        ack = client.cancel(seen[0]["id"])
        assert ack["event"] == "ack" and ack["found"] is True
        rest = list(events)
        done = rest[-1]
        assert done["event"] == "done" and done["cancelled"] is True
        end = next(e for e in rest if e["event"] == "stage_end")
        assert end["cancelled"] is True and end["tokens"] < 200
        # The model is free again: the stage actor reports no generation in progress.
        status = client.status()
        assert not any(a["busy"] for a in status["actors"])


def test_ctrl_c_in_cli_cancels_on_the_daemon(daemon):
    proc = subprocess.Popen([str(BIN / "mirador"), "ask", "--max-tokens", "1500", LONG], env=daemon.home.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("──")  # the stage header: the answer is streaming
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert "cancelled" in proc.stderr.read()
    assert_models_become_idle(daemon, within_s=5, why="generation went on after Ctrl-C")


def test_client_that_vanishes_mid_stream_frees_the_model(daemon):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(daemon.home.paths.endpoint)
    sock.send(protocol.request("ask", "gone-1", text=LONG, options={"max_tokens": 1500}))
    while protocol.decode_event(sock.recv())["event"] != "token":
        pass
    sock.close(linger=0)  # the client dies without a word
    assert_models_become_idle(daemon, within_s=10, why="the daemon kept generating for a client that is gone")


def test_status_lists_actors(daemon):
    with daemon.home.client() as client:
        status = client.status()
    assert status["event"] == "status" and status["ready"] is True
    assert status["pid"] == daemon.proc.pid and status["uptime_s"] >= 0
    assert status["ray_address"] and status["ray_started_here"] is True
    assert [a["name"] for a in status["actors"]] == ["stage:quick", "stage:deep", "stage:synthesis"]
    for actor in status["actors"]:
        assert actor["model"] == "smollm2-135m" and actor["backend"] == "llamacpp"
        assert actor["loaded"] is True and actor["node_id"] and actor["pid"]
    assert len({a["pid"] for a in status["actors"]}) == 3  # one process per stage: they can run at once
    text = daemon.home.mirador("status")
    assert text.returncode == 0 and "stage:deep" in text.stdout and "loaded" in text.stdout


def test_two_clients_at_once_both_complete(daemon):
    async def both():
        async def one(question):
            async with AsyncClient(daemon.home.paths.endpoint, idle_timeout=60) as client:
                return [e async for e in client.ask(question, max_tokens=24)]

        return await asyncio.gather(one("What is rain?"), one("What is snow?"))

    first, second = asyncio.run(both())
    for events in (first, second):
        assert not done_event(events)["cancelled"]
        assert sum(e["event"] == "token" for e in events) > 0
    assert first[0]["query_id"] != second[0]["query_id"]


def raw_exchange(daemon, *frames: bytes) -> dict:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(daemon.home.paths.endpoint)
    try:
        sock.send_multipart(list(frames))
        assert sock.poll(10_000), "no reply to a bad frame"
        return msgpack.unpackb(sock.recv(), raw=False)
    finally:
        sock.close(linger=0)


@pytest.mark.parametrize(
    "frames, code",
    [
        ((b"\xc1\xff garbage",), "bad_frame"),
        ((msgpack.packb([1, 2, 3]),), "bad_frame"),
        ((protocol.request("ping", "a"), b"extra"), "bad_frame"),
        ((msgpack.packb({"v": 99, "id": "x", "type": "ping"}),), "bad_version"),
        ((msgpack.packb({"v": 1, "type": "ping"}),), "bad_request"),
        ((protocol.request("ask", "x"),), "bad_request"),
        ((protocol.request("ask", "x", text="hi", options={"max_tokens": "lots"}),), "bad_request"),
        ((protocol.request("launch", "x"),), "unknown_type"),
        ((protocol.request("ask", "x", text="hi", stages=["nope"]),), "unknown_stage"),
        ((protocol.request("ask", "x", text="y" * (protocol.MAX_FRAME_BYTES + 10)),), "too_large"),
    ],
)
def test_bad_frames_get_errors_and_daemon_keeps_serving(daemon, frames, code):
    reply = raw_exchange(daemon, *frames)
    assert reply["event"] == "error" and reply["final"] is True
    assert reply["code"] == code and reply["message"]
    with daemon.home.client(idle_timeout=60) as client:
        events = collect(client, "Say hi.", max_tokens=4)
    assert done_event(events) and any(e["event"] == "token" for e in events)


def test_failed_generation_is_reported_and_the_stage_survives(daemon):
    huge = "word " * 3000  # more tokens than the model's 2048-token context
    with daemon.home.client(idle_timeout=60) as client:
        events = collect(client, huge)
        error = next(e for e in events if e["event"] == "error")
        assert error["stage"] == "quick" and error["code"] == "model_error" and "context window" in error["message"]
        assert done_event(events)
        again = collect(client, "Say hi.", max_tokens=4)
    assert any(e["event"] == "token" for e in again)


def test_client_import_stays_thin():
    code = (
        "import sys, mirador.client, mirador.client.cli;"
        "heavy = [m for m in ('ray', 'chromadb', 'llama_cpp') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
