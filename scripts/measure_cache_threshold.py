"""Measure where the answer cache's similarity threshold belongs: the cosine of paraphrase pairs
(a hit is right) and of deliberate near-misses (a hit is a wrong answer), with the real MiniLM
embedding, and how many of each a cache would serve at candidate thresholds, with and without
``question_guard.disagreement``. Pairs: scripts/cache_pairs.py.

    .venv/bin/python scripts/measure_cache_threshold.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from cache_pairs import NEAR_MISSES, PARAPHRASES

THRESHOLDS = [0.60, 0.65, 0.70, 0.75, 0.78, 0.80, 0.82, 0.85, 0.90]


def spread(values: list[float]) -> str:
    q = statistics.quantiles(values, n=10, method="inclusive")
    return (f"n={len(values):3d} min {min(values):.3f}  p10 {q[0]:.3f}  median {statistics.median(values):.3f}  "
            f"p90 {q[-1]:.3f}  max {max(values):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()

    from mirador.actors.embedding import MiniLMEmbedding
    from mirador.actors.question_guard import disagreement

    embed = MiniLMEmbedding()
    pairs = [(a, b, "paraphrase") for a, b in PARAPHRASES] + list(NEAR_MISSES)
    vectors = embed([text for a, b, _ in pairs for text in (a, b)])
    rows = []
    started = time.perf_counter()
    for n, (a, b, kind) in enumerate(pairs):
        rows.append({"a": a, "b": b, "kind": kind, "cosine": round(float(vectors[2 * n] @ vectors[2 * n + 1]), 4),
                     "guard": disagreement(a, b, embed)})
    guard_ms = (time.perf_counter() - started) * 1000 / len(pairs)

    kinds = ["paraphrase", *dict.fromkeys(k for _, _, k in NEAR_MISSES)]
    print("cosine by group")
    for kind in [*kinds, "near-miss (all)"]:
        values = [r["cosine"] for r in rows if r["kind"] == kind or (kind == "near-miss (all)" and r["kind"] != "paraphrase")]
        print(f"  {kind:16s} {spread(values)}")

    print("\nguard verdicts")
    for kind in kinds:
        group = [r for r in rows if r["kind"] == kind]
        passed = [r for r in group if r["guard"] is None]
        print(f"  {kind:16s} {len(group) - len(passed):2d}/{len(group)} refused by the guard")
        for r in passed if kind != "paraphrase" else []:
            print(f"      passes: {r['cosine']:.3f} {r['a']!r} / {r['b']!r}")
    for r in rows:
        if r["kind"] == "paraphrase" and r["guard"]:
            print(f"      paraphrase refused: {r['cosine']:.3f} {r['guard']}: {r['a']!r} / {r['b']!r}")
    print(f"  (guard: {guard_ms:.2f} ms per pair, word embeddings included)")

    para = [r for r in rows if r["kind"] == "paraphrase"]
    near = [r for r in rows if r["kind"] != "paraphrase"]
    print(f"\nat threshold t: paraphrase hits of {len(para)}, false hits of {len(near)} near-misses")
    print(f"  {'t':>5}  {'hits':>5} {'false':>6}  | with guard: {'hits':>5} {'false':>6}")
    table = []
    for t in THRESHOLDS:
        line = {"threshold": t,
                "hits": sum(r["cosine"] >= t for r in para), "false_hits": sum(r["cosine"] >= t for r in near),
                "hits_guarded": sum(r["cosine"] >= t and not r["guard"] for r in para),
                "false_hits_guarded": sum(r["cosine"] >= t and not r["guard"] for r in near)}
        table.append(line)
        print(f"  {t:5.2f}  {line['hits']:5d} {line['false_hits']:6d}  |             {line['hits_guarded']:5d} "
              f"{line['false_hits_guarded']:6d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pairs": rows, "thresholds": table}, f, indent=1)


if __name__ == "__main__":
    main()
