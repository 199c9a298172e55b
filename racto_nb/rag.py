"""``SimpleRAG``: document ingestion that runs offline, for demos and tests.

``RactoCeleryWorker.ingest_document`` accepts any object with
``ingest(path, **metadata)``; RactoGateway's ``RactoRAG`` is the real one, but
every embedder it ships calls a hosted API. This one needs nothing: text
files are split into paragraphs, each embedded with a deterministic hashing
embedder (the same text gives the same vector in every process, unlike
Python's salted ``hash``), and kept in memory. Retrieval quality is
bag-of-words, which is enough to show the fan-out path; swap in ``RactoRAG``
for real embeddings.

Chunks come back as dicts shaped like RactoRAG's ``Chunk`` (``chunk_id``,
``doc_id``, ``content``, ``metadata``), minus the vector, which would only
bloat the result backend.

Where the chunks live decides who can search them. In memory (the default),
only this process: right for the embedded mode, where the worker thread
ingests into the notebook's own object. With ``path``, a JSON-lines file
shared by every process on the machine: worker processes started by
``binder/start`` or ``%racto_workers`` ingest (``RACTO_RAG=racto_nb.rag:from_config``),
the notebook searches. A fleet on several machines needs a real vector
store (RactoRAG with Chroma, pgvector, ...) behind the same ``RACTO_RAG`` hook.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no flock; a file store is then safe for one process only
    fcntl = None  # type: ignore[assignment]

__all__ = ["HashingEmbedder", "SimpleRAG", "from_config"]

_WORD = re.compile(r"[a-z0-9]+")
#: Words too common to say what a passage is about; dropping them keeps questions matching content.
_STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "can",
        "do",
        "does",
        "for",
        "from",
        "how",
        "i",
        "if",
        "in",
        "is",
        "it",
        "its",
        "my",
        "of",
        "on",
        "or",
        "our",
        "so",
        "that",
        "the",
        "this",
        "to",
        "was",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "you",
        "your",
    ]
)
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


class HashingEmbedder:
    """Words (and word pairs) hashed into ``dim`` signed buckets, L2-normalised."""

    def __init__(self, dim: int = 256) -> None:
        if dim < 8:
            raise ValueError(f"dim must be >= 8 (got {dim})")
        self.dim = dim

    def embed(self, text: str) -> list[float]:
        words = [w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]
        features = words + [f"{a}_{b}" for a, b in itertools.pairwise(words)]
        vector = [0.0] * self.dim
        for feature in features:
            digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
            bucket = int.from_bytes(digest[:4], "little") % self.dim
            vector[bucket] += 1.0 if digest[4] & 1 else -1.0
        norm = math.sqrt(sum(v * v for v in vector))
        return [v / norm for v in vector] if norm else vector


class SimpleRAG:
    """Paragraph chunks of text files, hashed embeddings, an in-memory store. Thread-safe.

    Args:
        path: JSON-lines file to keep chunks in, shared by processes on this
            machine (created on first write); ``None`` keeps them in memory.
        max_chars: Paragraphs longer than this are split at sentence ends.
        dim: Embedding size.
    """

    def __init__(self, path: str | Path | None = None, *, max_chars: int = 800, dim: int = 256) -> None:
        if max_chars < 50:
            raise ValueError(f"max_chars must be >= 50 (got {max_chars})")
        self.path = None if path is None else Path(path).expanduser()
        self.max_chars = max_chars
        self.embedder = HashingEmbedder(dim)
        self._rows: list[dict[str, Any]] = []  # {"chunk": ..., "vector": ...} when in memory
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        where = f"path={str(self.path)!r}, " if self.path else ""
        return f"SimpleRAG({len(self)} chunks, {where}max_chars={self.max_chars}, dim={self.embedder.dim})"

    def __len__(self) -> int:
        return len(self._load())

    def clear(self) -> None:
        """Drop every stored chunk (the file too, when there is one)."""
        with self._locked(exclusive=True):
            self._rows = []
            if self.path is not None:
                self.path.unlink(missing_ok=True)

    def ingest(self, path: str | Path, **metadata: Any) -> list[dict[str, Any]]:
        """Read a UTF-8 text file, chunk it by paragraphs, embed and store the chunks; return them."""
        source = Path(path).expanduser().resolve()
        if not source.is_file():
            raise FileNotFoundError(f"no such file to ingest: {source}")
        return self.ingest_text(source.read_text(encoding="utf-8"), source=str(source), **metadata)

    def ingest_text(self, text: str, *, source: str = "manual", **metadata: Any) -> list[dict[str, Any]]:
        """Chunk, embed and store ``text`` as one document; return its chunks."""
        doc_id = str(uuid.uuid4())
        pieces = self._split(text)
        chunks: list[dict[str, Any]] = [
            {
                "chunk_id": str(uuid.uuid4()),
                "doc_id": doc_id,
                "content": content,
                "metadata": {
                    "source": source,
                    "chunk_index": index,
                    "total_chunks": len(pieces),
                    "start_char": start,
                    "end_char": start + len(content),
                    "doc_id": doc_id,
                    "extra": dict(metadata),
                },
            }
            for index, (start, content) in enumerate(pieces)
        ]
        rows = [{"chunk": chunk, "vector": self.embedder.embed(chunk["content"])} for chunk in chunks]
        with self._locked(exclusive=True):
            if self.path is None:
                self._rows.extend(rows)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as store:
                    store.writelines(json.dumps(row) + "\n" for row in rows)
        return chunks

    def search(self, query: str, k: int = 3) -> list[dict[str, Any]]:
        """The ``k`` chunks most similar to ``query`` (cosine), best first, each with a ``score``."""
        if k < 1:
            raise ValueError(f"k must be >= 1 (got {k})")
        target = self.embedder.embed(query)
        scored = [
            (sum(a * b for a, b in zip(target, row["vector"], strict=True)), row["chunk"]) for row in self._load()
        ]
        scored.sort(key=lambda pair: pair[0], reverse=True)
        return [{**chunk, "score": round(score, 4)} for score, chunk in scored[:k]]

    def _load(self) -> list[dict[str, Any]]:
        with self._locked(exclusive=False):
            if self.path is None:
                return list(self._rows)
            if not self.path.is_file():
                return []
            with open(self.path, encoding="utf-8") as store:
                return [json.loads(line) for line in store if line.strip()]

    @contextlib.contextmanager
    def _locked(self, *, exclusive: bool) -> Iterator[None]:
        """The thread lock, plus an flock on the store file so processes do not interleave writes."""
        with self._lock:
            if self.path is None:
                yield
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if fcntl is None:
                yield
                return
            with open(self.path.with_name(self.path.name + ".lock"), "a") as lock_file:
                fcntl.flock(lock_file, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                try:
                    yield
                finally:
                    fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _split(self, text: str) -> list[tuple[int, str]]:
        """(start offset, text) of each paragraph, long ones cut at sentence ends."""
        pieces: list[tuple[int, str]] = []
        position = 0
        for block in _PARAGRAPH_BREAK.split(text):
            start = text.find(block, position)
            position = start + len(block)
            stripped = block.strip()
            if not stripped:
                continue
            offset = start + block.index(stripped)
            pieces.extend(self._cut(offset, stripped))
        return pieces

    def _cut(self, offset: int, paragraph: str) -> list[tuple[int, str]]:
        if len(paragraph) <= self.max_chars:
            return [(offset, paragraph)]
        out: list[tuple[int, str]] = []
        start = 0
        while start < len(paragraph):
            end = min(start + self.max_chars, len(paragraph))
            if end < len(paragraph):
                cut = paragraph.rfind(". ", start, end)
                end = cut + 1 if cut > start else end
            piece = paragraph[start:end].strip()
            if piece:
                out.append((offset + start + paragraph[start:end].index(piece), piece))
            start = end
        return out


def from_config() -> SimpleRAG:
    """The ``RACTO_RAG`` factory for SimpleRAG: stored in ``RACTO_RAG_PATH`` when set, else in memory.

    Call it in the notebook too: with ``RACTO_RAG_PATH`` set, the notebook
    searches the file the local workers ingest into.
    """
    from racto_nb.config import load_config

    return SimpleRAG(load_config().rag_path)
