"""``MemoryStore``: what the user said before, in ChromaDB on disk, recalled by meaning.

One Chroma ``PersistentClient`` in ``$XDG_DATA_HOME/mirador/memory`` (directory 0700), one
collection, embeddings from ``MiniLMEmbedding`` (one shared instance, so Chroma does not rebuild
it per call). Each exchange is one record: the question and the final answer as the document,
and route, models, session, time and query id as metadata; its id is the query id.
``remember`` returns only once Chroma has written it, so an acknowledged exchange survives a
killed daemon.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import ray

from .node import node_info

COLLECTION = "memories"
METADATA_KEYS = ("question", "answer", "route", "models", "session", "ts", "query_id")


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Memories:
    """The store itself; ``MemoryStore`` below is this class as a Ray actor."""

    def __init__(self, path: str):
        from .embedding import MiniLMEmbedding  # first: it turns onnxruntime's telemetry off before anything imports it

        import chromadb
        from chromadb.config import Settings

        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path, 0o700)
        self._client = chromadb.PersistentClient(str(self.path), settings=Settings(anonymized_telemetry=False))
        self._embed = MiniLMEmbedding()
        self._col = self._collection()

    def _collection(self) -> Any:
        return self._client.get_or_create_collection(
            COLLECTION, embedding_function=self._embed, metadata={"hnsw:space": "cosine"}
        )

    @staticmethod
    def _document(question: str, answer: str) -> str:
        return f"{question.strip()}\n{answer.strip()}"

    @staticmethod
    def _record(id_: str, meta: dict[str, Any], similarity: float | None = None) -> dict[str, Any]:
        record = {"id": id_, **{k: meta.get(k) for k in METADATA_KEYS}}
        if similarity is not None:
            record["similarity"] = round(similarity, 4)
        return record

    # -- remembering ---------------------------------------------------------------------
    def remember(self, exchange: dict[str, Any]) -> str:
        """Store one exchange {query_id, question, answer, route, models, session}; returns its id once written."""
        meta = {k: exchange.get(k) or "" for k in METADATA_KEYS}
        meta["ts"] = float(exchange.get("ts") or time.time())
        models = exchange.get("models") or ""
        meta["models"] = models if isinstance(models, str) else ",".join(models)  # Chroma keeps scalars only
        self._col.upsert(ids=[meta["query_id"]], documents=[self._document(meta["question"], meta["answer"])], metadatas=[meta])
        return meta["query_id"]

    def import_records(self, records: list[dict[str, Any]]) -> int:
        for record in records:
            self.remember({**record, "query_id": record.get("id") or record.get("query_id")})
        return len(records)

    # -- recalling -----------------------------------------------------------------------
    def recall(self, text: str, k: int = 5, min_similarity: float = 0.3) -> list[dict[str, Any]]:
        """The memories most like ``text``: at least ``min_similarity`` (cosine), duplicates
        dropped, equal similarity broken by recency (newest first)."""
        count = self._col.count()
        if not count:
            return []
        found = self._col.query(query_texts=[text], n_results=min(count, k * 3), include=["metadatas", "distances"])
        candidates = [
            self._record(i, m, 1.0 - d)
            for i, m, d in zip(found["ids"][0], found["metadatas"][0], found["distances"][0])
            if 1.0 - d >= min_similarity
        ]
        candidates.sort(key=lambda r: (round(r["similarity"], 2), r["ts"]), reverse=True)
        seen: set[str] = set()
        unique = []
        for record in candidates:
            key = " ".join(self._document(record["question"], record["answer"]).lower().split())
            if key not in seen:
                seen.add(key)
                unique.append(record)
        return unique[:k]

    def session_turns(self, session: str, n: int) -> list[dict[str, Any]]:
        """The last ``n`` exchanges of a session, oldest first."""
        found = self._col.get(where={"session": session}, include=["metadatas"])
        records = sorted((self._record(i, m) for i, m in zip(found["ids"], found["metadatas"])), key=lambda r: r["ts"])
        return records[-n:] if n > 0 else []

    def embed(self, texts: list[str]) -> list[list[float]]:
        """The memory's embeddings of ``texts`` (unit vectors), for the HTTP API's embed endpoints."""
        return [vector.tolist() for vector in self._embed(list(texts))]

    # -- the user's controls -------------------------------------------------------------
    def list(self, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        found = self._col.get(include=["metadatas"])
        records = sorted((self._record(i, m) for i, m in zip(found["ids"], found["metadatas"])), key=lambda r: r["ts"], reverse=True)
        return records[offset:offset + limit] if limit else records[offset:]

    def search(self, text: str, k: int = 10) -> list[dict[str, Any]]:
        return self.recall(text, k=k, min_similarity=-1.0)

    def show(self, id_: str) -> dict[str, Any] | None:
        found = self._col.get(ids=[id_], include=["metadatas"])
        return self._record(found["ids"][0], found["metadatas"][0]) if found["ids"] else None

    def forget(self, id_: str) -> bool:
        if not self._col.get(ids=[id_])["ids"]:
            return False
        self._col.delete(ids=[id_])
        return True

    def forget_all(self) -> int:
        count = self._col.count()
        self._client.delete_collection(COLLECTION)
        self._col = self._collection()
        return count

    def stats(self) -> dict[str, Any]:
        return {"memories": self._col.count(), "bytes": _size(self.path), "path": str(self.path), **node_info()}


MemoryStore = ray.remote(num_cpus=0, max_concurrency=4)(Memories)
