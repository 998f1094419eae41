#!/usr/bin/env python
"""Simulate a user rating answers, and see whether the learner finds each type's best plan.

Each question type has a hidden best plan (mean rating 4.2) among 4 candidates (the others 2.0 to
3.4), and the router's default is one of them at random. Every round the simulated user asks
one question of each type, the learner (its real code, on a throw-away SQLite file) picks a
plan, and the user rates it: the plan's mean plus Gaussian noise (sd 0.9), rounded, clipped to
1-5. After N ratings per type: how often does the learner pick the best plan (over all types
and seeds)? prints the regret curve
(mean rating lost per question against always picking the best) and writes JSON.

    .venv/bin/python scripts/bench_learner.py [--types 6] [--rounds 30] [--seeds 20]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
from pathlib import Path

from benchlib import save

PLANS = ["quick", "quick+synthesis", "quick+deep+synthesis", "chain:draft-critique-revise"]


def simulate(types: int, rounds: int, seed: int) -> tuple[list[float], float]:
    """Returns (regret per round, share of best picks after ``rounds`` ratings per type)."""
    from mirador.actors.learner import Learning

    rng = random.Random(seed)
    world = {}
    for t in range(types):
        means = {p: rng.uniform(2.0, 3.4) for p in PLANS}
        best = rng.choice(PLANS)
        means[best] = 4.2
        world[f"type{t}"] = (means, best, rng.choice(PLANS))
    with tempfile.TemporaryDirectory() as tmp:
        learner = Learning(str(Path(tmp) / "learning.sqlite3"))
        regret = []
        n = 0
        for _ in range(rounds):
            lost = []
            for qtype, (means, best, default) in world.items():
                plan = learner.choose(qtype, PLANS, default)["plan"]
                n += 1
                learner.observe(f"q{n}", qtype, plan)
                rating = min(5, max(1, round(rng.gauss(means[plan], 0.9))))
                learner.rate(f"q{n}", rating)
                lost.append(means[best] - means[plan])
            regret.append(statistics.fmean(lost))
        picks = [learner.choose(qtype, PLANS, default)["plan"] == best for qtype, (_, best, default) in world.items()]
    return regret, sum(picks) / len(picks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=30, help="ratings per type")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--out", default="bench-results/learner.json")
    args = parser.parse_args()

    runs = [simulate(args.types, args.rounds, seed) for seed in range(1, args.seeds + 1)]
    curve = [statistics.fmean(r[0][i] for r in runs) for i in range(args.rounds)]
    best = statistics.fmean(r[1] for r in runs)
    print(f"{args.types} types x {len(PLANS)} plans, {args.rounds} ratings per type, {args.seeds} seeds\n")
    print("round  regret (mean rating lost per question)")
    for i, value in enumerate(curve, 1):
        if i in (1, 2, 3, 5) or i % 5 == 0:
            print(f"{i:5}  {value:5.2f}  {'#' * round(value * 20)}")
    print(f"\nbest plan picked after {args.rounds} ratings per type: {best:.1%} (target >= 90 %)")
    save({"types": args.types, "rounds": args.rounds, "seeds": args.seeds, "regret_curve": curve,
          "best_pick_share": best}, args.out)


if __name__ == "__main__":
    main()
