"""The thin Mirador client: the wire protocol, the Python API and the `mirador` CLI.

Imports only pyzmq, msgpack and click, never Ray, ChromaDB or llama.cpp.

    from mirador.client import Client
    with Client() as client:
        for event in client.ask("Why is the sky blue?"):
            if event["event"] == "token":
                print(event["text"], end="", flush=True)

Errors the daemon sends raise ``ResponseError`` subclasses (``NotFound``, ``Busy``,
``Unavailable``, ...; see ``mirador.client.errors``), all of them ``MiradorError``.
"""

from .api import AsyncClient, Client
from .errors import (AccessDenied, BadRequest, Busy, DaemonNotRunning, InternalError, MiradorError, ModelError,
                     NoReply, NotFound, ResponseError, Unavailable, UnsafePath)
from .paths import Paths

__all__ = ["AccessDenied", "AsyncClient", "BadRequest", "Busy", "Client", "DaemonNotRunning", "InternalError",
           "MiradorError", "ModelError", "NoReply", "NotFound", "Paths", "ResponseError", "Unavailable", "UnsafePath"]
