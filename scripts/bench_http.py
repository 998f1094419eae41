#!/usr/bin/env python
"""Benchmark the HTTP API against the ZeroMQ client: what does HTTP cost a streamed answer?

In one run, one warm daemon, same question, one stage (quick), incognito, runs interleaved
(ZeroMQ, HTTP, ZeroMQ, ...):
  (a) through the ZeroMQ client (mirador.client.Client): first token and streamed tokens/s;
  (b) through POST /api/chat (NDJSON stream, model mirador:quick) on one kept-alive httpx
      connection, as an Ollama client sees it;
  (b') the same request from the standard library's http.client, which costs less than httpx;
  (c) the HTTP overhead on the first token, per pair of runs: (b) - (a) measured at the client,
      and the same with each side's own model time taken out (client first token minus the
      stage's own first_token_s), which removes the model's run-to-run noise.
Targets (issue 11): overhead p50 <= 5 ms, p95 <= 15 ms; streamed tokens/s HTTP / ZeroMQ >= 0.97.
Prints a table and writes JSON (default bench-results/http.json).

    .venv/bin/python scripts/bench_http.py [--runs 30] [--tokens 64]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import time

import httpx

from benchlib import private_daemon, save, summary

QUESTION = "Explain in a few sentences why the sky is blue."


def zmq_run(client, tokens: int) -> tuple[float, float, int, float]:
    times, actor_first = [], None
    for event in client.ask(QUESTION, stages=["quick"], max_tokens=tokens, memory=False):
        if event["event"] == "token":
            times.append(event["t"])
        elif event["event"] == "stage_end":
            actor_first = event["first_token_s"]
    return times[0], (len(times) - 1) / (times[-1] - times[0]), len(times), actor_first


def http_run(http: httpx.Client, url: str, tokens: int) -> tuple[float, float, int, float]:
    body = {"model": "mirador:quick", "messages": [{"role": "user", "content": QUESTION}],
            "options": {"num_predict": tokens, "incognito": True}}
    times, actor_first = [], None
    t0 = time.perf_counter()
    with http.stream("POST", f"{url}/api/chat", json=body) as response:
        for line in response.iter_lines():
            if not line:
                continue
            event = json.loads(line)["mirador"]
            if event["event"] == "token":
                times.append(time.perf_counter() - t0)
            elif event["event"] == "stage_end":
                actor_first = event["first_token_s"]
    return times[0], (len(times) - 1) / (times[-1] - times[0]), len(times), actor_first


def raw_http_run(conn: http.client.HTTPConnection, tokens: int) -> tuple[float, float, int, float]:
    """The same request from the standard library's http.client: what the server costs, less
    most of the client library's own time (httpx's is part of (b), as an Ollama client pays it)."""
    body = json.dumps({"model": "mirador:quick", "messages": [{"role": "user", "content": QUESTION}],
                       "options": {"num_predict": tokens, "incognito": True}})
    times, actor_first = [], None
    t0 = time.perf_counter()
    conn.request("POST", "/api/chat", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    while line := response.readline():
        if b'"event": "token"' in line:
            times.append(time.perf_counter() - t0)
        elif b'"event": "stage_end"' in line:
            actor_first = json.loads(line)["mirador"]["first_token_s"]
    return times[0], (len(times) - 1) / (times[-1] - times[0]), len(times), actor_first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", default="bench-results/http.json")
    args = parser.parse_args()

    from mirador.client import Client

    with private_daemon({"MIRADOR_MEMORY__ENABLED": "false"}) as (env, paths):
        zmq, over_http, bare = [], [], []
        with Client(paths.endpoint) as client, httpx.Client(timeout=120) as web:
            url = client.status()["http"]
            conn = http.client.HTTPConnection(url.split("//")[1], timeout=120)
            for i in range(args.runs + 3):  # the first 3 rounds warm caches and are dropped
                z = zmq_run(client, args.tokens)
                h = http_run(web, url, args.tokens)
                b = raw_http_run(conn, args.tokens)
                if i >= 3:
                    zmq.append(z), over_http.append(h), bare.append(b)
    overhead = [(h[0] - z[0]) * 1000 for h, z in zip(over_http, zmq)]
    transport = [((h[0] - h[3]) - (z[0] - z[3])) * 1000 for h, z in zip(over_http, zmq)]
    result = {
        "machine": {"cpus": os.cpu_count(), "tokens": args.tokens, "runs": args.runs},
        "zmq_first_token_ms": summary([z[0] * 1000 for z in zmq]),
        "http_first_token_ms": summary([h[0] * 1000 for h in over_http]),
        "overhead_first_token_ms": summary(overhead),
        "overhead_net_of_model_ms": summary(transport),
        "http_client_first_token_ms": summary([b[0] * 1000 for b in bare]),
        "overhead_http_client_net_of_model_ms": summary([((b[0] - b[3]) - (z[0] - z[3])) * 1000 for b, z in zip(bare, zmq)]),
        "zmq_tokens_per_s": summary([z[1] for z in zmq]),
        "http_tokens_per_s": summary([h[1] for h in over_http]),
    }
    result["tokens_per_s_ratio"] = result["http_tokens_per_s"]["p50"] / result["zmq_tokens_per_s"]["p50"]
    rows = [
        ("(a) ZeroMQ client, first token", "zmq_first_token_ms", "ms"),
        ("(b) HTTP /api/chat, first token", "http_first_token_ms", "ms"),
        ("(c) HTTP overhead on first token (b-a)", "overhead_first_token_ms", "ms"),
        ("    the same, each side's model time taken out", "overhead_net_of_model_ms", "ms"),
        ("(b') the same from http.client (stdlib), first token", "http_client_first_token_ms", "ms"),
        ("     its overhead, model time taken out", "overhead_http_client_net_of_model_ms", "ms"),
        ("(a) ZeroMQ client, streamed", "zmq_tokens_per_s", "tok/s"),
        ("(b) HTTP /api/chat, streamed", "http_tokens_per_s", "tok/s"),
    ]
    print(f"\n{os.cpu_count()} CPUs, {args.tokens} tokens, {args.runs} interleaved runs\n")
    print(f"| {'measure':<53} | {'p50':>8} | {'p95':>8} | unit  |")
    print(f"|{'-' * 55}|{'-' * 10}|{'-' * 10}|-------|")
    for label, key, unit in rows:
        print(f"| {label:<53} | {result[key]['p50']:8.1f} | {result[key]['p95']:8.1f} | {unit:<5} |")
    print(f"\nstreamed tokens/s, HTTP / ZeroMQ (p50): {result['tokens_per_s_ratio']:.3f}")
    save(result, args.out)


if __name__ == "__main__":
    main()
