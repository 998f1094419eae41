"""Train a LoRA adapter for a GGUF chat model on the user's own Q/A pairs, and judge it in llama.cpp.

Training runs in PyTorch (transformers reads the GGUF and dequantizes it to fp32; peft adds the
LoRA); the adapter is exported as a GGUF LoRA (lora_gguf.py) and scored by llama.cpp itself, on the
quantized model the stages run, so a decision to deploy rests on the numbers users will get.

Token ids come from llama.cpp's tokenizer and the stage's own chat formatting
(llamacpp.prompt_token_ids), so a training prompt is byte for byte what a stage sends:
system prompt + user question + the assistant's header; the target is the answer's tokens plus the
token that ends an assistant turn. The loss counts target tokens only.

torch, transformers and peft are imported inside the functions: importing this module costs
nothing where they are not installed (see :func:`missing_dependencies`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import resource
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .lora_gguf import validate_adapter, write_adapter

Example = dict  # {"question": str, "answer": str}

# peft module names of a Llama-style block -> GGUF tensor names (llama.cpp's llama architecture)
_GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
               "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
_IGNORE = -100  # the label torch's cross-entropy skips
GENERAL_SET = Path(__file__).parent / "data" / "general_set.jsonl"
STYLE_HEAD = 2  # an answer's first tokens: where its opening style is decided (see ``evaluate``)


class TrainingStopped(Exception):
    """should_stop() asked training to end; no adapter was written."""


def missing_dependencies() -> list[str]:
    """The training packages that are not installed (pip install 'mirador-ai[train]' adds them)."""
    return [name for name in ("torch", "transformers", "peft", "gguf") if importlib.util.find_spec(name) is None]


def load_general_set(path: Path = GENERAL_SET) -> list[Example]:
    """The general-knowledge Q/A pairs that catch an adapter making the model forget."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- tokens, exactly as a stage makes them -------------------------------------------------------

class _Encoder:
    """Turns examples into (token ids, prompt length) with a Llama's tokenizer and chat template."""

    def __init__(self, llm: Any, name: str, system_prompt: str, max_tokens: int):
        from .llamacpp import chat_formatter

        self.llm, self.system_prompt, self.max_tokens = llm, system_prompt, max_tokens
        self.formatter = chat_formatter(llm, name)
        self.end_of_turn = self._end_of_turn()

    def _end_of_turn(self) -> int:
        # The template's own turn end (<|im_end|> for ChatML): the first token after an assistant
        # message's text. llama.cpp's "eot" guess can be another token (<|endoftext|> for SmolLM2).
        marker = "\u2063end\u2063"
        text = self.formatter(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]).prompt
        after = self.llm.tokenize(text[text.index(marker) + len(marker):].encode("utf-8"), add_bos=False, special=True)
        return after[0] if after else self.llm.token_eos()

    def __call__(self, example: Example) -> tuple[list[int], int] | None:
        """``(ids, n_prompt)``, cut to max_tokens; None when no answer token fits."""
        from .llamacpp import prompt_token_ids

        prompt = prompt_token_ids(self.llm, self.formatter, [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": example["question"]},
        ])
        answer = self.llm.tokenize(example["answer"].encode("utf-8"), add_bos=False, special=False)
        ids = (prompt + answer + [self.end_of_turn])[:self.max_tokens]
        return (ids, len(prompt)) if len(ids) > len(prompt) else None


def _encode_all(base_path: Path, examples: Iterable[Example], system_prompt: str, max_tokens: int) -> list[tuple[list[int], int]]:
    from llama_cpp import Llama

    llm = Llama(str(base_path), vocab_only=True, verbose=False)  # the tokenizer only: ~0.1 s
    try:
        encode = _Encoder(llm, base_path.name, system_prompt, max_tokens)
        return [e for e in map(encode, examples) if e is not None]
    finally:
        llm.close()


# --- training ------------------------------------------------------------------------------------

def _load_base(base_path: Path) -> Any:
    """The GGUF as a transformers model, dequantized to fp32 (13.5 s, 1.15 GB for SmolLM2-135M)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base_path.parent), gguf_file=base_path.name, dtype=torch.float32)


def _batch(encoded: Sequence[tuple[list[int], int]], device: Any) -> dict[str, Any]:
    """Right-padded ids, attention mask and labels (prompt and padding masked out of the loss)."""
    import torch

    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.zeros((len(encoded), width), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, _IGNORE)
    for row, (ids, n_prompt) in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        mask[row, :len(ids)] = 1
        labels[row, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _answer_logprobs(model: Any, encoded: Sequence[tuple[list[int], int]], device: Any) -> list[float]:
    """Torch's mean log-probability per answer token of each example (what :func:`score` measures
    in llama.cpp); the tests compare the two."""
    import torch

    values = []
    with torch.no_grad():
        for ids, n_prompt in encoded:
            batch = _batch([(ids, n_prompt)], device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0]
            logprobs = torch.log_softmax(logits[n_prompt - 1:len(ids) - 1].float(), dim=-1)
            target = batch["input_ids"][0, n_prompt:len(ids)]
            values.append(float(logprobs.gather(1, target[:, None]).mean()))
    return values


def _lora_tensors(model: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """peft's (A [r, in], B [out, r]) per adapted layer, keyed by the GGUF name of its base weight."""
    tensors = {}
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        parts = name.split(".")
        layer, kind = parts[parts.index("layers") + 1], parts[-1]
        tensors[f"blk.{layer}.{_GGUF_NAMES[kind]}.weight"] = (
            module.lora_A["default"].weight.detach().float().cpu().numpy().copy(),  # the model may change on
            module.lora_B["default"].weight.detach().float().cpu().numpy().copy(),
        )
    return tensors


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux; the peak of the whole process, which in the daemon is the
    # training actor alone.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def train_lora(base_path: str | Path, examples: Sequence[Example], system_prompt: str, out_path: str | Path, *,
               rank: int = 8, alpha: float = 16, epochs: int = 3, lr: float = 5e-4, batch_size: int = 4,
               max_tokens: int = 256, seed: int = 0, threads: int = 1, device: str | None = None,
               on_progress: Callable[[int, int, float], None] | None = None,
               should_stop: Callable[[], bool] | None = None,
               wait_turn: Callable[[], None] | None = None,
               _inspect: Callable[[Any, list[tuple[list[int], int]], Any], None] | None = None) -> dict[str, Any]:
    """Train a LoRA on ``examples`` and write it, validated, to ``out_path``; return its statistics.

    ``on_progress(step, total, loss)`` follows every optimizer step; ``wait_turn()`` is called
    before each step (the daemon blocks it while a user's question runs: questions go first);
    ``should_stop()`` is checked between steps and raises :class:`TrainingStopped`. ``threads``: 1,
    because 2 torch threads beside a busy process ran 5-15x slower here (DESIGN.md).
    ``_inspect(model, encoded, device)``, for the tests, sees the trained peft model before export.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    base_path, out_path = Path(base_path), Path(out_path)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)  # peft's initial A
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoded = _encode_all(base_path, examples, system_prompt, max_tokens)
    if not encoded:
        raise ValueError(f"none of the {len(examples)} examples leaves room for an answer within {max_tokens} tokens")

    if should_stop is not None and should_stop():  # before the 10+ s load, not only after it
        raise TrainingStopped("training stopped before it started")
    started = time.perf_counter()
    model = get_peft_model(_load_base(base_path), LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=list(_GGUF_NAMES)))
    model.to(device).train()
    load_s = time.perf_counter() - started
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)

    order, shuffle = list(range(len(encoded))), random.Random(seed)
    per_epoch = math.ceil(len(encoded) / batch_size)
    total, step, loss_value = epochs * per_epoch, 0, float("nan")
    started = time.perf_counter()
    for _ in range(epochs):
        shuffle.shuffle(order)
        for at in range(0, len(order), batch_size):
            batch = [encoded[i] for i in order[at:at + batch_size]]
            answer_tokens = sum(len(ids) - n for ids, n in batch)
            loss_sum = 0.0
            # One example at a time (gradients accumulated, weighted by answer tokens: the same
            # step as the whole batch at once), so that a question waits for one example's
            # forward and backward pass (~0.65 s here: bench_train, 78 s for 30 steps of 4), not
            # for a whole batch's.
            for example in batch:
                if wait_turn is not None:
                    wait_turn()
                if should_stop is not None and should_stop():
                    raise TrainingStopped(f"training stopped after {step} of {total} steps")
                weight = (len(example[0]) - example[1]) / answer_tokens
                loss = model(**_batch([example], device)).loss * weight
                loss.backward()
                loss_sum += float(loss.detach())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step, loss_value = step + 1, loss_sum
            if on_progress is not None:
                on_progress(step, total, loss_value)
    train_s = time.perf_counter() - started

    model.eval()
    if _inspect is not None:
        _inspect(model, encoded, device)
    started = time.perf_counter()
    write_adapter(out_path, _lora_tensors(model), alpha, base_path)
    export_s = time.perf_counter() - started
    started = time.perf_counter()
    info = validate_adapter(out_path, base_path)
    validate_s = time.perf_counter() - started
    return {"path": str(out_path), "steps": step, "loss": loss_value, "examples": len(encoded),
            "skipped": len(examples) - len(encoded), "tokens": sum(len(ids) for ids, _ in encoded),
            "answer_tokens": sum(len(ids) - n for ids, n in encoded), "load_s": round(load_s, 2),
            "train_s": round(train_s, 2), "export_s": round(export_s, 3), "validate_s": round(validate_s, 3),
            "peak_rss_mb": _peak_rss_mb(), "device": str(device), **info}


# --- judging, in llama.cpp -----------------------------------------------------------------------

def score(base_path: str | Path, examples: Sequence[Example], system_prompt: str, adapter_path: str | Path | None = None,
          scale: float = 1.0, *, max_tokens: int = 256, threads: int = 1, body_only: bool = False) -> dict[str, Any]:
    """The mean log-probability per answer token (end-of-turn token included) that llama.cpp gives
    each example's answer after its prompt, with the adapter at ``scale`` if one is given.
    ``body_only``: only the answer's body counts: not its first ``STYLE_HEAD`` tokens nor its
    end-of-turn token (see ``evaluate``).

    Returns ``{"mean", "per_example"}``; ``mean`` averages the examples (each counts once,
    whatever its length).
    """
    from llama_cpp import Llama

    base_path = Path(base_path)
    if adapter_path is not None:
        validate_adapter(adapter_path, base_path)  # llama.cpp segfaults on a bad file
    # n_threads_batch too: llama-cpp-python's default for it is every core, and a prompt (all that
    # is evaluated here) runs on those; two spinning threads beside a busy process ran 10x slower.
    llm = Llama(str(base_path), n_ctx=max_tokens, n_batch=max_tokens, n_threads=threads, n_threads_batch=threads,
                logits_all=True,
                lora_path=None if adapter_path is None else str(adapter_path), lora_scale=scale, verbose=False)
    try:
        encode = _Encoder(llm, base_path.name, system_prompt, max_tokens)
        values = []
        for example in examples:
            encoded = encode(example)
            if encoded is None:
                continue
            ids, n_prompt = encoded
            llm.reset()  # no prefix reuse: every example is evaluated from scratch, identically
            llm.eval(ids)
            logits = np.asarray(llm.scores[n_prompt - 1:len(ids) - 1], dtype=np.float64)  # row i predicts token i+1
            top = logits.max(axis=1, keepdims=True)
            lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
            per_token = logits[np.arange(len(lse)), ids[n_prompt:]] - lse
            if body_only and len(per_token) > STYLE_HEAD + 2:
                per_token = per_token[STYLE_HEAD:-1]
            values.append(float(per_token.mean()))
    finally:
        llm.close()
    if not values:
        raise ValueError(f"none of the {len(examples)} examples leaves room for an answer within {max_tokens} tokens")
    return {"mean": float(np.mean(values)), "per_example": values}


def evaluate(base_path: str | Path, adapter_path: str | Path, held_out: Sequence[Example], general: Sequence[Example],
             system_prompt: str, min_gain: float, max_general_drop: float) -> dict[str, Any]:
    """Whether to deploy an adapter: the held-out answers (the user's, not trained on) must gain at
    least ``min_gain`` nats per token, and the general set must lose at most ``max_general_drop``.

    The general set is scored on its answers' bodies: how an answer opens and how it ends is the
    style the user's ratings are meant to change; what it says between is what must not be lost.
    Measured with an adapter that learned to open with "In short:" and close with "That's the
    gist." (scripts/bench_train.py's persona, 50 exchanges): on the general set's answers the
    first token lost 7.1 nats and the end of turn 4.6, while the body gained 0.25 nats/token;
    whole answers averaged a 1.2 drop that was all style. A damaged adapter loses on the body too."""
    numbers = {}
    for name, examples in (("held_out", held_out), ("general", general)):
        body = name == "general"
        base = score(base_path, examples, system_prompt, body_only=body)["mean"]
        adapted = score(base_path, examples, system_prompt, adapter_path, body_only=body)["mean"]
        numbers[name] = {"base": base, "adapter": adapted, "change": adapted - base}
    gain, drop = numbers["held_out"]["change"], -numbers["general"]["change"]
    if gain < min_gain:
        why = f"held-out answers gained {gain:+.3f} nats/token, less than the {min_gain:.3f} required"
    elif drop > max_general_drop:
        why = (f"it makes general answers worse by {drop:.3f} nats/token (more than {max_general_drop:.3f} allowed): "
               "the model would forget")
    else:
        why = f"held-out answers gained {gain:+.3f} nats/token; general answers changed {-drop:+.3f}"
    return {"deploy": gain >= min_gain and drop <= max_general_drop, "why": why, **numbers}
