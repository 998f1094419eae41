#!/usr/bin/env python
"""Background LoRA training, measured on one private daemon per size (issue 14's targets).

A simulated user (scripts/persona.py) has rated highly N answers of one checkable style on
training topics; questions on held-out topics are new to the model. One run per size:

1. what one training run does: the held-out rated answers' mean per-token log-probability, base
   vs adapter (measured in llama.cpp by the run's own judgement), and the general-knowledge set's;
   the share of answers to new questions that show the style, base vs adapter (greedy);
2. what it costs: wall time and peak RSS of training on one thread, export and validation time,
   the hot-swap time (every stage actor switching adapters);
3. what the user feels: the quick stage's first token while the run trains ÷ on an idle daemon.

    .venv/bin/python scripts/bench_train.py [--examples 50 200] [--probes 12] [--rounds 10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchlib import private_daemon, save, summary

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts import persona  # noqa: E402

FIRST_TOKEN_QUESTION = "Name a colour of the sky."


def first_token(client) -> float:
    events = list(client.ask(FIRST_TOKEN_QUESTION, stages=["quick"], max_tokens=8, memory=False))
    return next(e["t"] for e in events if e["event"] == "token")


def style_share(client, questions: list[str]) -> tuple[float, list[str]]:
    answers = []
    for q in questions:
        events = list(client.ask(q, stages=["quick"], max_tokens=40, temperature=0.0, memory=False))
        answers.append("".join(e["text"] for e in events if e["event"] == "token"))
    return sum(persona.shows_style(a) for a in answers) / len(answers), answers


def job_of(client, job_id: str) -> dict:
    return next(j for j in client.jobs()["jobs"] if j["id"] == job_id)


def one_size(n: int, probes: int, rounds: int) -> dict:
    from mirador.client import Client
    from mirador.runtime.config_schema import TrainConfig

    train_topics, new_topics = persona.split_topics(probes)
    records = [{"id": f"p{i}", "question": e["question"], "answer": e["answer"], "rating": 5}
               for i, e in enumerate(persona.exchanges(n, topics=train_topics))]
    probe_questions = [f"What is {t}?" for t in new_topics]
    # The gate is opened (min_gain 0, any general-set change) so that the adapter is deployed and
    # measured whatever the numbers; what the default gate would decide is worked out below.
    env = {"MIRADOR_JOBS__CPU_SHARE": "1.0", "MIRADOR_JOBS__DAILY_CPU_S": "0", "MIRADOR_TRAIN__ENABLED": "false",
           "MIRADOR_TRAIN__MIN_GAIN": "0", "MIRADOR_TRAIN__MAX_GENERAL_DROP": "1000",
           "MIRADOR_JOBS__FOLLOWUPS": "0", "MIRADOR_CACHE__ENABLED": "false", "MIRADOR_TRAIN__MAX_EXAMPLES": str(max(n, 4))}
    with private_daemon(env) as (_, paths), Client(paths.endpoint, idle_timeout=600) as c:
        c.memory("import", records=records)
        idle = [first_token(c) for _ in range(rounds)]
        base_share, base_answers = style_share(c, probe_questions)
        job = c.train("run")["job"]
        busy: list[float] = []
        while (state := job_of(c, job["id"]))["state"] not in ("done", "failed", "cancelled", "skipped"):
            if state["progress"].startswith("step") and len(busy) < rounds:
                busy.append(first_token(c))  # a question while it trains
                time.sleep(1.0)
            else:
                time.sleep(0.5)
        if state["state"] != "done":
            raise SystemExit(f"the run ended {state['state']}: {state.get('why')}")
        (entry,) = c.train("history")["versions"]
        swap = {}
        for op, fields in (("off", {}), ("rollback", {"version": entry["version"]})):
            started = time.perf_counter()
            c.train(op, **fields)
            swap[op] = time.perf_counter() - started
        adapted_share, adapted_answers = style_share(c, probe_questions)
        gate = TrainConfig()
        ev = entry["evaluation"]
        default_deploys = ev["held_out"]["change"] >= gate.min_gain and -ev["general"]["change"] <= gate.max_general_drop
        return {"examples": n, "trained_on": entry["examples"], "held_out": entry["held_out_examples"],
                "default_gate_deploys": default_deploys, "evaluation": entry["evaluation"],
                "train": entry["train"], "paused_s": entry["paused_s"], "job_model_s": state["cost"]["model_s"],
                "swap_s": swap, "style": {"base": base_share, "adapter": adapted_share,
                                          "samples": list(zip(probe_questions, base_answers, adapted_answers))[:4]},
                "first_token": {"idle": summary(idle), "training": summary(busy) if busy else None}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--probes", type=int, default=12, help="held-out topics asked to see the style")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default="bench-results/train.json")
    args = parser.parse_args()
    from mirador.runtime.config_schema import TrainConfig

    results = []
    for n in args.examples:
        r = one_size(n, args.probes, args.rounds)
        results.append(r)
        ev, tr, ft = r["evaluation"], r["train"], r["first_token"]
        print(f"\n== {n} rated exchanges ({r['trained_on']} trained on, {r['held_out']} held out) ==")
        for name, label in (("held_out", "held-out rated answers"), ("general", "general-knowledge set")):
            print(f"{label}, mean log-prob/token in llama.cpp: base {ev[name]['base']:.3f} -> adapter "
                  f"{ev[name]['adapter']:.3f} ({ev[name]['change']:+.3f})")
        gate = TrainConfig()
        print(f"the default gate (gain >= {gate.min_gain}, general drop <= {gate.max_general_drop}) would deploy it: "
              f"{r['default_gate_deploys']}")
        style = r["style"]
        print(f"answers to new questions in the style: base {style['base']:.0%}, adapter {style['adapter']:.0%}")
        print(f"training: {tr.get('train_s', 0):.1f} s wall ({tr.get('steps')} steps, 1 thread), peak RSS "
              f"{tr.get('peak_rss_mb', 0):.0f} MB; export {tr.get('export_s', 0) * 1000:.0f} ms, validation "
              f"{tr.get('validate_s', 0) * 1000:.0f} ms; job total {r['job_model_s']:.1f} s, paused {r['paused_s']:.1f} s")
        print(f"hot swap (every actor): off {r['swap_s']['off'] * 1000:.0f} ms, back on {r['swap_s']['rollback'] * 1000:.0f} ms")
        if ft["training"]:
            ratio = ft["training"]["p50"] / ft["idle"]["p50"]
            print(f"first token p50 idle {ft['idle']['p50'] * 1000:.0f} ms, while training {ft['training']['p50'] * 1000:.0f} ms "
                  f"({ratio:.2f}x; p95 {ft['training']['p95'] / ft['idle']['p95']:.2f}x)")
    save({"runs": results}, args.out)


if __name__ == "__main__":
    main()
