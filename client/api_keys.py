"""API keys for the HTTP API (``Authorization: Bearer KEY``), one per line in ``<config dir>/api_keys``.

The HTTP API needs no key from this machine's own loopback clients; any other client must send
one, and the daemon refuses to listen on a non-loopback address while this file holds none.
The file is mode 0600 (it holds secrets), read again at each request so that adding or removing
a key needs no restart. Lines: the key, optionally followed by ``# a note``; blank lines and
``#`` comments are ignored. Kept here, beside the CurveZMQ keys, because the CLI writes it and
the daemon reads it; nothing heavy is imported.
"""

from __future__ import annotations

import datetime
import secrets
from pathlib import Path

from .keys import _write
from .paths import Paths

FILE = "api_keys"
PREFIX = "mdr-"
HEADER = ("# API keys for Mirador's HTTP API (Authorization: Bearer KEY), one per line. Read at each\n"
          "# request: delete a line to revoke that key. `mirador keys api-key` adds one.\n")


def path(paths: Paths) -> Path:
    return paths.config / FILE


def read(paths: Paths) -> set[str]:
    """The valid keys (an unreadable or missing file holds none)."""
    try:
        text = path(paths).read_text()
    except (FileNotFoundError, PermissionError):
        return set()
    keys = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return {key for key in keys if len(key) >= 16}


def create(paths: Paths, note: str = "") -> str:
    """Make a new random key, add it to the file (created 0600), and return it."""
    key = PREFIX + secrets.token_urlsafe(32)
    try:
        lines = path(paths).read_text().splitlines()
    except FileNotFoundError:
        lines = HEADER.splitlines()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines.append(f"{key}  # {note.strip() or 'created'} {stamp}".rstrip())
    paths.config.mkdir(parents=True, exist_ok=True)
    _write(path(paths), "\n".join(lines) + "\n", 0o600)
    return key
