"""The client's exceptions: one tree, every message meant for the user."""

from __future__ import annotations


class MiradorError(Exception):
    """An error whose message is meant for the user."""


class DaemonNotRunning(MiradorError):
    """Nothing answers at the daemon's endpoint."""


class AccessDenied(MiradorError):
    """A daemon's TCP endpoint refused this client, or the CurveZMQ handshake failed (wrong keys)."""


class KeyFileError(MiradorError):
    """A key file is missing, malformed or readable by others; the message says which and what to do."""


class UnsafePath(MiradorError):
    """A directory or file Mirador relies on belongs to another user or others can change it; the message says what to do."""
