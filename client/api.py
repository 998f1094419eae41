"""The Python API: ``Client`` and its asyncio twin ``AsyncClient``.

Both speak the protocol in ``mirador.client.protocol`` over one DEALER socket. ``ask`` yields
reply events as dicts (the same objects ``mirador ask --json`` prints), each with ``t``: seconds
since the request was sent, measured here, as the user sees it.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from . import ownership, protocol, remote
from .errors import AccessDenied, DaemonNotRunning, MiradorError
from .paths import Paths

DEFAULT_IDLE_TIMEOUT = 300.0  # an ask may wait this long for the next event before giving up


# A CURVE client that the daemon refuses hears nothing on its socket: the refusal shows only as
# an event on the socket's monitor.
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
_TCP_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL \
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL


class _Requests:
    """What both clients share: request ids, and replies that arrived for another request."""

    _ids = itertools.count(1)

    def __init__(self, endpoint: str | None, curve: remote.Credentials | None):
        paths = Paths.from_env()
        self.endpoint = endpoint or remote.remote_endpoint(paths) or paths.endpoint
        # A TCP endpoint is always CurveZMQ: the daemon accepts nothing else there.
        self.curve = curve or (remote.credentials(paths) if self.endpoint.startswith("tcp://") else None)
        self._connected = False  # over TCP: whether the connection was accepted at all
        self._stash: dict[str, deque[dict[str, Any]]] = defaultdict(deque)
        self._ignored: set[str] = set()  # fire-and-forget requests whose replies nobody reads
        self._prefix = f"{os.getpid():x}-{id(self):x}-"

    def _new_id(self) -> str:
        return f"{self._prefix}{next(self._ids)}"

    def _route(self, payload: bytes, rid: str, sent_at: float) -> dict[str, Any] | None:
        """Decode one reply; return it if it belongs to ``rid``, else keep it for its owner."""
        event = protocol.decode_event(payload)
        event["t"] = round(time.perf_counter() - sent_at, 6)
        owner = event.get("id")
        if owner == rid:
            return event
        if owner in self._ignored:
            if event.get("final"):
                self._ignored.discard(owner)
        else:
            self._stash[owner].append(event)
        return None

    def _cancel_frame(self, target: str) -> bytes:
        rid = self._new_id()
        self._ignored.add(rid)
        return protocol.request("cancel", rid, target=target)

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


class Client(_Requests):
    """Blocking client. ``with Client() as c: for event in c.ask("..."): ...``

    ``endpoint`` defaults to MIRADOR_CONNECT, then ``[client] connect`` in the user's
    mirador.toml, then the local daemon's socket. A ``tcp://`` endpoint uses CurveZMQ with
    ``curve``, by default the keys in the config dir (see ``mirador.client.remote``).
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
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)

    def _send(self, type_: str, **fields: Any) -> tuple[str, float]:
        rid = self._new_id()
        self._sock.send(protocol.request(type_, rid, **fields))
        return rid, time.perf_counter()

    def _replies(self, rid: str, sent_at: float, timeout: float) -> Iterator[dict[str, Any]]:
        """Yield the replies to ``rid`` up to and including its final one."""
        while True:
            stash = self._stash.get(rid)
            if stash:
                event = stash.popleft()
            else:
                ready = dict(self._poller.poll(timeout * 1000))
                if self._monitor in ready:
                    self._check_monitor(self._monitor.recv_multipart())
                if self._sock not in ready:
                    if not ready:
                        raise TimeoutError(timeout)
                    continue
                event = self._route(self._sock.recv(), rid, sent_at)
                if event is None:
                    continue
            yield event
            if event.get("final"):
                self._stash.pop(rid, None)
                return

    def _call(self, type_: str, timeout: float, **fields: Any) -> dict[str, Any]:
        rid, sent_at = self._send(type_, **fields)
        try:
            *_, last = self._replies(rid, sent_at, timeout)
        except TimeoutError:
            raise self._not_running() from None
        return last

    def ping(self, timeout: float = 2.0) -> dict[str, Any]:
        """The daemon's ``pong``; raises DaemonNotRunning if none comes within ``timeout``."""
        return self._call("ping", timeout)

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        return self._call("status", timeout)

    def stats(self, timeout: float = 30.0) -> dict[str, Any]:
        return self._call("stats", timeout)

    def memory(self, op: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        """A memory control: list, search (query=), show/forget (target=), forget_all, export, import (records=)."""
        return self._call("memory", timeout, op=op, **fields)

    def rate(self, score: int, query_id: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
        """Rate an answer 1-5 (default: the last one); the learner uses it to pick plans."""
        return self._call("rate", timeout, score=score, **({"query_id": query_id} if query_id else {}))

    def learn(self, op: str = "stats", timeout: float = 10.0) -> dict[str, Any]:
        return self._call("learn", timeout, op=op)

    def cancel(self, target: str, timeout: float = 5.0) -> dict[str, Any]:
        return self._call("cancel", timeout, target=target)

    def hint(self, text: str, timeout: float = 10.0) -> dict[str, Any]:
        """What the user has typed so far: the daemon starts loading the models it will need."""
        return self._call("hint", timeout, text=text)

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
    ) -> Iterator[dict[str, Any]]:
        """Stream the events of one question; closing the iterator early cancels it.
        ``memory=False`` is incognito: nothing is recalled or stored."""
        fields = self._ask_fields(text, stages, sequential, chain, session, memory,
                                  {"max_tokens": max_tokens, "temperature": temperature})
        rid, sent_at = self._send("ask", **fields)
        finished = False
        try:
            for event in self._replies(rid, sent_at, self.idle_timeout):
                finished = event.get("final", False) or event.get("event") == "done"  # nothing left to cancel
                yield event
        except TimeoutError:
            raise MiradorError(f"the daemon sent nothing for {self.idle_timeout:.0f} s; see `mirador status`") from None
        finally:
            if not finished:
                try:  # a daemon that went away cannot take it: never block on it
                    self._sock.send(self._cancel_frame(rid), flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass


class AsyncClient(_Requests):
    """The asyncio twin of ``Client``: same methods, awaited; ``ask`` is an async iterator."""

    def __init__(self, endpoint: str | None = None, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 curve: remote.Credentials | None = None):
        super().__init__(endpoint, curve)
        self.idle_timeout = idle_timeout
        self._sock, self._monitor = _socket(zmq.asyncio.Context.instance(), self.endpoint, self.curve)
        self._poller = zmq.asyncio.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)

    async def _send(self, type_: str, **fields: Any) -> tuple[str, float]:
        rid = self._new_id()
        await self._sock.send(protocol.request(type_, rid, **fields))
        return rid, time.perf_counter()

    async def _replies(self, rid: str, sent_at: float, timeout: float) -> AsyncIterator[dict[str, Any]]:
        while True:
            stash = self._stash.get(rid)
            if stash:
                event = stash.popleft()
            else:
                ready = dict(await self._poller.poll(timeout * 1000))
                if self._monitor in ready:
                    self._check_monitor(await self._monitor.recv_multipart())
                if self._sock not in ready:
                    if not ready:
                        raise TimeoutError(timeout)
                    continue
                event = self._route(await self._sock.recv(), rid, sent_at)
                if event is None:
                    continue
            yield event
            if event.get("final"):
                self._stash.pop(rid, None)
                return

    async def _call(self, type_: str, timeout: float, **fields: Any) -> dict[str, Any]:
        rid, sent_at = await self._send(type_, **fields)
        last: dict[str, Any] = {}
        try:
            async for last in self._replies(rid, sent_at, timeout):
                pass
        except TimeoutError:
            raise self._not_running() from None
        return last

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

    async def hint(self, text: str, timeout: float = 10.0) -> dict[str, Any]:
        return await self._call("hint", timeout, text=text)

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
    ) -> AsyncIterator[dict[str, Any]]:
        fields = self._ask_fields(text, stages, sequential, chain, session, memory,
                                  {"max_tokens": max_tokens, "temperature": temperature})
        rid, sent_at = await self._send("ask", **fields)
        finished = False
        try:
            async for event in self._replies(rid, sent_at, self.idle_timeout):
                finished = event.get("final", False) or event.get("event") == "done"  # nothing left to cancel
                yield event
        except TimeoutError:
            raise MiradorError(f"the daemon sent nothing for {self.idle_timeout:.0f} s; see `mirador status`") from None
        finally:
            if not finished:
                try:
                    await self._sock.send(self._cancel_frame(rid), flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
