"""LoRA adapters as GGUF files: write them from peft's matrices, and check them before llama.cpp does.

llama.cpp trusts an adapter file: a wrong one makes ``llama_adapter_lora_init`` return NULL, which
llama-cpp-python does not catch, and the process segfaults at the first token (shared DESIGN.md).
So :func:`validate_adapter` is the only gate between a file and a stage actor, and it checks
everything llama.cpp relies on. numpy and the ``gguf`` package only: the daemon imports this.

Shapes: GGUF stores a tensor's dimensions innermost first (ggml's ``ne``), the reverse of numpy.
A base weight that numpy/torch see as ``[out, in]`` has GGUF shape ``[in, out]``; peft's
``A [r, in]`` is ``[in, r]`` and ``B [out, r]`` is ``[r, out]``. Everything below that is called
``out``/``in`` means the numpy/torch sense; ``ne`` means the GGUF order.
"""

from __future__ import annotations

import functools
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

ADAPTED = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_HALVES = (".lora_a", ".lora_b")
_BLOCK_WEIGHT = re.compile(r"blk\.\d+\.[a-z_0-9]+\.weight")


class AdapterError(Exception):
    """An adapter file that must not reach llama.cpp; the message says what is wrong with which file."""


def _value(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def base_facts(base_path: str | os.PathLike[str]) -> dict[str, Any]:
    """What an adapter must agree with: the base model's architecture, head counts, layer count and
    the numpy-order shape ``(out, in)`` of every ``blk.N.*.weight`` (norms are 1-D: ``(n,)``).

    Reading a base with GGUFReader takes seconds (it parses the whole vocabulary), so the answer is
    cached per file version.
    """
    path = Path(base_path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise AdapterError(f"base model {path} cannot be read: {exc.strerror}") from None
    return dict(_base_facts(str(path.resolve()), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def _base_facts(path: str, _mtime_ns: int, _size: int) -> dict[str, Any]:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        arch = _value(reader, "general.architecture")
        facts = {
            "architecture": arch,
            "n_head": _value(reader, f"{arch}.attention.head_count"),
            "n_head_kv": _value(reader, f"{arch}.attention.head_count_kv"),
            "n_layer": _value(reader, f"{arch}.block_count"),
            # reversed: GGUF's ne order -> numpy's (out, in)
            "shapes": {t.name: tuple(int(d) for d in reversed(t.shape.tolist()))
                       for t in reader.tensors if _BLOCK_WEIGHT.fullmatch(t.name)},
        }
    except Exception as exc:  # GGUFReader raises whatever numpy/struct raise on a bad file
        raise AdapterError(f"base model {path} is not a readable GGUF file ({exc})") from None
    if not isinstance(arch, str) or not all(isinstance(facts[k], int) for k in ("n_head", "n_head_kv", "n_layer")):
        raise AdapterError(f"base model {path} lacks its architecture or head counts")
    return facts


def _permute_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the output rows of attn_q/attn_k the way llama.cpp's converter reorders the base
    weights (Hugging Face rotates the two halves of a head, GGUF interleaves pairs). Without it
    generation still looks plausible but the numbers are wrong (DESIGN.md: log-probs drift by up to 1.2)."""
    out, r = b.shape
    head_dim = out // n_head
    return b.reshape(n_head, 2, head_dim // 2, r).swapaxes(1, 2).reshape(out, r)


def write_adapter(path: str | os.PathLike[str], tensors: Mapping[str, tuple[np.ndarray, np.ndarray]], alpha: float,
                  base: Mapping[str, Any] | str | os.PathLike[str], *, _permute: bool = True) -> Path:
    """Write a GGUF LoRA that llama.cpp loads on ``base`` (its :func:`base_facts`, or its path).

    ``tensors`` maps a base tensor name (``blk.3.attn_q.weight``) to peft's ``(A [r, in], B [out, r])``.
    The file appears under ``path`` only once complete (written beside it, then renamed).
    ``_permute=False`` skips the q/k row order; only the tests use it, to show that it matters.
    """
    import gguf

    facts = base if isinstance(base, Mapping) else base_facts(base)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, facts["architecture"])  # writes general.architecture
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(alpha))
        for name, (a, b) in sorted(tensors.items()):
            a = np.ascontiguousarray(a, dtype=np.float32)
            b = np.asarray(b, dtype=np.float32)
            if _permute and ".attn_q." in name:
                b = _permute_rows(b, facts["n_head"])
            elif _permute and ".attn_k." in name:
                b = _permute_rows(b, facts["n_head_kv"])
            writer.add_tensor(name + ".lora_a", a)  # the writer reverses numpy's shape into GGUF's ne
            writer.add_tensor(name + ".lora_b", np.ascontiguousarray(b))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def validate_adapter(path: str | os.PathLike[str], base_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check that ``path`` is a LoRA adapter llama.cpp can apply to ``base_path``; raise AdapterError if not.

    Returns ``{"rank", "alpha", "tensors", "size"}`` (``tensors``: how many base weights it adapts,
    ``size``: bytes). Checks what llama.cpp's loader assumes (llama-adapter.cpp): the adapter type and
    architecture, a base tensor for every name, both halves of every pair, base in-dim == lora_a's
    and out-dim == lora_b's, one rank; and, beyond llama.cpp, that the data is complete and finite.
    """
    import gguf

    path = Path(path)
    facts = base_facts(base_path)
    if not path.is_file():
        raise AdapterError(f"adapter {path} does not exist")
    try:
        reader = gguf.GGUFReader(path)
        kind, lora_kind = _value(reader, "general.type"), _value(reader, "adapter.type")
        arch, alpha = _value(reader, "general.architecture"), _value(reader, "adapter.lora.alpha")
        tensors = {t.name: t for t in reader.tensors}
    except Exception as exc:  # garbage and truncated headers fail here, in many different ways
        raise AdapterError(f"adapter {path} is not a readable GGUF file ({exc}); it may be damaged or incomplete") from None
    if kind != "adapter" or lora_kind != "lora":
        what = "a whole model" if kind in (None, "model") else f"of type {kind!r}"
        raise AdapterError(f"{path} is not a LoRA adapter (general.type={kind!r}, adapter.type={lora_kind!r}): "
                           f"it looks like {what}")
    if arch != facts["architecture"]:
        raise AdapterError(f"adapter {path} is for architecture {arch!r}, but the base model is {facts['architecture']!r}")
    if not isinstance(alpha, float) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"adapter {path} has no valid adapter.lora.alpha (found {alpha!r})")
    if not tensors:
        raise AdapterError(f"adapter {path} contains no tensors")

    pairs: dict[str, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        base_name, half = name[:-7], name[-7:]
        if half not in _HALVES:
            raise AdapterError(f"adapter {path} has tensor {name!r}, which is neither a lora_a nor a lora_b")
        if base_name not in facts["shapes"]:
            raise AdapterError(f"adapter {path} adapts {base_name!r}, which the base model does not have "
                               "(made for another model?)")
        pairs.setdefault(base_name, {})[half] = tensor

    ranks = set()
    for base_name, halves in sorted(pairs.items()):
        if len(halves) != 2:
            lacking = next(h for h in _HALVES if h not in halves)
            raise AdapterError(f"adapter {path} has no {base_name}{lacking} to go with its other half")
        base_shape = facts["shapes"][base_name]
        a, b = halves[".lora_a"], halves[".lora_b"]
        a_shape = tuple(int(d) for d in reversed(a.shape.tolist()))  # numpy order: (r, in)
        b_shape = tuple(int(d) for d in reversed(b.shape.tolist()))  # numpy order: (out, r)
        if len(base_shape) != 2 or len(a_shape) != 2 or len(b_shape) != 2:
            raise AdapterError(f"adapter {path}: {base_name} and its LoRA halves must all be matrices")
        out_dim, in_dim = base_shape
        if a_shape[1] != in_dim or b_shape[0] != out_dim or a_shape[0] != b_shape[1]:
            raise AdapterError(f"adapter {path}: {base_name} is {out_dim}x{in_dim} in the base model, but its "
                               f"lora_a is {a_shape[0]}x{a_shape[1]} and lora_b {b_shape[0]}x{b_shape[1]} "
                               f"(expected r x {in_dim} and {out_dim} x r)")
        ranks.add(a_shape[0])
        for half in (a, b):
            if half.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                raise AdapterError(f"adapter {path}: {half.name} is stored as {half.tensor_type.name}; "
                                   "only F32 and F16 adapters are accepted")
            if half.data.size != half.n_elements:
                raise AdapterError(f"adapter {path} is incomplete: {half.name} is cut short")
            if not np.isfinite(half.data).all():
                raise AdapterError(f"adapter {path}: {half.name} contains NaN or infinite values")
    if len(ranks) != 1:
        raise AdapterError(f"adapter {path} mixes LoRA ranks {sorted(ranks)}; llama.cpp needs one rank")
    return {"rank": ranks.pop(), "alpha": alpha, "tensors": len(pairs), "size": path.stat().st_size}
