#!/usr/bin/env python
"""Benchmark memory: embedding throughput, store size, recall latency at 10,000 memories, and
what recall adds to the first token through the daemon.

  1. embed N synthetic exchanges in batches (docs/s) and store them (MemoryStore's own code,
     in this process, in a throw-away MIRADOR_HOME);
  2. recall latency, query embedding included, p50/p95 over 200 queries, at 1,000 and 10,000;
  3. store size on disk per 1,000 memories;
  4. a daemon on that 10,000-memory store: first token with memory vs `--no-memory`, interleaved.

    .venv/bin/python scripts/bench_memory.py [--memories 10000]
"""

from __future__ import annotations

import argparse
import random
import time

from benchlib import new_home, private_daemon, save, summary

TOPICS = ["my garden", "the car", "our holiday", "work", "the kids' school", "my health", "the budget",
          "a recipe", "the neighbours", "a book I read", "the dog", "my bike", "the house", "a concert"]
VERBS = ["I need to fix", "I am worried about", "I loved", "remind me about", "I want to plan", "I paid for"]


def exchange(i: int, rng: random.Random) -> dict:
    topic, verb = rng.choice(TOPICS), rng.choice(VERBS)
    return {"query_id": f"m{i:06d}", "question": f"{verb} {topic} (note {i}, detail {rng.randint(1, 10**6)}).",
            "answer": f"Noted: {verb.lower()} {topic}. I will keep it in mind next time you ask about {topic}.",
            "route": "simple", "models": ["smollm2-135m"], "session": "", "ts": time.time() - rng.random() * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memories", type=int, default=10_000)
    parser.add_argument("--out", default="bench-results/memory.json")
    args = parser.parse_args()

    from mirador.actors.memory import Memories
    from mirador.client import Client

    rng = random.Random(7)
    queries = [f"What did I say about {rng.choice(TOPICS)}?" for _ in range(200)]
    result: dict = {"memories": args.memories}
    home = new_home()
    store = Memories(str(home / "data" / "memory"))  # where the daemon of step 4 will find it
    docs = [exchange(i, rng) for i in range(args.memories)]

    t0 = time.perf_counter()
    vectors = store._embed([store._document(d["question"], d["answer"]) for d in docs[:2000]])  # as Chroma calls it
    result["embed_docs_per_s"] = 2000 / (time.perf_counter() - t0)
    assert len(vectors) == 2000

    t0 = time.perf_counter()
    for start in range(0, len(docs), 500):
        batch = docs[start:start + 500]
        store._col.add(ids=[d["query_id"] for d in batch],
                       documents=[store._document(d["question"], d["answer"]) for d in batch],
                       metadatas=[{k: (",".join(v) if isinstance(v, list) else v) for k, v in d.items()} for d in batch])
        if start + 500 == 1000:
            result["recall_ms_at_1000"] = summary(recall_times(store, queries))
            result["bytes_at_1000"] = store.stats()["bytes"]
    result["store_s"] = time.perf_counter() - t0
    result["recall_ms"] = summary(recall_times(store, queries))
    result["bytes"] = store.stats()["bytes"]
    result["bytes_per_1000"] = result["bytes"] / (args.memories / 1000)
    del store

    # 4. the daemon on that store: what recall costs the first token
    with private_daemon(home=home) as (_, paths):
        with Client(paths.endpoint) as client:
            for label, question in (("unrelated", "Name three prime numbers."), ("related", "What did I say about my garden?")):
                on, off, recalled = [], [], 0
                for i in range(23):
                    for use, bucket in ((True, on), (False, off)):
                        first = memory_t = None
                        for e in client.ask(question, stages=["quick"], max_tokens=8, memory=use):
                            if e["event"] == "memory":
                                memory_t, recalled = e["t"], len(e["recalled"])
                            if e["event"] == "token" and first is None:
                                first = e["t"]
                            if e["event"] == "done":
                                break  # leave before `remembered`: the next question goes at once
                        if i >= 3:
                            bucket.append((first * 1000, (memory_t or 0) * 1000))
                result[f"{label}_recalled"] = recalled
                result[f"{label}_first_token_ms_memory"] = summary([f for f, _ in on])
                result[f"{label}_first_token_ms_no_memory"] = summary([f for f, _ in off])
                result[f"{label}_recall_in_daemon_ms"] = summary([m for _, m in on])

    print(f"\n{args.memories} memories\n")
    print(f"embedding throughput: {result['embed_docs_per_s']:.0f} docs/s (2,000 documents in batches of 32, 1 thread)")
    print(f"store: {result['bytes'] / 1e6:.1f} MB, {result['bytes_per_1000'] / 1e6:.2f} MB per 1,000 memories; "
          f"writing {args.memories} took {result['store_s']:.1f} s")
    rows = [("recall at 1,000 (in-process, query embedding included)", "recall_ms_at_1000"),
            (f"recall at {args.memories:,} (in-process, query embedding included)", "recall_ms")]
    for label in ("unrelated", "related"):
        n = result[f"{label}_recalled"]
        rows += [(f"{label} question ({n} recalled): ask -> memory event", f"{label}_recall_in_daemon_ms"),
                 (f"{label} question: first token, memory on", f"{label}_first_token_ms_memory"),
                 (f"{label} question: first token, --no-memory", f"{label}_first_token_ms_no_memory")]
    for label, key in rows:
        print(f"{label:<64} p50 {result[key]['p50']:7.1f} ms   p95 {result[key]['p95']:7.1f} ms")
    save(result, args.out)


def recall_times(store, queries: list[str]) -> list[float]:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        store.recall(q, k=4, min_similarity=0.3)
        times.append((time.perf_counter() - t0) * 1000)
    return times


if __name__ == "__main__":
    main()
