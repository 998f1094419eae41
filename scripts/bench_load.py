#!/usr/bin/env python
"""Benchmark load: N clients asking at once, against a private daemon and the embedded model.

Each round, N clients (default 16, each its own connection, one asyncio process) send a
different short question at the same moment (``--stages quick``, incognito); R rounds. Checks
that every answer completes and that no token is lost (tokens received == the stage_end's
``tokens``), and reports first token and total time (p50/p99, as each client sees it).

The queueing model: a stage actor serves its generations one at a time, first come first served
(it has one llama.cpp context). With N questions arriving together and a service time S per
generation (prompt + all tokens, measured by the actor), the k-th one served (k = 0..N-1) waits
k·S, so its first token comes at about k·S + F (F: its own time to first token) and its answer
ends at about (k + 1)·S. Over the N clients the median first token is then about (N-1)/2·S + F
and the slowest about (N-1)·S + F. The script measures S and F on the same daemon, one client at
a time, and prints the model's prediction next to what was measured, per queue position too.

    .venv/bin/python scripts/bench_load.py [--clients 16] [--rounds 5] [--tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from benchlib import pct, private_daemon, save

TOPICS = ["rain", "snow", "wind", "fog", "hail", "thunder", "rainbows", "tides", "comets", "volcanoes",
          "glaciers", "deserts", "coral reefs", "moss", "owls", "bees", "clouds", "rivers", "caves", "eclipses",
          "lightning", "geysers", "auroras", "sand dunes", "fireflies", "icebergs", "meteors", "lakes", "whales",
          "ferns", "crystals", "monsoons"]


async def ask_one(endpoint: str, question: str, tokens: int) -> dict:
    from mirador.client import AsyncClient

    first = None
    received = 0
    async with AsyncClient(endpoint, idle_timeout=300) as client:
        async for event in client.ask(question, stages=["quick"], max_tokens=tokens, memory=False):
            if event["event"] == "token":
                received += 1
                first = first if first is not None else event["t"]
            elif event["event"] == "stage_end":
                end = event
            elif event["event"] == "error":
                raise RuntimeError(f"{question!r}: {event['message']}")
            elif event["event"] == "done":
                total = event["t"]
    return {"first_token_s": first, "total_s": total, "received": received, "tokens": end["tokens"],
            "queued_s": end["queued_s"], "service_s": end["duration_s"] - end["queued_s"],
            "own_first_token_s": end["first_token_s"] - end["queued_s"]}


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": statistics.median(values), "p99": pct(values, 0.99), "mean": statistics.fmean(values),
            "max": max(values)}


async def measure(endpoint: str, clients: int, rounds: int, tokens: int) -> tuple[list[dict], list[dict]]:
    questions = [f"In two sentences, what are {TOPICS[i % len(TOPICS)]}?" for i in range(clients)]
    for q in questions[:3]:  # warm: model, prompt cache, sockets
        await ask_one(endpoint, q, tokens)
    alone = [await ask_one(endpoint, questions[i % clients], tokens) for i in range(10)]
    loaded = []
    for r in range(rounds):
        # Rotate which question each position asks, so no question is always first.
        batch = [questions[(i + r) % clients] for i in range(clients)]
        results = await asyncio.gather(*(ask_one(endpoint, q, tokens) for q in batch))
        for rank, result in enumerate(sorted(results, key=lambda x: x["queued_s"])):
            loaded.append({**result, "round": r, "rank": rank})
    return alone, loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--out", default="bench-results/load.json")
    args = parser.parse_args()

    # Memory off: this measures the stages under load, not Chroma's writes.
    with private_daemon({"MIRADOR_MEMORY__ENABLED": "false"}) as (env, paths):
        started = time.perf_counter()
        alone, loaded = asyncio.run(measure(paths.endpoint, args.clients, args.rounds, args.tokens))
        wall = time.perf_counter() - started

    n = args.clients
    lost = [r for r in alone + loaded if r["received"] != r["tokens"]]
    service = statistics.fmean(r["service_s"] for r in loaded)  # S, under load, as the actor measured it
    own_first = statistics.fmean(r["own_first_token_s"] for r in loaded)  # F
    first = [r["first_token_s"] for r in loaded]
    total = [r["total_s"] for r in loaded]
    by_rank = {k: [r for r in loaded if r["rank"] == k] for k in range(n)}
    # The model, per answer and without averaging: one at a time, in order, no idle gaps, so the
    # k-th served waited exactly as long as the k before it took (up to the few ms between the
    # clients' sends).
    gaps = []
    for r in range(args.rounds):
        served = sorted((x for x in loaded if x["round"] == r), key=lambda x: x["rank"])
        gaps += [abs(x["queued_s"] - sum(y["service_s"] for y in served[:x["rank"]])) for x in served]
    result = {
        "machine": {"cpus": os.cpu_count(), "clients": n, "rounds": args.rounds, "tokens": args.tokens},
        "completed": len(loaded), "expected": n * args.rounds, "lost_tokens": len(lost),
        "tokens_per_answer": statistics.fmean(r["tokens"] for r in loaded),
        "alone_first_token_s": summary([r["first_token_s"] for r in alone]),
        "alone_total_s": summary([r["total_s"] for r in alone]),
        "alone_service_s": summary([r["service_s"] for r in alone]),
        "loaded_first_token_s": summary(first),
        "loaded_total_s": summary(total),
        "loaded_service_s": summary([r["service_s"] for r in loaded]),
        "model": {"S": service, "F": own_first,
                  "first_token_p50_s": (n - 1) / 2 * service + own_first,
                  "first_token_max_s": (n - 1) * service + own_first,
                  "total_p50_s": (n + 1) / 2 * service, "total_max_s": n * service},
        "fifo_gap_s": summary(gaps),
        "by_rank": [{"rank": k, "first_token_s": statistics.fmean(r["first_token_s"] for r in rs),
                     "model_first_token_s": k * service + own_first,
                     "queued_s": statistics.fmean(r["queued_s"] for r in rs)} for k, rs in by_rank.items()],
        "wall_s": wall,
        "samples": loaded,
    }

    print(f"\n{n} clients at once x {args.rounds} rounds, --stages quick, {args.tokens} tokens, {os.cpu_count()} CPUs")
    print(f"completed {result['completed']}/{result['expected']}; answers with lost tokens: {len(lost)}; "
          f"{result['tokens_per_answer']:.1f} tokens per answer on average\n")
    m = result["model"]
    print(f"| {'measure':<38} | {'p50':>7} | {'p99':>7} | {'model':>7} |")
    print(f"|{'-' * 40}|{'-' * 9}|{'-' * 9}|{'-' * 9}|")
    rows = [("one client alone, first token", result["alone_first_token_s"], None, None),
            ("one client alone, whole answer", result["alone_total_s"], None, None),
            (f"{n} at once, first token", result["loaded_first_token_s"], m["first_token_p50_s"], m["first_token_max_s"]),
            (f"{n} at once, whole answer", result["loaded_total_s"], m["total_p50_s"], m["total_max_s"])]
    for label, s, model50, model_max in rows:
        model = f"{model50:6.2f}s" if model50 is not None else "       "
        print(f"| {label:<38} | {s['p50']:6.2f}s | {s['p99']:6.2f}s | {model} |"
              + (f" max: measured {s['max']:.2f} s, model {model_max:.2f} s" if model_max is not None else ""))
    print(f"\nservice time per generation S = {service:.3f} s under load "
          f"(alone: {result['alone_service_s']['p50']:.3f} s), own first token F = {own_first:.3f} s")
    print(f"FIFO check: |wait - sum of the service times of those served before| p50 "
          f"{result['fifo_gap_s']['p50'] * 1000:.0f} ms, max {result['fifo_gap_s']['max'] * 1000:.0f} ms")
    print("queue position k: measured mean first token vs k*S + F")
    for row in result["by_rank"]:
        print(f"  k={row['rank']:>2}  {row['first_token_s']:6.2f} s   model {row['model_first_token_s']:6.2f} s"
              f"   (waited for the model {row['queued_s']:.2f} s)")
    save(result, args.out)


if __name__ == "__main__":
    main()
