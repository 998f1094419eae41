"""Which daemon the client talks to, and with which CurveZMQ keys when it runs on another machine.

The local daemon is reached over its ipc socket, no keys involved. A remote one (``mirador
--connect tcp://HOST:PORT``, else ``MIRADOR_CONNECT``, else ``[client] connect`` in the user's
mirador.toml) only over CurveZMQ: the client presents the daemon's public key (``[client]
server_key``, else the file ``keys/server.key``) and its own key pair (``keys/client.key`` and
``client.key_secret``). The user's mirador.toml is read with tomllib here rather than through
``mirador.runtime``'s config, which would drag the daemon's imports into the thin client.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from typing import Any

from . import keys
from .errors import KeyFileError, MiradorError
from .paths import Paths

CONFIG_FILE = "mirador.toml"
_TCP = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d{1,5})")


@dataclass(frozen=True)
class Credentials:
    """What a CurveZMQ client presents: the daemon's public key and its own key pair (z85)."""

    server_key: bytes
    public: bytes
    secret: bytes
    server_key_from: str = "given by the caller"  # for error messages: where to look when it is wrong


def is_tcp_endpoint(text: str) -> bool:
    """``tcp://HOST:PORT`` (HOST a name, an address, ``[IPv6]`` or ``*``; PORT 1..65535)."""
    match = _TCP.fullmatch(text)
    return bool(match) and 1 <= int(match.group(2)) <= 65535


def client_settings(paths: Paths) -> dict[str, Any]:
    """The ``[client]`` table of the user's mirador.toml (empty when there is none)."""
    path = paths.config / CONFIG_FILE
    try:
        table = tomllib.loads(path.read_text()).get("client", {})
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise MiradorError(f"{path}: {exc}") from None
    if not isinstance(table, dict):
        raise MiradorError(f"{path}: `client` must be a table ([client])")
    return table


def remote_endpoint(paths: Paths, explicit: str | None = None, env: dict[str, str] | None = None) -> str | None:
    """The remote daemon's TCP endpoint, or None to use the local daemon."""
    env = os.environ if env is None else env
    endpoint = explicit or env.get("MIRADOR_CONNECT") or client_settings(paths).get("connect") or None
    if endpoint is not None and not is_tcp_endpoint(str(endpoint)):
        raise MiradorError(f"cannot connect to {endpoint!r}: a remote daemon is given as tcp://HOST:PORT "
                           "(--connect, MIRADOR_CONNECT or [client] connect)")
    return endpoint


def credentials(paths: Paths) -> Credentials:
    """This client's CurveZMQ credentials from the config dir, or a KeyFileError saying what to copy where."""
    config_file = paths.config / CONFIG_FILE
    directory = keys.keys_dir(paths)
    configured = client_settings(paths).get("server_key")
    if configured:
        if not keys.is_key(str(configured)):
            raise KeyFileError(f"[client] server_key in {config_file} is not a z85 CurveZMQ key (40 characters); "
                               "`mirador keys show` on the daemon's machine prints the right one")
        server_key, source = str(configured).encode(), f"[client] server_key in {config_file}"
    else:
        path = directory / f"{keys.SERVER}.key"
        if not path.exists():
            raise KeyFileError(
                f"to connect over TCP this client needs the daemon's public key: copy keys/server.key from the "
                f"daemon machine's config dir to {path}, or set [client] server_key in {config_file} "
                "(`mirador keys show` on the daemon's machine prints it)")
        server_key, source = keys.read_key(path), str(path)
    if not (directory / f"{keys.CLIENT}.key_secret").exists():
        raise KeyFileError(
            f"this client has no key pair in {directory}: copy client.key and client.key_secret there from the "
            "daemon machine's config dir, where `mirador keys init` made them")
    pair = keys.load_pair(paths, keys.CLIENT)
    return Credentials(server_key, pair.public, pair.secret, source)
