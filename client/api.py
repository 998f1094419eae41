"""The Python API: ``Client`` and its asyncio twin ``AsyncClient``.

Both speak the protocol in ``mirador.client.protocol`` over one DEALER socket. ``ask`` yields
reply events as dicts (the same objects ``mirador ask --json`` prints), each with ``t``: seconds
since the request was sent, measured here, as the user sees it.

Errors: an ``error`` reply that ends a request raises a ``ResponseError`` subclass (see
``mirador.client.errors``); the one exception is ``ask``, whose stage errors that the answer
survives, and a failure to store the finished exchange, are events like the others.

One connection carries many requests at once. Replies are routed to their request by ``id``;
replies to a request nobody will read any more (a loop left early, a call that timed out) are
dropped as they come, never kept.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import deque
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from . import ownership, protocol, remote
from .errors import AccessDenied, DaemonNotRunning, MiradorError, NoReply, ResponseError, response_error
from .paths import Paths

DEFAULT_IDLE_TIMEOUT = 300.0  # an ask may wait this long for the next event before giving up
# After ``done``, how long ``ask`` waits for ``remembered`` (the exchange is on disk, ~0.3 s
# here) or the error saying it could not be stored, before raising NoReply.
DEFAULT_REMEMBER_TIMEOUT = 30.0


# A CURVE client that the daemon refuses hears nothing on its socket: the refusal shows only as
# an event on the socket's monitor.
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
_TCP_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL \
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL


class _Inbox:
    """The replies that arrived for one open request and were not read yet."""

    def __init__(self) -> None:
        self.sent_at = time.perf_counter()
        self.replies: deque[dict[str, Any]] = deque()

    def put(self, item: dict[str, Any] | BaseException) -> None:
        self.replies.append(item)  # type: ignore[arg-type]


class _AsyncInbox(_Inbox):
    def __init__(self) -> None:
        super().__init__()
        self.queue: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()

    def put(self, item: dict[str, Any] | BaseException) -> None:
        self.queue.put_nowait(item)


class _Requests:
    """What both clients share: request ids, routing replies to the open requests."""

    _ids = itertools.count(1)

    def __init__(self, endpoint: str | None, curve: remote.Credentials | None):
        paths = Paths.from_env()
        self.endpoint = endpoint or remote.remote_endpoint(paths) or paths.endpoint
        # A TCP endpoint is always CurveZMQ: the daemon accepts nothing else there.
        self.curve = curve or (remote.credentials(paths) if self.endpoint.startswith("tcp://") else None)
        self._connected = False  # over TCP: whether the connection was accepted at all
        # Requests whose replies someone will read. A reply for any other id (a request given
        # up, a cancel's ack) is dropped: nothing else is kept, so nothing grows.
        self._open: dict[str, _Inbox] = {}
        self._prefix = f"{os.getpid():x}-{id(self):x}-"

    def _new_id(self) -> str:
        return f"{self._prefix}{next(self._ids)}"

    def _deliver(self, payload: bytes) -> None:
        """Hand one reply to its request's inbox, or drop it if nobody reads that request."""
        try:
            event = protocol.decode_event(payload)
        except Exception as exc:  # a daemon of another protocol, or garbage on the socket
            raise ResponseError("bad_reply", f"the daemon at {self.endpoint} sent a frame that is not a Mirador "
                                f"reply ({exc}); is it a miradord of this version?") from None
        inbox = self._open.get(event.get("id"))  # type: ignore[arg-type]
        if inbox is not None:
            event["t"] = round(time.perf_counter() - inbox.sent_at, 6)
            inbox.put(event)

    def _cancel_frame(self, target: str) -> bytes:
        return protocol.request("cancel", self._new_id(), target=target)  # its ack is not waited for: dropped

    def _no_reply(self, answered: bool, timeout: float) -> NoReply:
        if answered:
            return NoReply(f"the daemon did not confirm within {timeout:g} s that it stored this exchange; "
                           "`mirador memory list` shows whether it did")
        return NoReply(f"the daemon sent nothing for {timeout:.0f} s; see `mirador status`")

    def _check_monitor(self, message: list[bytes]) -> None:
        event = parse_monitor_message(message)["event"]
        if event == zmq.EVENT_CONNECTED:
            self._connected = True
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            assert self.curve is not None
            raise AccessDenied(
                f"the daemon at {self.endpoint} refused this client: its public key {self.curve.public.decode()} is "
                "not in the daemon's authorized_keys. On the daemon's machine, add that key as a line of "
                "authorized_keys in Mirador's config dir (`mirador keys show` there lists the file and the keys), "
                "or copy the client.key and client.key_secret that `mirador keys init` made there into "
                f"{Paths.from_env().config / 'keys'} here"
            )
        elif event in _HANDSHAKE_FAILED:
            assert self.curve is not None
            raise AccessDenied(
                f"the CurveZMQ handshake with {self.endpoint} failed: the daemon public key this client uses "
                f"({self.curve.server_key_from}) is not that daemon's (`mirador keys show` on its machine prints "
                "the right one), or what listens there is not a miradord started with --listen"
            )
        elif event == zmq.EVENT_DISCONNECTED:
            where = "in the daemon's log on its machine" if self.curve else f"in {Paths.from_env().logfile}"
            raise DaemonNotRunning(f"the daemon closed the connection (it stopped or crashed); see {where}")

    def _not_running(self) -> DaemonNotRunning:
        if self.curve is None:
            return DaemonNotRunning(
                f"no Mirador daemon answers at {self.endpoint}; start one with `mirador daemon start` (or run `miradord`)"
            )
        if self._connected:
            return DaemonNotRunning(f"the daemon at {self.endpoint} accepted the connection but did not answer in time")
        return DaemonNotRunning(
            f"nothing accepts connections at {self.endpoint}: is miradord running there with "
            "`--listen` (or [daemon] listen) on that address and port, and does no firewall block it?"
        )

    @staticmethod
    def _hint_fields(text: str, session: str | None, memory: bool) -> dict[str, Any]:
        return {"text": text, **({"session": session} if session else {}), **({} if memory else {"memory": False})}

    @staticmethod
    def _ask_fields(text: str, stages: list[str] | None, sequential: bool, chain: str | None,
                    session: str | None, memory: bool, options: dict[str, Any]) -> dict[str, Any]:
        fields: dict[str, Any] = {"text": text}
        if session:
            fields["session"] = session
        if not memory:
            fields["memory"] = False
        if stages:
            fields["stages"] = list(stages)
        if sequential:
            fields["sequential"] = True
        if chain:
            fields["chain"] = chain
        opts = {k: v for k, v in options.items() if v is not None}
        if opts:
            fields["options"] = opts
        return fields


def _socket(ctx: zmq.Context, endpoint: str, curve: remote.Credentials | None) -> tuple[zmq.Socket, zmq.Socket]:
    """A DEALER connected to the daemon, and a monitor that reports when the daemon goes away
    (and, over TCP, whether the daemon accepted this client)."""
    if endpoint.startswith("ipc://"):  # never talk to a socket another user planted
        ownership.check_daemon_socket(Path(endpoint[len("ipc://"):]))
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    events = zmq.EVENT_DISCONNECTED
    if curve is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve.server_key, curve.public, curve.secret
        events |= _TCP_EVENTS
    monitor = sock.get_monitor_socket(events)
    sock.connect(endpoint)
    return sock, monitor


def _check_ask_event(event: dict[str, Any], answered: bool) -> None:
    """An ``error`` that ends an ask before its answer (a bad request, an unknown stage, the
    daemon shutting down) raises; a stage's error and a failed store after ``done`` are events."""
    if event.get("event") == "error" and event.get("final") and not answered:
        raise response_error(event)


class Client(_Requests):
    """Blocking client. ``with Client() as c: for event in c.ask("..."): ...``

    ``endpoint`` defaults to MIRADOR_CONNECT, then ``[client] connect`` in the user's
    mirador.toml, then the local daemon's socket. A ``tcp://`` endpoint uses CurveZMQ with
    ``curve``, by default the keys in the config dir (see ``mirador.client.remote``).
    One thread at a time (ZeroMQ sockets are not thread-safe); several ``ask`` iterators may be
    read in turn: replies that arrive for one while another is read wait for it.
    """

    def __init__(self, endpoint: str | None = None, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 curve: remote.Credentials | None = None):
        super().__init__(endpoint, curve)
        self.idle_timeout = idle_timeout
        self._sock, self._monitor = _socket(zmq.Context.instance(), self.endpoint, self.curve)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._open.clear()
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)

    def _send(self, type_: str, **fields: Any) -> str:
        rid = self._new_id()
        self._open[rid] = _Inbox()
        try:
            self._sock.send(protocol.request(type_, rid, **fields))
        except BaseException:
            self._open.pop(rid, None)
            raise
        return rid

    def _next(self, rid: str, timeout: float) -> dict[str, Any]:
        """The next reply to ``rid``; replies to other open requests that come meanwhile wait in
        their inboxes. Raises TimeoutError after ``timeout`` seconds without one."""
        inbox = self._open[rid]
        deadline = time.monotonic() + timeout
        while not inbox.replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(timeout)
            ready = dict(self._poller.poll(left * 1000))
            if self._monitor in ready:
                self._check_monitor(self._monitor.recv_multipart())
            if self._sock in ready:
                self._deliver(self._sock.recv())
        return inbox.replies.popleft()

    def _call(self, type_: str, timeout: float, **fields: Any) -> dict[str, Any]:
        """Send one request and return its final reply; an ``error`` reply raises."""
        rid = self._send(type_, **fields)
        try:
            event = self._next(rid, timeout)
            while not event.get("final"):
                event = self._next(rid, timeout)
        except TimeoutError:
            raise self._not_running() from None
        finally:
            self._open.pop(rid, None)  # a late reply is dropped
        if event.get("event") == "error":
            raise response_error(event)
        return event

    def ping(self, timeout: float = 2.0) -> dict[str, Any]:
        """The daemon's ``pong``; raises DaemonNotRunning if none comes within ``timeout``."""
        return self._call("ping", timeout)

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        return self._call("status", timeout)

    def stats(self, timeout: float = 30.0) -> dict[str, Any]:
        return self._call("stats", timeout)

    def memory(self, op: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        """A memory control: list, search (query=), show/forget (target=, or targets=[ids] for
        forget), forget_all, export, import (records=)."""
        return self._call("memory", timeout, op=op, **fields)

    def rate(self, score: int, query_id: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
        """Rate an answer 1-5 (default: the last one); the learner uses it to pick plans."""
        return self._call("rate", timeout, score=score, **({"query_id": query_id} if query_id else {}))

    def learn(self, op: str = "stats", timeout: float = 10.0) -> dict[str, Any]:
        return self._call("learn", timeout, op=op)

    def cancel(self, target: str, timeout: float = 5.0) -> dict[str, Any]:
        return self._call("cancel", timeout, target=target)

    def hint(self, text: str, session: str | None = None, memory: bool = True, timeout: float = 10.0) -> dict[str, Any]:
        """What the user has typed so far: the daemon starts loading the models it will need and
        prefilling the prompt it will have (a background job; not for ``memory=False``, incognito)."""
        return self._call("hint", timeout, **self._hint_fields(text, session, memory))

    def jobs(self, timeout: float = 10.0) -> dict[str, Any]:
        """Background jobs, running and recent, and whether they may run now."""
        return self._call("jobs", timeout, op="list")

    def cancel_job(self, job_id: str, timeout: float = 10.0) -> dict[str, Any]:
        return self._call("jobs", timeout, op="cancel", target=job_id)

    def cache(self, op: str = "stats", timeout: float = 30.0) -> dict[str, Any]:
        """The answer cache: list | clear | stats."""
        return self._call("cache", timeout, op=op)

    def train(self, op: str = "status", timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        """LoRA training: status | data | run (wait=True: until the run ends) | history |
        rollback (version=N) | off; model=NAME for a model other than the first trainable one."""
        return self._call("train", timeout, op=op, **{k: v for k, v in fields.items() if v is not None})

    def models(self, op: str, name: str | None = None, timeout: float = 300.0) -> dict[str, Any]:
        """list | ps | load NAME | unload NAME (a load can take a while: a large model from disk)."""
        return self._call("models", timeout, op=op, **({"name": name} if name else {}))

    def ask(
        self,
        text: str,
        stages: list[str] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        sequential: bool = False,
        chain: str | None = None,
        session: str | None = None,
        memory: bool = True,
        remember_timeout: float = DEFAULT_REMEMBER_TIMEOUT,
        seed: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Stream the events of one question; closing the iterator before ``done`` cancels it.
        ``memory=False`` is incognito: nothing is recalled or stored.

        After ``done`` come ``remembered`` (the exchange is on disk) or an ``error`` with code
        ``memory_unavailable`` (it could not be stored; the message says why), waited for at most
        ``remember_timeout`` seconds (then NoReply). Leaving the loop at ``done`` is fine.
        Raises a ResponseError subclass when the question cannot be answered at all."""
        fields = self._ask_fields(text, stages, sequential, chain, session, memory,
                                  {"max_tokens": max_tokens, "temperature": temperature, "seed": seed})
        rid = self._send("ask", **fields)
        answered = over = False  # answered: `done` came, nothing is left to cancel
        try:
            while not over:
                timeout = remember_timeout if answered else self.idle_timeout
                try:
                    event = self._next(rid, timeout)
                except TimeoutError:
                    raise self._no_reply(answered, timeout) from None
                over = bool(event.get("final"))
                answered = answered or event.get("event") == "done"
                _check_ask_event(event, answered)
                yield event
        finally:
            self._open.pop(rid, None)  # replies still to come are dropped
            if not (answered or over):
                try:  # a daemon that went away cannot take it: never block on it
                    self._sock.send(self._cancel_frame(rid), flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass


class AsyncClient(_Requests):
    """The asyncio twin of ``Client``: same methods, awaited; ``ask`` is an async iterator.

    Any number of tasks may use one AsyncClient at once: a reader task owns the receiving side
    of the socket and routes every reply to the queue of its request.
    """

    def __init__(self, endpoint: str | None = None, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 curve: remote.Credentials | None = None):
        super().__init__(endpoint, curve)
        self.idle_timeout = idle_timeout
        self._sock, self._monitor = _socket(zmq.asyncio.Context.instance(), self.endpoint, self.curve)
        self._poller = zmq.asyncio.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close, once the reader has stopped (prefer this to ``close`` inside a running loop)."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        self.close()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self._broadcast(MiradorError("the client was closed while this request was open"))
        self._open.clear()
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)

    def _broadcast(self, exc: BaseException) -> None:
        for inbox in list(self._open.values()):
            inbox.put(exc)

    async def _read(self) -> None:
        """Route every reply to its request. A failure of the connection (the daemon went away,
        a refused key, an unreadable frame) goes to every open request; reading goes on, since
        ZeroMQ reconnects by itself."""
        try:
            while True:
                ready = dict(await self._poller.poll())
                try:
                    if self._monitor in ready:
                        self._check_monitor(await self._monitor.recv_multipart())
                    if self._sock in ready:
                        self._deliver(await self._sock.recv())
                except MiradorError as exc:
                    self._broadcast(exc)
        except zmq.ZMQError as exc:  # the socket itself failed (closed under us)
            self._broadcast(MiradorError(f"the connection to {self.endpoint} failed: {exc}"))

    async def _send(self, type_: str, **fields: Any) -> str:
        rid = self._new_id()
        self._open[rid] = _AsyncInbox()
        loop = asyncio.get_running_loop()
        if self._reader is None or self._reader.done() or self._reader.get_loop() is not loop:  # a new asyncio.run
            self._reader = loop.create_task(self._read())
        try:
            await self._sock.send(protocol.request(type_, rid, **fields))
        except BaseException:
            self._open.pop(rid, None)
            raise
        return rid

    async def _next(self, rid: str, timeout: float) -> dict[str, Any]:
        inbox = self._open[rid]
        assert isinstance(inbox, _AsyncInbox)
        item = await asyncio.wait_for(inbox.queue.get(), timeout)  # TimeoutError after `timeout`
        if isinstance(item, BaseException):
            raise item
        return item

    async def _call(self, type_: str, timeout: float, **fields: Any) -> dict[str, Any]:
        rid = await self._send(type_, **fields)
        try:
            event = await self._next(rid, timeout)
            while not event.get("final"):
                event = await self._next(rid, timeout)
        except TimeoutError:
            raise self._not_running() from None
        finally:
            self._open.pop(rid, None)
        if event.get("event") == "error":
            raise response_error(event)
        return event

    async def ping(self, timeout: float = 2.0) -> dict[str, Any]:
        return await self._call("ping", timeout)

    async def status(self, timeout: float = 10.0) -> dict[str, Any]:
        return await self._call("status", timeout)

    async def stats(self, timeout: float = 30.0) -> dict[str, Any]:
        return await self._call("stats", timeout)

    async def memory(self, op: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        return await self._call("memory", timeout, op=op, **fields)

    async def rate(self, score: int, query_id: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
        return await self._call("rate", timeout, score=score, **({"query_id": query_id} if query_id else {}))

    async def learn(self, op: str = "stats", timeout: float = 10.0) -> dict[str, Any]:
        return await self._call("learn", timeout, op=op)

    async def cancel(self, target: str, timeout: float = 5.0) -> dict[str, Any]:
        return await self._call("cancel", timeout, target=target)

    async def hint(self, text: str, session: str | None = None, memory: bool = True, timeout: float = 10.0) -> dict[str, Any]:
        return await self._call("hint", timeout, **self._hint_fields(text, session, memory))

    async def jobs(self, timeout: float = 10.0) -> dict[str, Any]:
        return await self._call("jobs", timeout, op="list")

    async def cancel_job(self, job_id: str, timeout: float = 10.0) -> dict[str, Any]:
        return await self._call("jobs", timeout, op="cancel", target=job_id)

    async def cache(self, op: str = "stats", timeout: float = 30.0) -> dict[str, Any]:
        return await self._call("cache", timeout, op=op)

    async def train(self, op: str = "status", timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        return await self._call("train", timeout, op=op, **{k: v for k, v in fields.items() if v is not None})

    async def models(self, op: str, name: str | None = None, timeout: float = 300.0) -> dict[str, Any]:
        return await self._call("models", timeout, op=op, **({"name": name} if name else {}))

    async def ask(
        self,
        text: str,
        stages: list[str] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        sequential: bool = False,
        chain: str | None = None,
        session: str | None = None,
        memory: bool = True,
        remember_timeout: float = DEFAULT_REMEMBER_TIMEOUT,
        seed: int | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """As ``Client.ask``."""
        fields = self._ask_fields(text, stages, sequential, chain, session, memory,
                                  {"max_tokens": max_tokens, "temperature": temperature, "seed": seed})
        rid = await self._send("ask", **fields)
        answered = over = False
        try:
            while not over:
                timeout = remember_timeout if answered else self.idle_timeout
                try:
                    event = await self._next(rid, timeout)
                except TimeoutError:
                    raise self._no_reply(answered, timeout) from None
                over = bool(event.get("final"))
                answered = answered or event.get("event") == "done"
                _check_ask_event(event, answered)
                yield event
        finally:
            self._open.pop(rid, None)
            if not (answered or over):
                try:
                    await self._sock.send(self._cancel_frame(rid), flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
