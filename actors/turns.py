"""``Turns``: who uses a stage's model next.

One holder at a time (a llama.cpp context is not re-entrant). Waiting generations take their
turns in arrival order, so no question starves; control work (``load``, ``unload``) goes before
every waiting generation and waits only for the one that holds the model now. A waiting
generation can be withdrawn (its question was cancelled): it leaves the queue at once instead of
waiting for a turn it would not use.

The holder hands its turn straight to the next waiter, so nobody can slip in between. Everything
runs on one event loop (the stage actor's model loop); nothing here is thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import AsyncIterator, Hashable


class Turns:
    def __init__(self) -> None:
        self._held = False
        self._urgent: deque[asyncio.Future[bool]] = deque()
        self._queue: dict[Hashable, asyncio.Future[bool]] = {}  # key -> waiter, in arrival order

    @property
    def waiting(self) -> int:
        return len(self._urgent) + len(self._queue)

    async def take(self, key: Hashable, urgent: bool = False) -> bool:
        """Wait for the model's turn: True once it is ours (``give_back`` it after), False if
        ``withdraw(key)`` took the request out of the queue first. ``key``s must be unique
        among waiters; ``urgent`` waiters go first."""
        if not self._held and not self.waiting:
            self._held = True
            return True
        waiter = asyncio.get_running_loop().create_future()
        if urgent:
            self._urgent.append(waiter)
        else:
            if key in self._queue:
                raise ValueError(f"{key!r} is already waiting for a turn")
            self._queue[key] = waiter
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
            raise

    def withdraw(self, key: Hashable) -> bool:
        """Take a waiting request out of the queue; its ``take`` returns False. Returns whether it waited."""
        waiter = self._queue.pop(key, None)
        if waiter is None or waiter.done():
            return False
        waiter.set_result(False)
        return True

    def give_back(self) -> None:
        """End the holder's turn: hand it to the next waiter (urgent first), else free the model."""
        while self._urgent or self._queue:
            waiter = self._urgent.popleft() if self._urgent else self._queue.pop(next(iter(self._queue)))
            if not waiter.done():
                waiter.set_result(True)
                return  # still held: by the waiter now
        self._held = False

    @contextlib.asynccontextmanager
    async def urgent(self) -> AsyncIterator[None]:
        """Hold the model for control work, ahead of every waiting generation."""
        await self.take(object(), urgent=True)
        try:
            yield
        finally:
            self.give_back()
