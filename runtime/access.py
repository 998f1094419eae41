"""Remote access: the daemon's optional TCP endpoint, open only to authorized CurveZMQ clients.

The ipc socket stays the only way in by default (its directory is owner-only). With
``miradord --listen tcp://HOST:PORT`` (or ``[daemon] listen``) the same ROUTER socket also binds
that TCP endpoint, and only there the CURVE mechanism is required: libzmq copies a socket's
options into each listener when it binds, so the ipc listener, bound first, keeps the NULL
mechanism. Each TCP handshake is checked by a ZAP handler (pyzmq's AsyncioAuthenticator, on the
daemon's event loop) against the public keys in authorized_keys, read again at every handshake
so that adding or removing a key needs no restart.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from mirador.client import keys
from mirador.client.errors import MiradorError, UnsafePath
from mirador.client.paths import Paths
from mirador.client.remote import is_tcp_endpoint

from .config import ConfigError

log = logging.getLogger("mirador.access")

ZAP_DOMAIN = b"mirador"


@dataclass(frozen=True)
class TcpAccess:
    """The TCP endpoint to bind, the daemon's key pair, and where the authorized client keys are."""

    endpoint: str
    server: keys.KeyPair
    authorized_keys: Path

    @classmethod
    def load(cls, endpoint: str, paths: Paths) -> "TcpAccess":
        """Check the endpoint and read the daemon's keys; a ConfigError says what to fix."""
        if not is_tcp_endpoint(endpoint):
            raise ConfigError(f"--listen / daemon.listen must be tcp://HOST:PORT (e.g. tcp://0.0.0.0:7755), not {endpoint!r}")
        try:
            server = keys.load_pair(paths, keys.SERVER)
        except MiradorError as exc:  # missing, malformed, or another user's (UnsafePath)
            raise ConfigError(f"listening on {endpoint} needs the daemon's CurveZMQ key pair: {exc}") from None
        authorized = keys.authorized_keys_path(paths)
        try:
            keys.read_authorized(authorized)  # checked now too: it is read again at every handshake
        except UnsafePath as exc:
            raise ConfigError(str(exc)) from None
        return cls(endpoint, server, authorized)


class AuthorizedKeys:
    """The ZAP credentials provider: a client key is accepted while it is listed in the file."""

    def __init__(self, path: Path):
        self.path = path

    def callback(self, domain: str, client_key: bytes) -> bool:
        try:
            allowed, bad_lines = keys.read_authorized(self.path)
        except UnsafePath as exc:  # fail closed: a file another user can change lets nobody in
            log.error("refused a TCP client: %s", exc)
            return False
        for line in bad_lines:
            log.warning("%s: ignoring a line that is not a z85 key: %r", self.path, line[:60])
        if client_key in allowed:
            log.info("TCP client %s… authorized", client_key[:8].decode())
            return True
        log.warning("refused a TCP client: its public key %s is not in %s", client_key.decode(), self.path)
        return False


def bind_tcp(ctx: zmq.asyncio.Context, sock: zmq.Socket, access: TcpAccess) -> AsyncioAuthenticator:
    """Start the ZAP handler, then bind ``access.endpoint`` on ``sock`` for CURVE clients only.

    Call it after every other bind of ``sock``: the CURVE options set here apply to the binds
    that follow. Returns the authenticator, to be stopped after ``sock`` is closed.
    """
    authenticator = AsyncioAuthenticator(ctx)
    authenticator.start()
    authenticator.configure_curve_callback(ZAP_DOMAIN.decode(), AuthorizedKeys(access.authorized_keys))
    sock.curve_server = True
    sock.curve_secretkey = access.server.secret
    sock.zap_domain = ZAP_DOMAIN
    # Fail closed: without this, libzmq lets every CURVE client in when no ZAP handler answers.
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    try:
        sock.bind(access.endpoint)
    except zmq.ZMQError as exc:
        authenticator.stop()
        raise OSError(f"cannot listen on {access.endpoint}: {exc}") from None
    allowed, _ = keys.read_authorized(access.authorized_keys)
    log.info("also listening on %s (CurveZMQ; authorized client keys: %d, in %s)", access.endpoint, len(allowed),
             access.authorized_keys)
    if not allowed:
        log.warning("%s lists no client keys: no TCP client can connect yet (`mirador keys init` adds one)",
                    access.authorized_keys)
    return authenticator
