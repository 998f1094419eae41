"""The thin Mirador client: the wire protocol, the Python API and the `mirador` CLI.

Imports only pyzmq, msgpack and click, never Ray, ChromaDB or llama.cpp.

    from mirador.client import Client
    with Client() as client:
        for event in client.ask("Why is the sky blue?"):
            if event["event"] == "token":
                print(event["text"], end="", flush=True)
"""

from .api import AsyncClient, Client
from .errors import AccessDenied, DaemonNotRunning, MiradorError, UnsafePath
from .paths import Paths

__all__ = ["AccessDenied", "AsyncClient", "Client", "DaemonNotRunning", "MiradorError", "Paths", "UnsafePath"]
