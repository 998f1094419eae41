"""The client's exceptions: one tree, every message meant for the user.

    MiradorError                 anything the client library raises on purpose
    ├── DaemonNotRunning         nothing answers at the daemon's endpoint (or it went away)
    ├── AccessDenied             a TCP daemon refused this client's key, or the handshake failed
    ├── KeyFileError             a key file is missing, malformed or readable by others
    ├── NoReply                  the daemon sent nothing for too long (also a TimeoutError)
    └── ResponseError            the daemon answered with an ``error``: ``code`` and ``message``
        ├── BadRequest           the request was malformed (a client bug, or an old daemon)
        ├── NotFound             no such memory, stage, chain or model, or nothing to rate yet
        ├── Busy                 too many questions waiting: try again shortly
        ├── Unavailable          a part of the daemon cannot serve it now (memory, learning,
        │   │                    a stage's actor, a backend; the daemon is shutting down)
        │   └── ModelError       a model failed to load or to answer
        └── InternalError        a bug in the daemon: its log says more

``ResponseError`` is like ``ollama.ResponseError``: catch it for any error the daemon sent and
read ``code`` (one of the protocol's error codes, see ``mirador.client.protocol``); catch a
subclass for one family.
"""

from __future__ import annotations

from typing import Any


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


class NoReply(MiradorError, TimeoutError):
    """The daemon sent nothing for longer than the client waits (a stuck or overloaded daemon)."""


class ResponseError(MiradorError):
    """The daemon answered a request with an ``error`` reply."""

    def __init__(self, code: str, message: str, request_id: str | None = None, stage: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.stage = stage  # the stage that failed, for a stage's error

    def __str__(self) -> str:
        return self.message


class BadRequest(ResponseError):
    """The daemon could not read or accept the request as sent."""


class NotFound(ResponseError):
    """What the request names does not exist."""


class Busy(ResponseError):
    """The daemon refused more work for now; try again in a moment."""


class Unavailable(ResponseError):
    """A part of the daemon that the request needs cannot serve it now."""


class ModelError(Unavailable):
    """A model would not load or failed while answering."""


class InternalError(ResponseError):
    """The daemon failed in a way it did not expect (see its log)."""


_FAMILIES: dict[type[ResponseError], tuple[str, ...]] = {
    BadRequest: ("bad_frame", "bad_version", "bad_request", "too_large", "unknown_type", "duplicate_id", "bad_reply"),
    NotFound: ("not_found", "unknown_stage", "unknown_chain", "unknown_model", "model_unused", "not_trainable"),
    Busy: ("busy",),
    Unavailable: ("memory_disabled", "memory_unavailable", "learning_disabled", "stage_unavailable",
                  "backend_unavailable", "shutting_down", "timeout", "jobs_off"),
    ModelError: ("model_error",),
    InternalError: ("internal",),
}
CODE_CLASSES: dict[str, type[ResponseError]] = {code: cls for cls, codes in _FAMILIES.items() for code in codes}


def response_error(event: dict[str, Any]) -> ResponseError:
    """The exception for an ``error`` reply: the most specific class its code has (unknown codes,
    say from a newer daemon, give a plain ResponseError)."""
    code = str(event.get("code") or "unknown")
    cls = CODE_CLASSES.get(code, ResponseError)
    return cls(code, str(event.get("message") or code), event.get("id"), event.get("stage"))
