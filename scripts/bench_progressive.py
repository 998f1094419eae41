#!/usr/bin/env python
"""Benchmark progressive stages against quick alone and against running the stages in sequence.

One run, same machine, same complex question (the router sends it to quick, deep, synthesis),
warm daemons, N rounds each of:
  quick alone                       (--stages quick)
  progressive, deep after quick's first token   (the default plan)
  sequential                        (--sequential)
and, on a second daemon whose deep stage starts at once, the progressive plan again: this is
the measurement behind `after_first_token_of = "quick"` in config/mirador.toml.
Reports the first token (quick's) and the total time, p50/p95, and their ratios.

    .venv/bin/python scripts/bench_progressive.py [--runs 10] [--tokens 96]
"""

from __future__ import annotations

import argparse

from benchlib import private_daemon, save, summary

QUESTION = ("Compare PostgreSQL and MongoDB for a distributed architecture: what are the trade-offs "
            "in latency and scalability, and which should a small team pick?")


def run(client, tokens: int, **kwargs) -> tuple[float, float]:
    first = None
    for event in client.ask(QUESTION, max_tokens=tokens, memory=False, **kwargs):  # the plans alone
        if event["event"] == "token" and first is None:
            first = event["t"]
        last = event["t"]
    return first, last


def measure(paths, runs: int, tokens: int, variants: dict[str, dict]) -> dict[str, dict]:
    from mirador.client import Client

    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    with Client(paths.endpoint) as client:
        for i in range(runs + 1):  # the first round warms every stage's prompt cache and is dropped
            for name, kwargs in variants.items():
                result = run(client, tokens, **kwargs)
                if i:
                    samples[name].append(result)
    return {name: {"first_token_ms": summary([f * 1000 for f, _ in s]), "total_s": summary([t for _, t in s])}
            for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=96, help="max tokens per stage")
    parser.add_argument("--out", default="bench-results/progressive.json")
    args = parser.parse_args()

    with private_daemon() as (_, paths):
        result = measure(paths, args.runs, args.tokens, {
            "quick alone": {"stages": ["quick"]},
            "progressive (deep after quick's first token)": {},
            "sequential": {"sequential": True},
        })
    with private_daemon({"MIRADOR_STAGES__DEEP__AFTER_FIRST_TOKEN_OF": ""}) as (_, paths):
        result |= measure(paths, args.runs, args.tokens, {
            "quick alone, second daemon": {"stages": ["quick"]},
            "progressive (deep at once)": {},
        })

    print(f"\n3 stages, up to {args.tokens} tokens each, {args.runs} rounds\n")
    print(f"| {'plan':<46} | {'first token p50':>15} | {'p95':>8} | {'total p50':>9} | {'p95':>7} |")
    print(f"|{'-' * 48}|{'-' * 17}|{'-' * 10}|{'-' * 11}|{'-' * 9}|")
    for name, r in result.items():
        f, t = r["first_token_ms"], r["total_s"]
        print(f"| {name:<46} | {f['p50']:12.1f} ms | {f['p95']:5.1f} ms | {t['p50']:7.2f} s | {t['p95']:5.2f} s |")

    def ratio(a: str, b: str, key: str) -> float:
        return result[a][key]["p50"] / result[b][key]["p50"]

    ratios = {
        "progressive / quick alone, first token": ratio("progressive (deep after quick's first token)", "quick alone", "first_token_ms"),
        "deep at once / quick alone, first token": ratio("progressive (deep at once)", "quick alone, second daemon", "first_token_ms"),
        "progressive / sequential, first token": ratio("progressive (deep after quick's first token)", "sequential", "first_token_ms"),
        "progressive / sequential, total time": ratio("progressive (deep after quick's first token)", "sequential", "total_s"),
    }
    print()
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    save({"runs": args.runs, "tokens": args.tokens, "results": result, "ratios": ratios}, args.out)


if __name__ == "__main__":
    main()
