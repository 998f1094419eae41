"""``AnswerCache``: quick-stage answers kept by question meaning, served again for a paraphrase.

A second Chroma collection (``answer_cache``, cosine space) in the memory store's client, with
the store's one ``MiniLMEmbedding`` passed explicitly (a collection opened without it makes
Chroma rebuild the function on every call, and a saved one reopens only once the class is
registered). The document is the question; metadata holds the answer and what it depends on:

- ``key``: the stage, model and prompt that made the answer (the caller's hash). A lookup only
  matches its own key, so a changed model or system prompt never serves an old answer.
- ``memories``: ids of the memories the answer was given, as a JSON list in one string (Chroma
  metadata holds scalars only; ``forget_memory`` filters in Python: the cache holds at most
  ``max_entries``, a few thousand rows read once per forget, not per question).
- ``query_id``: the exchange the answer came from ("" for a follow-up made ahead), so forgetting
  that exchange drops its answer too.

Similarity alone serves wrong answers (a question and its negation embed 0.89-0.99 alike), so a
candidate must also pass ``question_guard.disagreement``.

A lookup writes nothing to Chroma on its way: every Chroma write costs ~0.5 s here (its durable
write, measured on disk and on tmpfs alike), and the daemon looks up before the quick stage
starts. So each entry's hit count and the counters (lookups, hits, time saved, background tokens
spent and used) live in a small JSON file beside the store (they outlive the entries and a
restart), and expired entries a lookup meets are deleted by a background writer; the other
methods wait for it, so what they see is settled.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

from .question_guard import disagreement

COLLECTION = "answer_cache"
SOURCES = ("answered", "followup")
CANDIDATES = 5  # nearest entries of the key that are checked; more are below threshold in practice
COUNTERS = ("lookups", "hits", "saved_s", "tokens_spent", "tokens_used")


def normalise(question: str) -> str:
    """A question as the upsert compares it: case, spacing and end punctuation do not count."""
    return " ".join(question.lower().split()).rstrip(" ?!.")


def entry_id(key: str, question: str) -> str:
    return hashlib.sha256(f"{key}\n{normalise(question)}".encode()).hexdigest()[:32]


class AnswerCache:
    """Cached answers in the memory store's Chroma client; ``attach`` hands it the (re)opened client."""

    def __init__(self, embedding: Any, counters_path: Path, max_entries: int = 2000,
                 guarded: Callable[[Callable[[], Any]], Any] | None = None) -> None:
        self._embed = embedding
        self._counters_path = Path(counters_path)
        self.max_entries = max_entries
        # The store's write guard (disk-full refusal, reopen after a failed write); plain call without one.
        self._guarded = guarded or (lambda action: action())
        self._lock = threading.Lock()  # the counters: the store actor serves several calls at once
        self._counters, self._hits = self._load_counters()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="answer-cache")  # deletes a lookup asks for
        self._pending: list[Future] = []
        self._doomed: set[str] = set()  # ids handed to the writer, not served meanwhile
        self._client: Any = None
        self._col: Any = None

    def attach(self, client: Any) -> None:
        self._client = client
        self._col = client.get_or_create_collection(COLLECTION, embedding_function=self._embed,
                                                    metadata={"hnsw:space": "cosine"})

    # -- counters ------------------------------------------------------------------------
    def _load_counters(self) -> tuple[dict[str, float], dict[str, int]]:
        try:
            saved = json.loads(self._counters_path.read_text())
        except (OSError, ValueError):
            saved = {}
        counters = saved.get("counters") or {}
        return {k: float(counters.get(k, 0)) for k in COUNTERS}, dict(saved.get("hits") or {})

    def _add(self, served: str | None = None, dropped: Iterable[str] = (), **amounts: float) -> int:
        """Add to the counters, count a hit of entry ``served`` (returns its hits), forget the
        hit counts of ``dropped`` entries; then save."""
        with self._lock:
            for k, v in amounts.items():
                self._counters[k] += v
            hits = 0
            if served is not None:
                hits = self._hits[served] = self._hits.get(served, 0) + 1
            for id_ in dropped:
                self._hits.pop(id_, None)
            tmp = self._counters_path.with_suffix(".tmp")
            try:  # a lost count is not worth failing a question for (a full disk, say)
                tmp.write_text(json.dumps({"counters": self._counters, "hits": self._hits}))
                os.replace(tmp, self._counters_path)
            except OSError:
                pass
            return hits

    def _settle(self) -> None:
        """Wait for the deletes lookups handed to the writer."""
        for future in list(self._pending):  # several actor threads may settle at once: no pops
            future.result()
        self._pending = [f for f in self._pending if not f.done()]

    # -- entries -------------------------------------------------------------------------
    def _entry(self, id_: str, meta: dict[str, Any], now: float) -> dict[str, Any]:
        entry = dict(meta)
        entry["id"] = id_
        entry["hits"] = self._hits.get(id_, 0)
        entry["memories"] = json.loads(meta.get("memories") or "[]")
        entry["age_s"] = round(max(0.0, now - float(meta["ts"])), 3)
        return entry

    def put(self, entry: dict[str, Any]) -> str:
        """Store an answer; the same question (normalised) under the same key replaces the old one.
        Returns the entry's id."""
        question, key = str(entry.get("question") or "").strip(), str(entry.get("key") or "")
        if not question or not key:
            raise ValueError("a cache entry needs a question and a key")
        source = entry.get("source", "answered")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, not {source!r}")
        tokens = int(entry.get("tokens") or 0)
        meta = {
            "question": question, "answer": str(entry.get("answer") or ""), "key": key, "source": source,
            "memories": json.dumps([str(m) for m in entry.get("memories") or []]),
            "query_id": str(entry.get("query_id") or ""), "tokens": tokens,
            "duration_s": float(entry.get("duration_s") or 0.0), "confidence": float(entry.get("confidence") or 0.0),
            "ts": time.time(),
        }
        id_ = entry_id(key, question)
        self._settle()
        self._guarded(lambda: self._col.upsert(ids=[id_], documents=[question], metadatas=[meta]))
        self._add(dropped=[id_], tokens_spent=tokens)  # a new answer starts with no hits
        self._trim()
        return id_

    def _trim(self) -> None:
        """Drop the oldest entries beyond ``max_entries``."""
        extra = self._col.count() - self.max_entries
        if extra > 0:
            found = self._col.get(include=["metadatas"])
            oldest = [i for i, _ in sorted(zip(found["ids"], found["metadatas"]), key=lambda im: im[1]["ts"])[:extra]]
            self._guarded(lambda: self._col.delete(ids=oldest))
            self._add(dropped=oldest)

    def lookup(self, text: str, key: str, threshold: float, ttl_s: float) -> dict[str, Any]:
        """The best cached answer to ``text`` under ``key``: cosine >= ``threshold``, younger than
        ``ttl_s`` (older ones met are deleted) and no disagreement in numbers, negations, names or
        topic. Returns {"hit": entry + similarity + age_s, or None, "rejected": [{question,
        similarity, why}] for the candidates above the threshold that the guard refused}."""
        hit, rejected, expired = None, [], []
        count = self._col.count()
        if count:
            found = self._col.query(query_texts=[text], n_results=min(count, CANDIDATES), where={"key": key},
                                    include=["metadatas", "distances"])
            now = time.time()
            for id_, meta, distance in zip(found["ids"][0], found["metadatas"][0], found["distances"][0]):
                similarity = 1.0 - distance
                if similarity < threshold:
                    break  # nearest first
                if id_ in self._doomed:
                    continue
                if now - float(meta["ts"]) > ttl_s:
                    expired.append(id_)
                    continue
                why = disagreement(text, meta["question"], self._embed)
                if why:
                    rejected.append({"question": meta["question"], "similarity": round(similarity, 4), "why": why})
                    continue
                hit = {**self._entry(id_, meta, now), "similarity": round(similarity, 4)}
                break
        if expired:
            self._doomed.update(expired)
            self._pending.append(self._writer.submit(self._delete_later, expired))
        if hit is None:
            self._add(lookups=1)
            return {"hit": None, "rejected": rejected}
        hit["hits"] = self._add(served=hit["id"], lookups=1, hits=1, saved_s=hit["duration_s"])
        if hit["hits"] == 1:  # the background tokens that made it were used
            self._add(tokens_used=hit["tokens"])
        return {"hit": hit, "rejected": rejected}

    def _delete_later(self, ids: list[str]) -> None:
        """The writer's job: delete expired entries. If that fails (a full disk), a later lookup
        meets them again and retries; nobody waits on this for an answer."""
        try:
            self._guarded(lambda: self._col.delete(ids=ids))
            self._add(dropped=ids)
        except Exception:  # the store's StoreError, already worded; nothing to tell a lookup
            pass
        finally:
            self._doomed.difference_update(ids)

    def forget_memory(self, ids: list[str]) -> int:
        """Drop the entries that used any of these memories or came from one of these exchanges."""
        self._settle()
        doomed_ids = set(ids)
        if not doomed_ids or not self._col.count():
            return 0
        found = self._col.get(include=["metadatas"])
        doomed = [i for i, m in zip(found["ids"], found["metadatas"])
                  if m.get("query_id") in doomed_ids or doomed_ids.intersection(json.loads(m.get("memories") or "[]"))]
        if doomed:
            self._guarded(lambda: self._col.delete(ids=doomed))
            self._add(dropped=doomed)
        return len(doomed)

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        """The entries, newest first."""
        self._settle()
        found = self._col.get(include=["metadatas"])
        now = time.time()
        entries = sorted((self._entry(i, m, now) for i, m in zip(found["ids"], found["metadatas"])),
                         key=lambda e: e["ts"], reverse=True)
        return entries[:limit] if limit else entries

    def clear(self) -> int:
        """Drop every entry (the counters stay: they are the cache's history); returns how many."""
        def drop() -> int:
            count = self._col.count()
            self._client.delete_collection(COLLECTION)
            self.attach(self._client)
            return count
        self._settle()
        count = self._guarded(drop)
        self._add(dropped=list(self._hits))
        return count

    def stats(self) -> dict[str, Any]:
        self._settle()
        c = self._counters
        return {"entries": self._col.count(), "lookups": int(c["lookups"]), "hits": int(c["hits"]),
                "hit_rate": round(c["hits"] / c["lookups"], 4) if c["lookups"] else 0.0,
                "saved_s": round(c["saved_s"], 3), "tokens_spent": int(c["tokens_spent"]),
                "tokens_used": int(c["tokens_used"])}
