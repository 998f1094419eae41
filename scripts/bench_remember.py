#!/usr/bin/env python
"""How long after an answer's ``done`` its ``remembered`` comes (what `mirador ask` and `chat` wait
for, at most 10 s, once the answer is on screen), and how long a `memory import` of N memories
takes, in batches, on a private daemon.

    .venv/bin/python scripts/bench_remember.py [--asks 12] [--import-n 500]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from benchlib import BIN, private_daemon, save, summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--asks", type=int, default=12)
    parser.add_argument("--import-n", type=int, default=500)
    parser.add_argument("--out", default="bench-results/remember.json")
    args = parser.parse_args()

    from mirador.client import Client

    with private_daemon() as (env, paths):
        gaps = []
        with Client(paths.endpoint, idle_timeout=120) as client:
            for i in range(args.asks):
                events = list(client.ask(f"Remember fact {i}: the number {i} is lucky.", stages=["quick"], max_tokens=8))
                done = next(e for e in events if e["event"] == "done")
                assert events[-1]["event"] == "remembered", events[-1]
                gaps.append(events[-1]["t"] - done["t"])
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / "memories.jsonl"
            file.write_text("".join(json.dumps({"id": f"bench-{i}", "question": f"Question {i} about topic {i % 17}?",
                                                "answer": f"Answer {i}, a sentence or two long, as exchanges are."}) + "\n"
                                    for i in range(args.import_n)))
            started = time.perf_counter()
            subprocess.run([str(BIN / "mirador"), "memory", "import", str(file)], env=env, check=True, capture_output=True)
            import_s = time.perf_counter() - started
    result = {"done_to_remembered_s": summary(gaps), "asks": args.asks,
              "import": {"memories": args.import_n, "seconds": import_s, "per_s": args.import_n / import_s}}
    print(f"done -> remembered: p50 {result['done_to_remembered_s']['p50']:.3f} s, "
          f"p95 {result['done_to_remembered_s']['p95']:.3f} s over {args.asks} asks")
    print(f"memory import of {args.import_n}: {import_s:.1f} s ({args.import_n / import_s:.0f} memories/s)")
    save(result, args.out)


if __name__ == "__main__":
    main()
