"""``Trainer``: a Ray actor that trains one LoRA adapter and judges it, in a process of its own.

The daemon starts one per training run (placed like any actor: on a node with a GPU when
``[train] num_gpus`` asks for one, else here) and kills it afterwards, so torch's memory (~1-4
GB) is given back. Here it runs at a lower OS priority with one torch thread (two threads beside
a busy process ran 5-15x slower; shared DESIGN.md). It is a threaded actor: ``run`` trains on one
thread while ``pause``/``resume``/``stop``/``progress`` answer on others. The daemon pauses it
while a user question runs (training then waits before its next example) and stops it when the
job must end. The work itself is ``actors/lora_train.py``; this file only hosts it.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import ray

NICENESS = 10


@ray.remote(num_cpus=0, max_concurrency=4)
class Trainer:
    def __init__(self) -> None:
        from mirador.runtime.jobs import lower_priority

        lower_priority(NICENESS)
        self._go = threading.Event()  # set: training may take its next step
        self._go.set()
        self._stop = threading.Event()
        self._progress: dict[str, Any] = {"phase": "starting"}
        self._paused_s = 0.0

    def _wait_turn(self) -> None:
        if self._go.is_set():
            return
        started = time.monotonic()
        while not self._go.wait(0.2) and not self._stop.is_set():
            pass
        self._paused_s += time.monotonic() - started

    def _on_progress(self, step: int, total: int, loss: float) -> None:
        self._progress = {"phase": "training", "step": step, "steps": total, "loss": round(float(loss), 4)}

    def run(self, base_path: str, train: list[dict[str, str]], held_out: list[dict[str, str]], system_prompt: str,
            out_path: str, params: dict[str, Any]) -> dict[str, Any]:
        """Train on ``train``, export to ``out_path`` (validated), then judge it in llama.cpp on
        ``held_out`` and the general set. Returns {train: stats, evaluation: {deploy, why, ...},
        paused_s}; a stopped run returns {stopped: why}."""
        from .lora_train import TrainingStopped, evaluate, load_general_set, train_lora

        gate = {k: params.pop(k) for k in ("min_gain", "max_general_drop")}
        try:
            stats = train_lora(base_path, train, system_prompt, out_path, on_progress=self._on_progress,
                               should_stop=self._stop.is_set, wait_turn=self._wait_turn, **params)
        except TrainingStopped as exc:
            Path(out_path).unlink(missing_ok=True)
            return {"stopped": str(exc) or "stopped"}
        self._progress = {"phase": "evaluating"}
        verdict = evaluate(base_path, out_path, held_out, load_general_set(), system_prompt, gate["min_gain"],
                           gate["max_general_drop"])
        return {"train": stats, "evaluation": verdict, "paused_s": round(self._paused_s, 3), "pid": os.getpid()}

    def pause(self) -> None:
        self._go.clear()

    def resume(self) -> None:
        self._go.set()

    def stop(self) -> None:
        self._stop.set()
        self._go.set()

    def progress(self) -> dict[str, Any]:
        return {**self._progress, "paused": not self._go.is_set(), "paused_s": round(self._paused_s, 3)}
