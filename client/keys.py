"""CurveZMQ keys for remote access: the daemon's key pair, a client key pair, authorized_keys.

Everything lives in the config dir (``Paths.config``)::

    keys/             0700
      server.key          the daemon's public key: copy it to every client machine
      server.key_secret   never leaves the daemon's machine
      client.key          a client's public key
      client.key_secret   the client's secret
    authorized_keys   the client public keys the daemon accepts over TCP

Mirador writes every one of them 0600. Each is checked when read (``mirador.client.ownership``):
it must belong to the user and no other user may write it, nor read a secret key.

Every file holds z85 keys (40 characters), one per line; blank lines and ``#`` comments are
ignored, so ``cat`` shows what to copy and a key can be pasted as it is. The client reads its
keys here and the daemon imports this module too (as it does the protocol): no Ray in here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

from . import ownership
from .errors import KeyFileError
from .paths import Paths

KEYS_DIR = "keys"
AUTHORIZED_KEYS = "authorized_keys"
SERVER, CLIENT = "server", "client"

_HEADERS = {
    f"{SERVER}.key": "# The Mirador daemon's CurveZMQ public key. Clients need it: copy this file to their\n"
                     "# <config dir>/keys/server.key, or its key to their [client] server_key.\n",
    f"{SERVER}.key_secret": "# The Mirador daemon's CurveZMQ SECRET key. Keep it on the daemon's machine only.\n",
    f"{CLIENT}.key": "# A Mirador client's CurveZMQ public key. The daemon accepts it when it is a line of\n"
                     "# its authorized_keys.\n",
    f"{CLIENT}.key_secret": "# A Mirador client's CurveZMQ SECRET key: copy it only to the client machine.\n",
    AUTHORIZED_KEYS: "# Client public keys (z85, one per line) that may use this Mirador daemon over TCP\n"
                     "# (miradord --listen). Read at each connection: edits apply at once.\n",
}


@dataclass(frozen=True)
class KeyPair:
    """A CurveZMQ key pair, both halves z85-encoded."""

    public: bytes
    secret: bytes


def keys_dir(paths: Paths) -> Path:
    return paths.config / KEYS_DIR


def authorized_keys_path(paths: Paths) -> Path:
    return paths.config / AUTHORIZED_KEYS


def is_key(text: bytes | str) -> bool:
    """Whether ``text`` is one z85-encoded 32-byte CurveZMQ key."""
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) != 40:
        return False
    try:
        return len(z85.decode(raw)) == 32
    except (ValueError, KeyError, IndexError):  # characters outside the z85 alphabet
        return False


def key_lines(text: str) -> list[str]:
    """The non-blank, non-comment lines of a key file, stripped.

    ``#`` is a z85 character, but the largest 32-bit value encodes as ``%nSc0``: no key starts
    with ``#``, so a line that does is a comment."""
    return [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]


def read_key(path: Path) -> bytes:
    """The one key in ``path``, a file of ours that no other user can write (nor read, for a secret key)."""
    try:
        text = path.read_text()
        ownership.trusted_file(path, "key file", secret=path.name.endswith("_secret"))
    except FileNotFoundError:
        raise KeyFileError(f"{path} does not exist; run `mirador keys init` to create the keys") from None
    lines = key_lines(text)
    if len(lines) != 1 or not is_key(lines[0]):
        raise KeyFileError(f"{path} should hold one z85 CurveZMQ key (40 characters) and nothing else")
    return lines[0].encode()


def load_pair(paths: Paths, name: str) -> KeyPair:
    """The key pair ``name`` (server or client) from the keys dir."""
    base = keys_dir(paths) / name
    try:
        ownership.trusted_dir(base.parent, "the keys directory")
    except FileNotFoundError:
        raise KeyFileError(f"{base.parent} does not exist; run `mirador keys init` to create the keys") from None
    return KeyPair(read_key(base.with_name(f"{name}.key")), read_key(base.with_name(f"{name}.key_secret")))


def read_authorized(path: Path) -> tuple[set[bytes], list[str]]:
    """The valid keys of an authorized_keys file, and the lines that are not keys (to report).

    The file decides who gets in: it must be ours and no other user may write it (UnsafePath)."""
    try:
        lines = key_lines(path.read_text())
        ownership.trusted_file(path, "authorized_keys file")
    except FileNotFoundError:
        return set(), []
    return {line.encode() for line in lines if is_key(line)}, [line for line in lines if not is_key(line)]


def _write(path: Path, text: str, mode: int) -> None:
    """Replace ``path`` in one step (a daemon may be reading authorized_keys), with ``mode`` from
    the start so that a secret is never readable by others, not even for a moment."""
    temporary = path.with_name(path.name + ".new")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(temporary, path)


def init_keys(paths: Paths, force: bool = False) -> tuple[KeyPair, KeyPair]:
    """Create the server and client key pairs and authorize the client key; returns (server, client).

    Existing keys are kept unless ``force``; a replaced client key is removed from
    authorized_keys, so a key that was replaced because it leaked stops working.
    """
    directory = keys_dir(paths)
    names = [f"{n}.key{s}" for n in (SERVER, CLIENT) for s in ("", "_secret")]
    existing = [directory / n for n in names if (directory / n).exists()]
    if existing and not force:
        raise KeyFileError(f"keys exist already ({', '.join(str(p) for p in existing)}); "
                           "`mirador keys init --force` replaces them (clients using the old ones are then refused)")
    old_client = None
    if force:
        try:
            old_client = read_key(directory / f"{CLIENT}.key")
        except KeyFileError:
            pass
    ownership.private_dir(directory, "the keys directory")
    pairs = []
    for name in (SERVER, CLIENT):
        public, secret = zmq.curve_keypair()
        _write(directory / f"{name}.key", _HEADERS[f"{name}.key"] + public.decode() + "\n", 0o600)
        _write(directory / f"{name}.key_secret", _HEADERS[f"{name}.key_secret"] + secret.decode() + "\n", 0o600)
        pairs.append(KeyPair(public, secret))
    server, client = pairs
    authorize(paths, client.public, revoke=old_client)
    return server, client


def authorize(paths: Paths, key: bytes, revoke: bytes | None = None) -> None:
    """Add ``key`` to authorized_keys (created 0600 if missing), dropping ``revoke`` if listed."""
    path = authorized_keys_path(paths)
    try:
        lines = path.read_text().splitlines()
        ownership.trusted_file(path, "authorized_keys file")  # never launder a file someone else planted
    except FileNotFoundError:
        lines = _HEADERS[AUTHORIZED_KEYS].splitlines()
    lines = [line for line in lines if not revoke or line.strip() != revoke.decode()]
    if key.decode() not in (line.strip() for line in lines):
        lines.append(key.decode())
    _write(path, "\n".join(lines) + "\n", 0o600)
