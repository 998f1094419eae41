"""The few facts ``/api/tags`` and ``/api/show`` tell about a GGUF file, read from its header.

A GGUF file starts with its metadata as key/value pairs; the ``general.*`` and architecture keys
come before the tokenizer's, so only the first kilobytes are read (the vocabulary's large arrays
are never reached).
Nothing is loaded into llama.cpp and llama_cpp is not imported in the daemon for this.
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path
from typing import Any, BinaryIO

WANTED = ("general.architecture", "general.name", "general.size_label", "general.file_type", "general.license",
          "general.parameter_count")
# llama.cpp's LLAMA_FTYPE values (general.file_type) -> the names Ollama shows as quantization_level
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
              12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
              19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
              26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16"}
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> str:
    return f.read(_read(f, "<Q")).decode("utf-8", "replace")


def _value(f: BinaryIO, kind: int) -> Any:
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        item, count = _read(f, "<I"), _read(f, "<Q")
        return [_value(f, item) for _ in range(count)]
    return _read(f, _SCALARS[kind])


@functools.lru_cache(maxsize=64)
def _cached(path: str, mtime: float) -> dict[str, Any]:
    found: dict[str, Any] = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return found
        _read(f, "<I"), _read(f, "<Q")  # version, tensor count
        for _ in range(_read(f, "<Q")):
            key, kind = _string(f), _read(f, "<I")
            if key.startswith("tokenizer."):
                break  # the vocabulary's large arrays follow: what is wanted comes before them
            value = _value(f, kind)
            if key in WANTED:
                found[key] = value
            if len(found) == len(WANTED):
                break
    return found


def read(path: Path) -> dict[str, Any]:
    """The ``general.*`` facts of a GGUF file ({} if it cannot be read), plus ``quantization``."""
    try:
        meta = dict(_cached(str(path), path.stat().st_mtime))
    except (OSError, ValueError, KeyError, struct.error):
        return {}
    if "general.file_type" in meta:
        meta["quantization"] = FILE_TYPES.get(meta["general.file_type"], f"type {meta['general.file_type']}")
    return meta
