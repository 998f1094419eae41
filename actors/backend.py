"""The one small interface every model backend implements, and the errors it raises."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable


class ModelError(Exception):
    """A model failed; the message is shown to the user. ``code`` is the protocol error code."""

    code = "model_error"


class BackendUnavailable(ModelError):
    """The backend itself cannot be reached (e.g. no Ollama server); the message says what to do."""

    code = "backend_unavailable"


class UnknownModel(ModelError):
    """The backend does not have the model."""

    code = "unknown_model"


@dataclass(frozen=True)
class Token:
    """One streamed piece of text and, when the backend gives it, its log-probability."""

    text: str
    logprob: float | None = None


@dataclass(frozen=True)
class GenerationOptions:
    """Per-request sampling limits."""

    max_tokens: int = 256
    temperature: float = 0.7
    seed: int | None = None  # None: the backend's own


Messages = list[dict[str, str]]  # chat messages: {"role": ..., "content": ...}


class Backend(abc.ABC):
    """A model that can be loaded, unloaded and asked to stream a chat reply."""

    kind: str  # "llamacpp" | "ollama"

    def __init__(self, name: str, source: str):
        self.name = name
        self.source = source

    @abc.abstractmethod
    async def load(self) -> None:
        """Make the model ready to answer quickly (idempotent)."""

    @abc.abstractmethod
    async def unload(self) -> None:
        """Free the model's memory (idempotent)."""

    @abc.abstractmethod
    async def is_loaded(self) -> bool:
        """Whether the model is in memory now."""

    @abc.abstractmethod
    def stream(self, messages: Messages, options: GenerationOptions,
               should_stop: Callable[[], bool] | None = None) -> AsyncIterator[Token]:
        """Stream the reply; closing the iterator stops generation, and so does ``should_stop()``
        turning true (checked before each token, on whatever thread generates). Raises ModelError."""

    # How the last ``stream`` used its prompt: {"prompt_tokens", "reused_tokens" (found already
    # evaluated in the model's cache)}; empty where the backend does not know.
    prompt_stats: dict[str, int] = {}

    async def prefill(self, messages: Messages, should_stop: Callable[[], bool], chunk: int) -> dict[str, Any] | None:
        """Evaluate ``messages``' prompt into the model's cache up to the end of the last message's
        text (what the user has typed of it so far), ``chunk`` tokens at a time, stopping between
        chunks once ``should_stop()``; returns {tokens, reused, evaluated, eval_s, stopped}. None:
        this backend keeps no prompt cache that we can fill (Ollama's is its own)."""
        return None

    @property
    def server(self) -> str | None:
        """The server this backend talks to, as resolved where it runs; None: the model is in this process."""
        return None

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes in this model; backends without a local tokenizer estimate (~4 chars each)."""
        return len(text) // 4 + 1


def make_backend(name: str, backend: str, source: str, options: dict[str, Any]) -> Backend:
    """Build the backend a model manifest entry names (imports only that backend's library)."""
    if backend == "llamacpp":
        from .llamacpp import LlamaCppBackend

        return LlamaCppBackend(name, source, **options)
    if backend == "ollama":
        from .ollama_backend import OllamaBackend

        return OllamaBackend(name, source, **options)
    raise ModelError(f"model {name!r}: unknown backend {backend!r} (expected llamacpp or ollama)")
