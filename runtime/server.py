"""The daemon's ZeroMQ front door: one ROUTER socket, many concurrent clients; no reply is dropped
for a client that reads, and one that stops reading is dropped past an allowance (see Outbox).

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
from .config_schema import DaemonSection

log = logging.getLogger("mirador.server")

# ZeroMQ's own queue for each client counts messages, not bytes: keep it short, so that what
# waits for a slow client waits in its Outbox, counted in bytes against [daemon] client_buffer_mb.
SEND_HWM = 100

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
    async def jobs_op(self, request: dict[str, Any]) -> dict[str, Any]: ...  # raises ProtocolError
    async def cache_op(self, request: dict[str, Any]) -> dict[str, Any]: ...  # raises ProtocolError
    async def train_op(self, request: dict[str, Any]) -> dict[str, Any]: ...  # raises ProtocolError
    async def models_op(self, request: dict[str, Any]) -> dict[str, Any]: ...  # raises ProtocolError
    def new_ask(self, request: dict[str, Any], client: bytes) -> Any: ...  # raises ProtocolError (``busy`` too)
    async def run_ask(self, ask: Any, emit: Emit) -> None: ...
    def cancel_ask(self, ask: Any) -> None: ...


class Outbox:
    """Replies to one client, in order; sending never waits for the client.

    The fast path sends at once. When the client's ZeroMQ queue is full (zmq.Again under
    ROUTER_MANDATORY), replies wait here and a drainer retries with backoff. ``send`` itself
    never blocks, so a slow client is never counted in a stage's time (the model answers at its
    own speed, and turns to the next question). A client that reads nothing costs bounded
    memory: once more than ``max_bytes`` wait here, or none has gone out for ``stall_s`` while
    some wait, the client is dropped: its replies are freed, ``on_drop`` runs (the server cancels
    its asks, so the model generates nothing more for it) and every later send raises PeerGone.
    """

    def __init__(self, sock: zmq.asyncio.Socket, ident: bytes, max_bytes: int = 16 << 20, stall_s: float = 30.0,
                 on_drop: Callable[[str], None] | None = None):
        self._sock, self._ident = sock, ident
        self.max_bytes, self.stall_s, self._on_drop = max_bytes, stall_s, on_drop
        self._queue: deque[bytes] = deque()
        self.queued_bytes = 0
        self._since = 0.0  # loop time of the last reply that went out, or when replies began to wait
        self._drainer: asyncio.Task[None] | None = None
        self.gone = False
        self.dropped: str | None = None  # why the daemon dropped the client, if it did

    @property
    def idle(self) -> bool:
        return not self._queue

    async def send(self, payload: bytes) -> None:
        if self.gone:
            raise PeerGone()
        if not self._queue:
            if self._try_send(payload):
                return
            self._since = asyncio.get_running_loop().time()  # the first to wait: the stall clock starts
        self._queue.append(payload)
        self.queued_bytes += len(payload)
        if self.queued_bytes > self.max_bytes:
            self._drop(f"{self.queued_bytes} bytes of replies waited for it ([daemon] client_buffer_mb)")
            raise PeerGone()
        if self._drainer is None:
            self._drainer = asyncio.create_task(self._drain())

    def send_nowait(self, payload: bytes) -> None:
        """Best effort, for the last words of a shutting-down daemon."""
        if not self.gone and not self._queue:
            self._try_send(payload)

    def _drop(self, why: str) -> None:
        """Forget the client's replies; later sends raise PeerGone."""
        self.gone, self.dropped = True, why
        self._queue.clear()
        self.queued_bytes = 0
        if self._on_drop is not None:
            self._on_drop(why)

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
            self._drop("it disconnected")
            raise PeerGone() from None

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.001
        try:
            while self._queue:
                if self._try_send(self._queue[0]):
                    self.queued_bytes -= len(self._queue.popleft())
                    self._since = loop.time()
                    delay = 0.001
                elif loop.time() - self._since > self.stall_s:
                    self._drop(f"it read nothing for {self.stall_s:g} s with {self.queued_bytes} bytes of replies "
                               "waiting ([daemon] client_stall_s)")
                else:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.05)
        except PeerGone:
            pass
        finally:
            self._drainer = None


class Server:
    def __init__(self, endpoint: str, app: App, tcp: TcpAccess | None = None, limits: DaemonSection = DaemonSection()):
        self.endpoint = endpoint  # the ipc socket
        self.app = app
        self.tcp = tcp  # also a TCP endpoint, for CurveZMQ clients only (see access.py)
        self.limits = limits
        self.dropped = 0  # clients dropped for reading nothing
        self._ctx = zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self._authenticator: AsyncioAuthenticator | None = None
        self._outboxes: dict[bytes, Outbox] = {}
        self._asks: dict[tuple[bytes, str], tuple[Any, asyncio.Task[None]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def bind(self) -> None:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable/full peers raise instead of dropping
        sock.setsockopt(zmq.SNDHWM, SEND_HWM)
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
            outbox = self._outboxes.get(ident) or self._outbox(ident)
            try:
                self._dispatch(ident, outbox, protocol.parse_request(frames))
            except ProtocolError as exc:
                log.info("%s from client %s: %s", "refused (busy)" if exc.code == "busy" else "bad request",
                         ident.hex(), exc.message)
                self._reply_soon(ident, outbox, protocol.error_reply(exc))

    def _outbox(self, ident: bytes) -> Outbox:
        assert self._sock is not None
        outbox = Outbox(self._sock, ident, int(self.limits.client_buffer_mb * 2**20), self.limits.client_stall_s,
                        on_drop=lambda why: self._dropped(ident, why))
        self._outboxes[ident] = outbox
        return outbox

    def _dropped(self, ident: bytes, why: str) -> None:
        """A client went away or was dropped: stop everything it asked for."""
        if why != "it disconnected":
            self.dropped += 1
            log.warning("client %s dropped: %s; its asks are cancelled", ident.hex(), why)
        for (owner, _), (ask, _) in list(self._asks.items()):
            if owner == ident:
                self.app.cancel_ask(ask)

    def clients(self) -> dict[str, Any]:
        """The clients with replies or asks in the daemon, and what waits for them (for ``status``)."""
        return {"connected": len(self._outboxes), "queued_bytes": sum(o.queued_bytes for o in self._outboxes.values()),
                "dropped": self.dropped, "buffer_bytes": int(self.limits.client_buffer_mb * 2**20),
                "stall_s": self.limits.client_stall_s}

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
        elif type_ == "jobs":
            self._spawn(self._report(ident, outbox, rid, type_, self.app.jobs_op(request)))
        elif type_ == "train":
            self._spawn(self._report(ident, outbox, rid, type_, self.app.train_op(request)))
        elif type_ == "cache":
            self._spawn(self._report(ident, outbox, rid, type_, self.app.cache_op(request)))
        elif type_ == "cancel":
            entry = self._asks.get((ident, request["target"]))
            if entry:
                self.app.cancel_ask(entry[0])
            self._reply_soon(ident, outbox, protocol.reply(rid, "ack", final=True, target=request["target"], found=bool(entry)))
        elif type_ == "ask":
            if (ident, rid) in self._asks:
                raise ProtocolError("duplicate_id", f"an ask with id {rid!r} is still running on this connection", rid)
            ask = self.app.new_ask(request, ident)
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
