"""``mirador chat``: an interactive prompt that tells the daemon what is coming while you type.

Whenever typing pauses for ``HINT_PAUSE_S``, the text so far goes to the daemon as a ``hint``, so
the models the question will need load while it is still being written; Enter asks it. Hints
go from a thread of their own, on a connection of their own (ZeroMQ sockets are not
thread-safe), so the prompt never waits for the daemon. Standard input that is not a terminal
is read line by line, one question per line, without hints.

A chat may last for days: what it keeps per turn is bounded (the line history keeps the newest
``HISTORY_LINES`` questions).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable

from .api import Client, MiradorError

HINT_PAUSE_S = 0.15  # a pause in typing this long sends a hint (people type ~5 characters/s)
EXIT_WORDS = ("/exit", "/quit")
HISTORY_LINES = 1000  # questions the Up arrow brings back


def bounded_history(limit: int = HISTORY_LINES):
    """The prompt's line history, in memory, keeping the newest ``limit`` lines. prompt_toolkit's
    own InMemoryHistory keeps every line twice and forever."""
    from prompt_toolkit.history import History

    class BoundedHistory(History):
        def load_history_strings(self) -> list[str]:
            return list(self._loaded_strings)  # nothing from before this chat; the lines of this one

        def store_string(self, string: str) -> None:
            pass  # the loaded list below is the only copy

        def append_string(self, string: str) -> None:
            super().append_string(string)  # newest first in History._loaded_strings
            del self._loaded_strings[limit:]

    return BoundedHistory()


class Hinter:
    """Sends the latest typed text as a hint after a pause, at most one hint per pause."""

    def __init__(self, endpoint: str, session: str | None = None, memory: bool = True):
        self.endpoint, self.session, self.memory = endpoint, session, memory
        self._text, self._typed_at, self._sent = "", 0.0, ""
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mirador-hints", daemon=True)
        self._thread.start()

    def typed(self, text: str) -> None:
        with self._changed:
            self._text, self._typed_at = text, time.monotonic()
            self._changed.notify()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join(timeout=2)

    def _next(self) -> str | None:
        """Wait for text that has rested for HINT_PAUSE_S and was not sent yet; None once closed."""
        with self._changed:
            while not self._closed:
                quiet = time.monotonic() - self._typed_at
                if self._text.strip() and self._text != self._sent and quiet >= HINT_PAUSE_S:
                    self._sent = self._text
                    return self._text
                self._changed.wait(HINT_PAUSE_S - quiet if self._text != self._sent and quiet < HINT_PAUSE_S else None)
        return None

    def _run(self) -> None:
        with Client(self.endpoint) as client:
            while (text := self._next()) is not None:
                try:
                    client.hint(text, self.session, self.memory)
                except MiradorError:  # a hint is only a head start: the ask says what is wrong
                    pass


def run_chat(client: Client, answer: Callable[[Client, str], None], session: str | None = None, memory: bool = True) -> None:
    """The prompt loop: read a question, ``answer`` it with ``client``, until end of input or
    /exit; hints while typing carry the ``session`` and whether ``memory`` is on."""
    if not sys.stdin.isatty():
        for line in sys.stdin:
            if line.strip() in EXIT_WORDS:
                break
            if line.strip():
                answer(client, line.strip())
        return
    from prompt_toolkit import PromptSession

    hinter = Hinter(client.endpoint, session, memory)
    prompt: PromptSession[str] = PromptSession(history=bounded_history())
    prompt.default_buffer.on_text_changed += lambda buffer: hinter.typed(buffer.text)
    try:
        while True:
            try:
                text = prompt.prompt("› ").strip()
            except KeyboardInterrupt:  # clears the line, like a shell
                continue
            except EOFError:
                break
            if text in EXIT_WORDS:
                break
            if text:
                answer(client, text)
    finally:
        hinter.close()
