#!/usr/bin/env python
"""Speculation, measured side by side on one private daemon (issue 13's targets):

1. typing-time prefill: the quick stage's first token of a question that injects memories,
   asked cold, typed with a hint at each pause between words (as `mirador chat` sends them) in
   1 s (the issue's target: <= 1.25x the same question --no-memory) and at 5 characters/s
   (people's pace), and the same question --no-memory (cold / no-memory was 2.6x before this);
2. background jobs vs questions: a user's first token while follow-up speculation is generating,
   against an idle daemon (targets p50 <= 1.1x, p95 <= 1.3x);
3. a scripted session with paraphrased repeats, deliberate near-misses (a different number,
   negation, name or topic: scripts/cache_pairs.py) and follow-ups: cache hits, false hits (must
   be 0), first token of hits vs misses, background tokens per saved second.

    .venv/bin/python scripts/bench_speculation.py [--rounds 8] [--pairs 16]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from benchlib import private_daemon, save, summary
from cache_pairs import NEAR_MISSES, PARAPHRASES

FACTS = [
    "My dog Biscuit is a beagle and I walk her every morning.",
    "My dog Biscuit is allergic to chicken, so I feed her fish.",
    "My dog Biscuit is afraid of thunder and fireworks.",
    "My sister Ana is a nurse in Porto and works night shifts.",
    "I am allergic to peanuts.",
    "I am training for a half marathon in May and run three times a week.",
    "I run my long runs on Sunday mornings.",
    "My running shoes are worn out after 600 km.",
]
RELATED = [  # each recalls two or three of FACTS (MiniLM cosine 0.4-0.75)
    "What should I feed my dog Biscuit?",
    "How should I plan my running week before the half marathon?",
    "Which running shoes should I buy for marathon training?",
    "What can I cook that is safe for my peanut allergy?",
]
UNRELATED = "Name three colours of the rainbow."  # asked between measurements: another prompt in the context


def first_token(events: list[dict], stage: str = "quick") -> float:
    return next(e["t"] for e in events if e["event"] == "token" and e["stage"] == stage)


def ask(client, text: str, **kw) -> list[dict]:
    kw.setdefault("stages", ["quick"])
    kw.setdefault("max_tokens", 16)
    return list(client.ask(text, **kw))


def wait_jobs(client, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(j["state"] in ("queued", "running", "waiting") for j in client.jobs()["jobs"]):
        time.sleep(0.05)


def cancel_jobs(client) -> None:
    for job in client.jobs()["jobs"]:
        if job["state"] in ("queued", "running", "waiting"):
            client.cancel_job(job["id"])
    wait_jobs(client)


def wait_cached(client, question: str, timeout: float = 30) -> None:
    """Until the answer of ``question`` is in the cache (it is stored just after the answer)."""
    deadline = time.monotonic() + timeout
    while not any(e["question"] == question for e in client.cache("list")["entries"]):
        assert time.monotonic() < deadline, f"{question!r} was never cached"
        time.sleep(0.05)


def typed_with_hints(client, text: str, typing_s: float = 1.0) -> list[dict]:
    """Type ``text`` over ``typing_s``, word by word, with a hint at each pause between words (as
    chat's Hinter sends them: one per pause of 0.15 s or more), then press Enter at once."""
    words = text.split(" ")
    for n in range(1, len(words)):
        time.sleep(typing_s / len(words))
        client.hint(" ".join(words[:n]) + " ")
    time.sleep(typing_s / len(words))
    return ask(client, text)


TYPING = {"hinted_1s": lambda q: 1.0, "hinted_5cps": lambda q: len(q) / 5.0}  # 1 s for the question; 5 characters/s


def bench_prefill(client, rounds: int) -> dict:
    times: dict[str, list[float]] = {mode: [] for mode in ("cold", *TYPING, "no_memory")}
    reused: dict[str, list[float]] = {mode: [] for mode in TYPING}
    injected = []
    for i in range(rounds):
        question = RELATED[i % len(RELATED)]
        for mode in random.sample(list(times), len(times)):  # interleaved, in a random order
            cancel_jobs(client)
            client.cache("clear")  # measured here: the prompt, not the cache
            ask(client, UNRELATED, memory=False)
            if mode in TYPING:
                events = typed_with_hints(client, question, TYPING[mode](question))
                end = next(e for e in events if e["event"] == "stage_end" and e["stage"] == "quick")
                reused[mode].append(end.get("reused_tokens", 0) / max(end.get("prompt_tokens", 1), 1))
            else:
                events = ask(client, question, memory=mode == "cold")
            recalled = next((e for e in events if e["event"] == "context"), {"memory_ids": []})["memory_ids"]
            assert mode == "no_memory" or recalled, f"{question!r} recalled no memory"
            if mode == "cold":
                injected.append(len(recalled))
            times[mode].append(first_token(events))
    cancel_jobs(client)
    p50 = {mode: statistics.median(v) for mode, v in times.items()}
    return {"first_token_s": {mode: summary(v) for mode, v in times.items()}, "samples": times,
            "ratio_to_no_memory_p50": {mode: p50[mode] / p50["no_memory"] for mode in ("cold", *TYPING)},
            "prompt_share_reused_p50": {mode: statistics.median(v) for mode, v in reused.items()},
            "memories_injected_mean": statistics.fmean(injected)}


def bench_busy(client, rounds: int) -> dict:
    """Alternately: an idle daemon, and one whose follow-up job is generating (after the writes
    of the question that started it are done, so that only the job differs)."""
    idle, busy = [], []
    question = "What is the capital of Spain?"  # incognito: never cached, nothing recalled
    for i in range(rounds):
        cancel_jobs(client)
        time.sleep(1.0)
        idle.append(first_token(ask(client, question, memory=False)))
        ask(client, f"Tell me about the history of tea, part {i}.", max_tokens=8)  # its follow-up job starts
        started = time.monotonic()
        while not any(j["kind"] == "followups" and j["progress"].startswith("answering") and j["state"] == "running"
                      for j in client.jobs()["jobs"]) or time.monotonic() - started < 1.0:
            assert time.monotonic() - started < 30, "no follow-up job started"
            time.sleep(0.02)
        busy.append(first_token(ask(client, question, memory=False)))
    cancel_jobs(client)
    return {"first_token_s": {"idle": summary(idle), "busy": summary(busy)}, "samples": {"idle": idle, "busy": busy},
            "ratio_p50": statistics.median(busy) / statistics.median(idle),
            "ratio_p95": summary(busy)["p95"] / summary(idle)["p95"]}


def bench_session(client, pairs: int) -> dict:
    """Each pair's first question, later its paraphrase; the near-misses of questions asked;
    follow-ups as people ask them, after reading (the follow-up job runs meanwhile)."""
    client.cache("clear")
    rng = random.Random(13)
    chosen = rng.sample(PARAPHRASES, min(pairs, len(PARAPHRASES)))
    misses = rng.sample(NEAR_MISSES, min(pairs, len(NEAR_MISSES)))
    hit_t, miss_t, false_hits, paraphrase_hits = [], [], [], 0
    for original, _ in chosen:
        ask(client, original)
        wait_cached(client, original)
        wait_jobs(client)  # the user reads; follow-ups are precomputed
    for (_, paraphrase) in chosen:
        events = ask(client, paraphrase)
        cached = events[0]["speculation"]["cached"]
        paraphrase_hits += cached is not None
        (hit_t if cached else miss_t).append(first_token(events))
    other_hits = []  # a near-miss served from another entry (a predicted follow-up): listed to be read
    for original, other, kind in misses:
        ask(client, original)
        wait_cached(client, original)
        events = ask(client, other)
        cached = events[0]["speculation"]["cached"]
        if cached is not None and cached["question"] == original:
            false_hits.append({"asked": other, "served": original, "kind": kind})
        elif cached is not None:
            other_hits.append({"asked": other, "served": cached["question"], "source": cached["source"]})
        else:
            miss_t.append(first_token(events))
        wait_jobs(client)
    stats = client.stats()["speculation"]
    saved = stats["saved_s"]
    return {"paraphrases": len(chosen), "paraphrase_hits": paraphrase_hits, "near_misses": len(misses),
            "false_hits": false_hits, "near_misses_served_other_entries": other_hits, "first_token_s": {"hits": summary(hit_t) if hit_t else None, "misses": summary(miss_t)},
            "background_tokens": stats["background_tokens"], "saved_s": saved,
            "background_tokens_per_saved_s": stats["background_tokens"]["spent"] / saved if saved else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--only", choices=["prefill", "busy", "session"], action="append",
                        help="run only these parts (default: all)")
    parser.add_argument("--out", default="bench-results/speculation.json")
    args = parser.parse_args()

    from mirador.client import Client

    # Measured: speed, not the rules; follow-up answers long enough to be caught generating.
    env = {"MIRADOR_JOBS__CPU_SHARE": "1.0", "MIRADOR_JOBS__DAILY_CPU_S": "0", "MIRADOR_JOBS__FOLLOWUP_MAX_TOKENS": "400"}
    parts = {"prefill": lambda c: bench_prefill(c, args.rounds), "busy": lambda c: bench_busy(c, args.rounds),
             "session": lambda c: bench_session(c, args.pairs)}
    with private_daemon(env) as (_, paths), Client(paths.endpoint, idle_timeout=180) as client:
        for fact in FACTS:
            ask(client, fact, max_tokens=8)
        cancel_jobs(client)
        result = {name: run(client) for name, run in parts.items() if not args.only or name in args.only}
    save(result, args.out)
    report(result)


def report(result: dict) -> None:
    if "prefill" in result:
        p = result["prefill"]
        ft = p["first_token_s"]
        print(f"prefill: first token p50 no memory {ft['no_memory']['p50'] * 1000:.0f} ms; with "
              f"{p['memories_injected_mean']:.1f} memories injected: cold {ft['cold']['p50'] * 1000:.0f} ms "
              f"({p['ratio_to_no_memory_p50']['cold']:.2f}x), typed in 1 s with hints {ft['hinted_1s']['p50'] * 1000:.0f} ms "
              f"({p['ratio_to_no_memory_p50']['hinted_1s']:.2f}x, target <= 1.25; "
              f"{p['prompt_share_reused_p50']['hinted_1s']:.0%} of the prompt ready), typed at 5 characters/s "
              f"{ft['hinted_5cps']['p50'] * 1000:.0f} ms ({p['ratio_to_no_memory_p50']['hinted_5cps']:.2f}x; "
              f"{p['prompt_share_reused_p50']['hinted_5cps']:.0%} ready)")
    if "busy" in result:
        b = result["busy"]
        print(f"busy: first token p50 idle {b['first_token_s']['idle']['p50'] * 1000:.0f} ms, while a job generates "
                f"{b['first_token_s']['busy']['p50'] * 1000:.0f} ms; ratio p50 {b['ratio_p50']:.2f} (<= 1.1), "
                f"p95 {b['ratio_p95']:.2f} (<= 1.3)")
    if "session" in result:
        s = result["session"]
        hits = s["first_token_s"]["hits"]
        print(f"session: {s['paraphrase_hits']}/{s['paraphrases']} paraphrases served from cache, "
                f"{len(s['false_hits'])} false hits of {s['near_misses']} near-misses; first token hits "
                f"{hits['p50'] * 1000 if hits else float('nan'):.0f} ms vs misses {s['first_token_s']['misses']['p50'] * 1000:.0f} ms; "
                f"{s['background_tokens']['spent']} background tokens for {s['saved_s']:.1f} s saved "
                f"({s['background_tokens_per_saved_s'] or float('nan'):.0f} tokens per saved second); "
                f"{len(s['near_misses_served_other_entries'])} near-misses served another entry (listed in the JSON)")


if __name__ == "__main__":
    main()
