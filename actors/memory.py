"""``MemoryStore``: what the user said before, in ChromaDB on disk, recalled by meaning.

One Chroma ``PersistentClient`` in ``$XDG_DATA_HOME/mirador/memory`` (directory 0700), one
collection, embeddings from ``MiniLMEmbedding`` (one shared instance, so Chroma does not rebuild
it per call). Each exchange is one record: the question and the final answer as the document,
and route, models, session, time and query id as metadata; its id is the query id.
``remember`` returns only once Chroma has written it, so an acknowledged exchange survives a
killed daemon. A write that fails raises ``StoreError`` saying why in the user's terms (a full
disk, a directory it may not write), and the store goes on serving reads and later writes.

A full disk: ChromaDB 1.5 survives a failed write only in part: reads still work, but after a
few failed writes the next writes hang for good, even once there is room again (measured on a
full tmpfs; a fresh client on the same files works). So writes are refused without touching
Chroma while less than ``MIN_FREE_BYTES`` is free, and after any failed write the client is
opened afresh before the next one.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import ray

from .answer_cache import AnswerCache
from .node import node_info

COLLECTION = "memories"
METADATA_KEYS = ("question", "answer", "route", "models", "session", "ts", "query_id", "rating")


# Below this much free space, writes are refused before Chroma sees them (an import batch of 100
# long memories writes ~1 MB), and a failed write is put down to a full disk whatever the error
# says (sqlite and Chroma's Rust layer word it in several ways).
MIN_FREE_BYTES = 16 << 20


class StoreError(Exception):
    """A write to the store failed; the message says why and what to do."""


def write_failure(exc: BaseException, path: Path) -> str:
    """Why a write to the store in ``path`` failed, in the user's terms."""
    detail = f"{type(exc).__name__}: {exc}".strip()
    text = detail.lower()
    try:
        free: int | None = shutil.disk_usage(path).free
    except OSError:
        free = None
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC or "disk is full" in text or "no space left" in text or (free is not None and free < MIN_FREE_BYTES):
        left = f", {free / 1e6:.1f} MB free" if free is not None else ""
        return (f"the disk holding {path} is full{left}: free some space there; exchanges are not remembered "
                f"until then ({detail})")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) or any(w in text for w in ("readonly", "read-only", "permission denied")):
        return (f"{path} cannot be written: check that it belongs to this user and that its file system is "
                f"mounted read-write ({detail})")
    return f"the memory store in {path} failed to write ({detail})"


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Memories:
    """The store itself; ``MemoryStore`` below is this class as a Ray actor."""

    def __init__(self, path: str, cache_max_entries: int = 2000):
        from .embedding import MiniLMEmbedding  # first: it turns onnxruntime's telemetry off before anything imports it

        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path, 0o700)
        self._embed = MiniLMEmbedding()
        self._writing = threading.Lock()  # one write at a time: a reopen must not pull the client from under one
        self._reopen = False  # a write failed: open the client afresh before the next one
        # Cached quick answers: a second collection of the same client, the same embedding and write guard.
        self.cache = AnswerCache(self._embed, self.path / "answer_cache.json", cache_max_entries, self._guarded)
        self._open()

    def _open(self) -> None:
        import chromadb
        from chromadb.api.client import SharedSystemClient
        from chromadb.config import Settings

        SharedSystemClient.clear_system_cache()  # else Chroma hands back the same (stuck) client
        self._client = chromadb.PersistentClient(str(self.path), settings=Settings(anonymized_telemetry=False))
        self._col = self._collection()
        self.cache.attach(self._client)

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
    @classmethod
    def _entry(cls, exchange: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        """An exchange {query_id, question, answer, route, models, session, ts} as Chroma keeps it."""
        meta = {k: exchange.get(k) or "" for k in METADATA_KEYS}
        meta["ts"] = float(exchange.get("ts") or time.time())
        models = exchange.get("models") or ""
        meta["models"] = models if isinstance(models, str) else ",".join(models)  # Chroma keeps scalars only
        meta["rating"] = int(exchange.get("rating") or 0)  # 1-5 once rated (`mirador rate`); 0: not rated
        return meta["query_id"], cls._document(meta["question"], meta["answer"]), meta

    def _write(self, method: str, **batch: Any) -> None:
        """``self._col.<method>(**batch)``, refused while the disk is (nearly) full."""
        self._guarded(lambda: getattr(self._col, method)(**batch))

    def _guarded(self, action: Any) -> Any:
        """Run a write to the store, ``action()``, refused while the disk is (nearly) full. The action
        reads its collection when called: a reopen before it replaces the collections."""
        with self._writing:
            try:
                if shutil.disk_usage(self.path).free < MIN_FREE_BYTES:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                if self._reopen:
                    self._open()
                    self._reopen = False
                return action()
            except Exception as exc:
                if not isinstance(exc, OSError) or exc.errno != errno.ENOSPC:
                    self._reopen = True  # Chroma failed a write: do not trust this client with another
                raise StoreError(write_failure(exc, self.path)) from exc

    def remember(self, exchange: dict[str, Any]) -> str:
        """Store one exchange; returns its id once written."""
        id_, document, meta = self._entry(exchange)
        self._write("upsert", ids=[id_], documents=[document], metadatas=[meta])
        return id_

    def import_records(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Add records (as ``list``/export gives them) in one write, all or nothing (one Chroma
        transaction: a write that fails adds none of them, measured on a full disk). A record whose id the store has already is skipped (kept as
        it is), so importing a file again adds nothing twice and removing an import's ``ids``
        removes nothing else. Returns {imported, skipped, ids: the ids added}."""
        entries: dict[str, tuple[str, dict[str, Any]]] = {}
        for record in records:
            id_, document, meta = self._entry({**record, "query_id": record.get("id") or record.get("query_id")})
            entries.setdefault(id_, (document, meta))  # a repeated id: the first one counts
        known = set(self._col.get(ids=list(entries), include=[])["ids"]) if entries else set()
        new = [id_ for id_ in entries if id_ not in known]
        if new:  # one transaction: a failed write adds none of them
            self._write("add", ids=new, documents=[entries[i][0] for i in new], metadatas=[entries[i][1] for i in new])
        return {"imported": len(new), "skipped": len(records) - len(new), "ids": new}

    def rate(self, id_: str, rating: int) -> bool:
        """Keep the user's rating with the exchange (training picks the well-rated ones, export
        carries it); False if the exchange is not stored (incognito, forgotten)."""
        found = self._col.get(ids=[id_], include=["metadatas"])
        if not found["ids"]:
            return False
        self._write("update", ids=[id_], metadatas=[{**found["metadatas"][0], "rating": int(rating)}])
        return True

    def rated(self, min_rating: int) -> list[dict[str, Any]]:
        """The exchanges rated at least ``min_rating``, oldest first (what LoRA training learns from)."""
        found = self._col.get(where={"rating": {"$gte": int(min_rating)}}, include=["metadatas"])
        return sorted((self._record(i, m) for i, m in zip(found["ids"], found["metadatas"])), key=lambda r: r["ts"])

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
        return self.forget_many([id_]) == 1

    def forget_many(self, ids: list[str]) -> int:
        """Delete these memories (say, an import that failed half-way); returns how many there were."""
        found = self._col.get(ids=list(dict.fromkeys(ids)), include=[])["ids"] if ids else []
        if found:
            self._write("delete", ids=found)
        self.cache.forget_memory(list(ids))  # an answer given these memories (or from these exchanges) goes too
        return len(found)

    def forget_all(self) -> int:
        with self._writing:
            count = self._col.count()
            self._client.delete_collection(COLLECTION)
            self._col = self._collection()
        self.cache.clear()
        return count

    # -- the answer cache (actors/answer_cache.py), as actor methods ---------------------
    def cache_put(self, entry: dict[str, Any]) -> str:
        return self.cache.put(entry)

    def cache_lookup(self, text: str, key: str, threshold: float, ttl_s: float) -> dict[str, Any]:
        return self.cache.lookup(text, key, threshold, ttl_s)

    def cache_list(self, limit: int = 50) -> list[dict[str, Any]]:
        return self.cache.list(limit)

    def cache_clear(self) -> int:
        return self.cache.clear()

    def cache_stats(self) -> dict[str, Any]:
        return self.cache.stats()

    def stats(self) -> dict[str, Any]:
        return {"memories": self._col.count(), "bytes": _size(self.path), "path": str(self.path), **node_info()}


MemoryStore = ray.remote(num_cpus=0, max_concurrency=4)(Memories)
