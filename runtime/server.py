"""The daemon's ZeroMQ front door: one ROUTER socket, many concurrent clients, nothing dropped.

Requests are decoded and validated by ``mirador.client.protocol``; a bad frame gets an ``error``
reply and the loop goes on. Every ask runs as its own task, so clients do not wait for each
other here (they may still take turns on a stage's model).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from typing import Any, Awaitable, Callable, Protocol

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from mirador.client import protocol
from mirador.client.protocol import ProtocolError

from .access import TcpAccess, bind_tcp

log = logging.getLogger("mirador.server")

# Frames up to this size are read and answered with `too_large`; ZeroMQ drops the connection of
# a peer that sends anything bigger, so a hostile client cannot make the daemon buffer gigabytes.
HARD_FRAME_LIMIT = 8 * protocol.MAX_FRAME_BYTES

Emit = Callable[..., Awaitable[None]]


class PeerGone(Exception):
    """The client disconnected; whatever it asked for can stop."""


class App(Protocol):
    """What the server needs from the daemon."""

    def pong(self) -> dict[str, Any]: ...
    async def status(self) -> dict[str, Any]: ...
    async def stats(self) -> dict[str, Any]: ...
    async def memory_op(self, request: dict[str, Any]) -> dict[str, Any]: ...  # raises ProtocolError
    async def rate(self, request: dict[str, Any]) -> dict[str, Any]: ...  # raises ProtocolError
    async def learn(self, request: dict[str, Any]) -> dict[str, Any]: ...  # raises ProtocolError
    async def hint(self, request: dict[str, Any]) -> dict[str, Any]: ...
    async def models_op(self, request: dict[str, Any]) -> dict[str, Any]: ...  # raises ProtocolError
    def new_ask(self, request: dict[str, Any]) -> Any: ...  # raises ProtocolError
    async def run_ask(self, ask: Any, emit: Emit) -> None: ...
    def cancel_ask(self, ask: Any) -> None: ...


class Outbox:
    """Replies to one client, in order. A full queue at the client waits; it is never dropped.

    The fast path sends at once. When the client's ZeroMQ queue is full (zmq.Again under
    ROUTER_MANDATORY), replies wait here, a drainer retries with backoff, and once too many
    wait, ``send`` blocks its caller: a slow client slows only its own asks.
    """

    HIGH_WATER = 2000

    def __init__(self, sock: zmq.asyncio.Socket, ident: bytes):
        self._sock, self._ident = sock, ident
        self._queue: deque[bytes] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self._progress = asyncio.Event()
        self.gone = False

    @property
    def idle(self) -> bool:
        return not self._queue

    async def send(self, payload: bytes) -> None:
        if self.gone:
            raise PeerGone()
        if not self._queue and self._try_send(payload):
            return
        self._queue.append(payload)
        if self._drainer is None:
            self._drainer = asyncio.create_task(self._drain())
        while len(self._queue) > self.HIGH_WATER and not self.gone:
            self._progress.clear()
            await self._progress.wait()
        if self.gone:
            raise PeerGone()

    def send_nowait(self, payload: bytes) -> None:
        """Best effort, for the last words of a shutting-down daemon."""
        if not self.gone and not self._queue:
            self._try_send(payload)

    def _try_send(self, payload: bytes) -> bool:
        try:
            # On an asyncio socket a NOBLOCK send completes (or fails) before returning.
            self._sock.send_multipart((self._ident, payload), flags=zmq.NOBLOCK).result()
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self.gone = True
            self._queue.clear()
            self._progress.set()
            raise PeerGone() from None

    async def _drain(self) -> None:
        delay = 0.001
        try:
            while self._queue:
                if self._try_send(self._queue[0]):
                    self._queue.popleft()
                    self._progress.set()
                    delay = 0.001
                else:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.05)
        except PeerGone:
            pass
        finally:
            self._drainer = None


class Server:
    def __init__(self, endpoint: str, app: App, tcp: TcpAccess | None = None):
        self.endpoint = endpoint  # the ipc socket
        self.app = app
        self.tcp = tcp  # also a TCP endpoint, for CurveZMQ clients only (see access.py)
        self._ctx = zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self._authenticator: AsyncioAuthenticator | None = None
        self._outboxes: dict[bytes, Outbox] = {}
        self._asks: dict[tuple[bytes, str], tuple[Any, asyncio.Task[None]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def bind(self) -> None:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable/full peers raise instead of dropping
        sock.setsockopt(zmq.MAXMSGSIZE, HARD_FRAME_LIMIT)
        sock.setsockopt(zmq.LINGER, 0)
        if self.endpoint.startswith("ipc://"):
            path = self.endpoint[len("ipc://"):]
            if os.path.exists(path):  # a stale socket of a daemon that died; we hold the pid lock
                os.unlink(path)
        sock.bind(self.endpoint)
        self._sock = sock
        if self.tcp is not None:
            self._authenticator = bind_tcp(self._ctx, sock, self.tcp)

    async def serve(self) -> None:
        assert self._sock is not None, "bind() first"
        while True:
            ident, *frames = await self._sock.recv_multipart(copy=True)
            outbox = self._outboxes.get(ident) or self._outboxes.setdefault(ident, Outbox(self._sock, ident))
            try:
                self._dispatch(ident, outbox, protocol.parse_request(frames))
            except ProtocolError as exc:
                log.info("bad request from client %s: %s", ident.hex(), exc.message)
                self._reply_soon(ident, outbox, protocol.error_reply(exc))

    def _dispatch(self, ident: bytes, outbox: Outbox, request: dict[str, Any]) -> None:
        rid, type_ = request["id"], request["type"]
        if type_ == "ping":
            self._reply_soon(ident, outbox, protocol.reply(rid, "pong", final=True, **self.app.pong()))
        elif type_ == "status":
            self._spawn(self._report(ident, outbox, rid, type_, self.app.status()))
        elif type_ == "stats":
            self._spawn(self._report(ident, outbox, rid, type_, self.app.stats()))
        elif type_ == "memory":
            self._spawn(self._report(ident, outbox, rid, type_, self.app.memory_op(request)))
        elif type_ == "rate":
            self._spawn(self._report(ident, outbox, rid, "rated", self.app.rate(request)))
        elif type_ == "learn":
            self._spawn(self._report(ident, outbox, rid, type_, self.app.learn(request)))
        elif type_ == "hint":
            self._spawn(self._report(ident, outbox, rid, type_, self.app.hint(request)))
        elif type_ == "models":
            self._spawn(self._report(ident, outbox, rid, type_, self.app.models_op(request)))
        elif type_ == "cancel":
            entry = self._asks.get((ident, request["target"]))
            if entry:
                self.app.cancel_ask(entry[0])
            self._reply_soon(ident, outbox, protocol.reply(rid, "ack", final=True, target=request["target"], found=bool(entry)))
        elif type_ == "ask":
            if (ident, rid) in self._asks:
                raise ProtocolError("duplicate_id", f"an ask with id {rid!r} is still running on this connection", rid)
            ask = self.app.new_ask(request)
            task = self._spawn(self._ask(ident, outbox, rid, ask))
            self._asks[(ident, rid)] = (ask, task)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _reply_soon(self, ident: bytes, outbox: Outbox, payload: bytes) -> None:
        async def send() -> None:
            try:
                await outbox.send(payload)
            except PeerGone:
                pass
            self._forget_if_idle(ident)

        self._spawn(send())

    async def _report(self, ident: bytes, outbox: Outbox, rid: str, kind: str, result: Awaitable[dict[str, Any]]) -> None:
        """Answer a one-reply request (status, stats, memory) with a reply of the same name."""
        try:
            payload = protocol.reply(rid, kind, final=True, **await result)
        except ProtocolError as exc:
            payload = protocol.error_reply(exc)
        except Exception as exc:
            log.exception("%s failed", kind)
            payload = protocol.error_reply(ProtocolError("internal", f"{kind} failed: {exc}", rid))
        self._reply_soon(ident, outbox, payload)

    async def _ask(self, ident: bytes, outbox: Outbox, rid: str, ask: Any) -> None:
        async def emit(event: str, final: bool = False, **fields: Any) -> None:
            await outbox.send(protocol.reply(rid, event, final, **fields))

        try:
            await self.app.run_ask(ask, emit)
        except PeerGone:
            log.info("client %s went away; its ask %s was cancelled", ident.hex(), rid)
        except asyncio.CancelledError:
            outbox.send_nowait(protocol.error_reply(ProtocolError("shutting_down", "the daemon is shutting down", rid)))
            raise
        except Exception as exc:
            log.exception("ask %s failed", rid)
            outbox.send_nowait(protocol.error_reply(ProtocolError("internal", f"internal error: {exc}", rid)))
        finally:
            self._asks.pop((ident, rid), None)
            self._forget_if_idle(ident)

    def _forget_if_idle(self, ident: bytes) -> None:
        outbox = self._outboxes.get(ident)
        if outbox and outbox.idle and not any(key[0] == ident for key in self._asks):
            del self._outboxes[ident]

    async def close(self) -> None:
        """Stop serving: running asks end with a ``shutting_down`` error; the socket file goes."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()  # its socket must be closed before the context can end
        self._ctx.term()
        if self.endpoint.startswith("ipc://"):
            try:
                os.unlink(self.endpoint[len("ipc://"):])
            except FileNotFoundError:
                pass
