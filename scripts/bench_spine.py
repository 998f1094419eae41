#!/usr/bin/env python
"""Benchmark the spine: what does going through miradord cost over raw llama.cpp?

In one run, same model, prompt and machine, all warm, runs interleaved (raw, daemon, raw, ...):
  (a) raw llama.cpp in this process (llama-cpp-python's create_chat_completion stream, on the
      main thread): first token and decode tokens/s;
  (b) the same question through the daemon as a client sees it (mirador.client.Client);
  (c) the daemon-side overhead on the first token, (b) - (a), p50/p95 over the paired runs;
  (d) the client process start + import cost, and Enter -> first token of the real
      `mirador ask` command against the warm daemon.
Prints a table and writes JSON (default bench-results/spine.json).

    .venv/bin/python scripts/bench_spine.py [--runs 30] [--tokens 64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

from benchlib import BIN, private_daemon, save, summary

QUESTION = "Explain in a few sentences why the sky is blue."


def raw_run(llm, messages, tokens: int, temperature: float) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for chunk in llm.create_chat_completion(messages, stream=True, max_tokens=tokens, temperature=temperature):
        if chunk["choices"][0]["delta"].get("content"):
            last = time.perf_counter()
            first = first or last
            n += 1
    return first - t0, (n - 1) / (last - first), n


def daemon_run(client, tokens: int, temperature: float) -> tuple[float, float, int, float]:
    times = []
    actor_first = None
    # Incognito: this measures the spine; memory's recall and injection have their own benchmark.
    for event in client.ask(QUESTION, stages=["quick"], max_tokens=tokens, temperature=temperature, memory=False):
        if event["event"] == "token":
            times.append(event["t"])
        elif event["event"] == "stage_end":
            actor_first = event["first_token_s"]
    return times[0], (len(times) - 1) / (times[-1] - times[0]), len(times), actor_first


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def enter_to_first_token(env: dict[str, str], tokens: int) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "mirador"), "ask", "--json", "--stages", "quick", "--no-memory",
                             "--max-tokens", str(tokens), QUESTION],
                            env=env, stdout=subprocess.PIPE, text=True)
    first = None
    for line in proc.stdout:
        if first is None and '"event": "token"' in line:
            first = time.perf_counter() - t0
    proc.wait()
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", default="bench-results/spine.json")
    args = parser.parse_args()

    from llama_cpp import Llama

    from mirador.actors.llamacpp import resolve_source
    from mirador.client import Client
    from mirador.runtime.config import load_config

    with private_daemon() as (env, paths):
        config = load_config(paths, env)
        stage = config.stages["quick"]
        spec = config.models[stage.model]
        n_threads = spec.options.get("n_threads") or os.cpu_count()
        messages = [{"role": "system", "content": stage.system_prompt}, {"role": "user", "content": QUESTION}]
        temperature = stage.temperature
        llm = Llama(model_path=str(resolve_source(spec.source)), n_ctx=spec.options.get("n_ctx", 2048),
                    n_threads=n_threads, verbose=False)
        raw, via, actor_first = [], [], []
        with Client(paths.endpoint) as client:
            for i in range(args.runs + 3):  # the first 3 rounds warm caches and are dropped
                r = raw_run(llm, messages, args.tokens, temperature)
                d = daemon_run(client, args.tokens, temperature)
                if i >= 3:
                    raw.append(r), via.append(d[:3]), actor_first.append(d[3])
        overhead_ms = [(d[0] - r[0]) * 1000 for d, r in zip(via, raw)]
        transport_ms = [(d[0] - a) * 1000 for d, a in zip(via, actor_first)]
        imports = [timed([str(BIN / "python"), "-c", "import mirador.client.cli"], env) for _ in range(10)]
        helps = [timed([str(BIN / "mirador"), "--help"], env) for _ in range(10)]
        enter = [enter_to_first_token(env, args.tokens) for _ in range(10)]

    result = {
        "machine": {"cpus": os.cpu_count(), "model": spec.name, "n_threads": n_threads, "tokens": args.tokens,
                    "runs": args.runs, "temperature": temperature},
        "raw_first_token_ms": summary([r[0] * 1000 for r in raw]),
        "raw_tokens_per_s": summary([r[1] for r in raw]),
        "daemon_first_token_ms": summary([d[0] * 1000 for d in via]),
        "daemon_tokens_per_s": summary([d[1] for d in via]),
        "overhead_first_token_ms": summary(overhead_ms),
        "transport_first_token_ms": summary(transport_ms),
        "client_import_ms": summary([t * 1000 for t in imports]),
        "cli_help_ms": summary([t * 1000 for t in helps]),
        "enter_to_first_token_ms": summary([t * 1000 for t in enter]),
    }
    result["tokens_per_s_ratio"] = result["daemon_tokens_per_s"]["p50"] / result["raw_tokens_per_s"]["p50"]

    rows = [
        ("(a) raw llama.cpp, first token", "raw_first_token_ms", "ms"),
        ("(a) raw llama.cpp, decode", "raw_tokens_per_s", "tok/s"),
        ("(b) through miradord, first token", "daemon_first_token_ms", "ms"),
        ("(b) through miradord, streamed", "daemon_tokens_per_s", "tok/s"),
        ("(c) daemon overhead on first token (b-a)", "overhead_first_token_ms", "ms"),
        ("    of which Ray + ZeroMQ, request and reply", "transport_first_token_ms", "ms"),
        ("(d) python -c 'import mirador.client.cli'", "client_import_ms", "ms"),
        ("(d) mirador --help", "cli_help_ms", "ms"),
        ("    Enter -> first token, `mirador ask`", "enter_to_first_token_ms", "ms"),
    ]
    print(f"\nmodel {spec.name}, {n_threads} threads, {os.cpu_count()} CPUs, {args.tokens} tokens, "
          f"{args.runs} interleaved runs\n")
    print(f"| {'measure':<46} | {'p50':>8} | {'p95':>8} | unit  |")
    print(f"|{'-' * 48}|{'-' * 10}|{'-' * 10}|-------|")
    for label, key, unit in rows:
        print(f"| {label:<46} | {result[key]['p50']:8.1f} | {result[key]['p95']:8.1f} | {unit:<5} |")
    print(f"\nstreamed / raw decode tokens/s (p50): {result['tokens_per_s_ratio']:.3f}")
    save(result, args.out)


if __name__ == "__main__":
    main()
