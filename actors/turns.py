"""``Turns``: who uses a stage's model next.

One holder at a time (a llama.cpp context is not re-entrant). Waiting generations take their
turns in arrival order, so no question starves; control work (``load``, ``unload``) goes before
every waiting generation and waits only for the one that holds the model now. A waiting
generation can be withdrawn (its question was cancelled): it leaves the queue at once instead of
waiting for a turn it would not use.

Background work (a speculative job: nobody waits for it) comes last: it gets the model only
when no generation or control work waits, and when one arrives while background work holds the
model, ``preempt`` is set; the background holder checks it between tokens (and between chunks of
a prompt it evaluates) and gives the model back. ``preempt`` is a ``threading.Event`` because the
llama.cpp thread reads it.

The holder hands its turn straight to the next waiter, so nobody can slip in between. Everything
else runs on one event loop (the stage actor's model loop); nothing else here is thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from typing import AsyncIterator, Hashable


class Turns:
    def __init__(self) -> None:
        self._held = False
        self._urgent: deque[asyncio.Future[bool]] = deque()
        self._queue: dict[Hashable, asyncio.Future[bool]] = {}  # key -> waiter, in arrival order
        self._background: dict[Hashable, asyncio.Future[bool]] = {}  # key -> waiter, after everyone else
        self._holder_is_background = False
        self.preempt = threading.Event()  # set: background work holds the model and someone else waits
        self._preempted_at = 0.0
        self.last_yield_s: float | None = None  # how long the last preempted holder took to give the model back

    @property
    def waiting(self) -> int:
        """Generations and control work waiting (background work is not counted: it yields)."""
        return len(self._urgent) + len(self._queue)

    async def take(self, key: Hashable, urgent: bool = False, background: bool = False) -> bool:
        """Wait for the model's turn: True once it is ours (``give_back`` it after), False if
        ``withdraw(key)`` took the request out of the queue first. ``key``s must be unique
        among waiters; ``urgent`` waiters go first, ``background`` ones last."""
        if not self._held and not self.waiting and not self._background:
            self._held, self._holder_is_background = True, background
            return True
        waiter = asyncio.get_running_loop().create_future()
        if urgent:
            self._urgent.append(waiter)
        else:
            queue = self._background if background else self._queue
            if key in self._queue or key in self._background:
                raise ValueError(f"{key!r} is already waiting for a turn")
            queue[key] = waiter
        if self._held and self._holder_is_background and not background and not self.preempt.is_set():
            self._preempted_at = time.monotonic()
            self.preempt.set()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.give_back()  # the turn reached us as we were cancelled: pass it on
            elif urgent:
                with contextlib.suppress(ValueError):
                    self._urgent.remove(waiter)
            elif self._queue.get(key) is waiter:
                del self._queue[key]
            elif self._background.get(key) is waiter:
                del self._background[key]
            raise

    def withdraw(self, key: Hashable) -> bool:
        """Take a waiting request out of the queue; its ``take`` returns False. Returns whether it waited."""
        waiter = self._queue.pop(key, None) or self._background.pop(key, None)
        if waiter is None or waiter.done():
            return False
        waiter.set_result(False)
        return True

    def give_back(self) -> None:
        """End the holder's turn: hand it to the next waiter (urgent, then generations, then
        background work), else free the model."""
        if self.preempt.is_set():
            self.last_yield_s = time.monotonic() - self._preempted_at
            self.preempt.clear()
        while self._urgent or self._queue or self._background:
            self._holder_is_background = not (self._urgent or self._queue)
            if self._urgent:
                waiter = self._urgent.popleft()
            else:
                queue = self._queue or self._background
                waiter = queue.pop(next(iter(queue)))
            if not waiter.done():
                waiter.set_result(True)
                return  # still held: by the waiter now
        self._held, self._holder_is_background = False, False

    @contextlib.asynccontextmanager
    async def urgent(self) -> AsyncIterator[None]:
        """Hold the model for control work, ahead of every waiting generation."""
        await self.take(object(), urgent=True)
        try:
            yield
        finally:
            self.give_back()
