#!/usr/bin/env python
"""Benchmark control under load: how fast cancel, status and refusals are answered while many
questions wait for the quick stage's model.

One client holds the quick model with a long answer; N more questions (default 100, from
N/16 connections; short, incognito, ``--stages quick``) queue behind it. Then, R times each:
``status`` (it asks every stage actor's ``info``), an ask beyond the limit (its ``busy``
refusal), and a cancel of the last question in line (until its ``done``; a new question then
takes its place). Last, a cancel of the
long answer (until its ``done``: the model stops at its next token). Before the load, the first
token of a question alone, for comparison with scripts/bench_spine.py.

    .venv/bin/python scripts/bench_control.py [--waiting 100] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchlib import private_daemon, save, summary

COUNTING = "Count from 1 to 1000, separated by commas."


def main() -> None:
    import zmq

    from mirador.client import Client, protocol

    parser = argparse.ArgumentParser()
    parser.add_argument("--waiting", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default="bench-results/control.json")
    args = parser.parse_args()
    limits = {"MIRADOR_DAEMON__MAX_WAITING": str(args.waiting), "MIRADOR_DAEMON__MAX_WAITING_PER_CLIENT": "16",
              "MIRADOR_MEMORY__ENABLED": "false"}

    def connect(endpoint: str) -> zmq.Socket:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(endpoint)
        return sock

    def until(sock: zmq.Socket, rid: str, event: str) -> dict:
        while True:
            assert sock.poll(120_000), "no reply for 120 s"
            reply = protocol.decode_event(sock.recv())
            if reply["id"] == rid and reply["event"] == event:
                return reply

    with private_daemon(limits) as (_, paths):
        endpoint = paths.endpoint
        alone = []
        with Client(endpoint, idle_timeout=60) as client:
            for i in range(10):
                for event in client.ask(f"What is thing {i}?", stages=["quick"], max_tokens=4, memory=False):
                    if event["event"] == "token":
                        alone.append(event["t"])
                        break
                time.sleep(0.3)  # let the rest of the answer finish
        holder = connect(endpoint)
        holder.send(protocol.request("ask", "long", text=COUNTING, stages=["quick"], options={"max_tokens": 2000}, memory=False))
        until(holder, "long", "token")
        socks = [connect(endpoint) for _ in range(-(-args.waiting // 16))]
        for n in range(args.waiting):
            socks[n // 16].send(protocol.request("ask", f"q{n}", text=f"What is thing {n}?", stages=["quick"],
                                                 options={"max_tokens": 1}, memory=False))
        for n in range(args.waiting):
            until(socks[n // 16], f"q{n}", "start")
        status_s, busy_s, cancel_s = [], [], []
        extra = connect(endpoint)
        last = (socks[-1], f"q{args.waiting - 1}")
        with Client(endpoint, idle_timeout=60) as client:
            for r in range(args.repeat):
                started = time.perf_counter()
                status = client.status()
                status_s.append(time.perf_counter() - started)
                quick = next(a for a in status["actors"] if a["stage"] == "quick")
                print(f"status with {quick['waiting']} waiting in the quick actor: {status_s[-1] * 1000:.1f} ms")
                started = time.perf_counter()
                extra.send(protocol.request("ask", f"x{r}", text="One more?", stages=["quick"], memory=False))
                refused = until(extra, f"x{r}", "error")
                busy_s.append(time.perf_counter() - started)
                assert refused["code"] == "busy", refused
                sock, rid = last
                started = time.perf_counter()
                sock.send(protocol.request("cancel", f"c{r}", target=rid))
                done = until(sock, rid, "done")
                cancel_s.append(time.perf_counter() - started)
                assert done["cancelled"] is True
                # Fill the place it left: the new question is now the last in line.
                extra.send(protocol.request("ask", f"y{r}", text="Again?", stages=["quick"], memory=False))
                until(extra, f"y{r}", "start")
                last = (extra, f"y{r}")
            started = time.perf_counter()
            holder.send(protocol.request("cancel", "c-long", target="long"))
            done = until(holder, "long", "done")
            running_cancel_s = time.perf_counter() - started
        for sock in [holder, extra, *socks]:
            sock.close(linger=0)
    result = {"waiting": args.waiting, "first_token_alone_s": summary(alone), "status_s": summary(status_s),
              "busy_refusal_s": summary(busy_s), "cancel_waiting_to_done_s": summary(cancel_s),
              "cancel_running_to_done_s": running_cancel_s}
    for key, value in result.items():
        print(f"{key:28} {value}")
    print(f"median status {statistics.median(status_s) * 1000:.1f} ms, busy {statistics.median(busy_s) * 1000:.1f} ms, "
          f"cancel of a waiting question {statistics.median(cancel_s) * 1000:.1f} ms, of the running one "
          f"{running_cancel_s * 1000:.1f} ms")
    save(result, args.out)


if __name__ == "__main__":
    main()
