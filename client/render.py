"""Showing an answer on a terminal: a spinner until the first token, a section per stage in
stage order, and text styled by the model's confidence (below 0.7 dim, below 0.9 plain, else
bold). Stages run concurrently, so a later stage's events that arrive early are held until its
section comes up, then shown at once."""

from __future__ import annotations

import os
import threading
from typing import Any, TextIO

DIM, BOLD, RESET = "\x1b[2m", "\x1b[1m", "\x1b[0m"
HEADER, RED = "\x1b[1;36m", "\x1b[31m"
SPINNER_FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


def _speculated(stage_start: dict[str, Any]) -> str:
    """What speculation did for a stage, for its header: served it from the cache, or warmed it."""
    if stage_start.get("cached"):
        age = stage_start.get("age_s") or 0.0
        return f" · cached ({stage_start.get('similarity', 0):.2f} alike, {age / 60:.0f} min old)"
    return " · prefilled while you typed" if stage_start.get("warmed") else ""


def use_color(stream: TextIO) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def confidence_style(confidence: float) -> str:
    if confidence < 0.7:
        return DIM
    if confidence < 0.9:
        return ""
    return BOLD


class Spinner:
    """A spinner on stderr, in its own thread, while nothing has arrived yet."""

    def __init__(self, stream: TextIO, label: str):
        self._stream, self._label = stream, label
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        i = 0
        while not self._stop.wait(0.08):
            self._stream.write(f"\r{SPINNER_FRAMES[i % len(SPINNER_FRAMES)]} {self._label}")
            self._stream.flush()
            i += 1

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self._stream.write("\r\x1b[K")
            self._stream.flush()


class Renderer:
    """Turns ask events into terminal output. Returns from ``handle`` quickly: tokens are the hot path."""

    def __init__(self, out: TextIO, err: TextIO, color: bool | None = None, spinner: bool | None = None):
        self.out, self.err = out, err
        self.color = use_color(out) if color is None else color
        self._spinner = Spinner(err, "thinking…") if (err.isatty() if spinner is None else spinner) else None
        self._style = ""
        self._at_line_start = True
        self.errors = 0
        self.stats: list[str] = []
        self._order: list[str] = []  # stage sections, in the order the start event lists them
        self._held: dict[str, list[dict[str, Any]]] = {}

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self._at_line_start = text.endswith("\n")

    def _end_line(self) -> None:
        if not self._at_line_start:
            self._write(self._set_style("") + "\n")

    def _set_style(self, style: str) -> str:
        if not self.color or style == self._style:
            return ""
        self._style = style
        return RESET + style

    def stop_spinner(self) -> None:
        if self._spinner:
            self._spinner.stop()
            self._spinner = None

    def handle(self, event: dict[str, Any]) -> None:
        stage = event.get("stage")
        if event.get("event") == "start":
            self._order = list(event.get("stages") or [])
        elif event.get("event") == "done":
            for name in self._order:  # stages that never ended (cancelled): show what they said
                self._show_all(self._held.pop(name, []))
            self._order = []
        if stage in self._order and stage != self._order[0]:
            self._held.setdefault(stage, []).append(event)
            return
        self._show(event)
        if stage is not None and event.get("event") == "stage_end" and self._order and stage == self._order[0]:
            self._order.pop(0)  # the next section comes up, with what it said meanwhile
            while self._order:
                held = self._held.pop(self._order[0], [])
                self._show_all(held)
                if not any(e.get("event") == "stage_end" for e in held):
                    break
                self._order.pop(0)

    def _show_all(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            self._show(event)

    def _show(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "token":
            self.stop_spinner()
            self._write(self._set_style(confidence_style(event.get("confidence", 1.0))) + event.get("text", ""))
            self.out.flush()
        elif kind == "stage_start":
            self._end_line()
            header = f"── {event['stage']} · {event['model']}{_speculated(event)} ──"
            self._write((f"{HEADER}{header}{RESET}" if self.color else header) + "\n")
            self.out.flush()
        elif kind == "stage_end":
            self._end_line()
            self.out.flush()
            if event.get("tokens"):
                tps = f", {event['tokens_per_s']:.0f} tok/s" if event.get("tokens_per_s") else ""
                first = f", first token {event['first_token_s']:.2f} s" if event.get("first_token_s") is not None else ""
                self.stats.append(f"{event['stage']}: {event['tokens']} tokens{first}{tps}")
        elif kind == "error":
            self.stop_spinner()
            self._end_line()
            self.out.flush()
            self.errors += 1
            where = f" in stage {event['stage']}" if event.get("stage") else ""
            message = f"error{where}: {event.get('message')} [{event.get('code')}]"
            self.err.write((f"{RED}{message}{RESET}" if use_color(self.err) else message) + "\n")
            self.err.flush()
        elif kind == "done":
            self.stop_spinner()
            self._end_line()
            self.out.flush()
            note = "cancelled; " if event.get("cancelled") else ""
            if self.stats or note:
                line = note + " · ".join(self.stats)
                self.err.write((f"{DIM}{line}{RESET}" if use_color(self.err) else line) + "\n")
                self.err.flush()
