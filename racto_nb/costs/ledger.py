"""Pay once: a ledger of answers already paid for, keyed by everything that decides the answer.

A row's *fingerprint* hashes what the provider sees and what shapes its reply:
the kit's identity (provider, endpoint, model, system prompt), the history and
the message, temperature, max_tokens, ``extra``, and the output schema. A row
whose fingerprint has a successful answer in the ledger is answered from it
and not sent: twins in one batch go out once, a re-run cell pays nothing for
what it already has, and so does a restarted kernel.

Where it lives: in fleet mode beside the results, in Redis
(:class:`RedisLedger`), so every worker of the fleet reads and writes the
same ledger; in the embedded mode in a SQLite file in the checkpoint folder
(:class:`SqliteLedger`), so it outlives the kernel. Both are bounded (an
expiry and a maximum number of entries, oldest dropped first), and both can
be cleared.

Kits opt in by telling who they are (``cache_identity()``): a kit that does not
is never answered from the ledger, since two unknown kits could answer the
same prompt differently.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

__all__ = ["LEDGER_PREFIX", "Ledger", "RedisLedger", "SqliteLedger", "fingerprint"]

LEDGER_PREFIX = "racto:ledger:"
_INDEX = "racto:ledger-index"


def fingerprint(identity: Mapping[str, Any], request: Mapping[str, Any]) -> str:
    """The hex SHA-256 of the kit's identity and the request, canonically serialised."""
    text = json.dumps({"kit": identity, "request": request}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class Ledger(Protocol):
    """Answers by fingerprint; ``get_many`` returns ``None`` where there is none (or it expired)."""

    def get_many(self, fingerprints: Sequence[str]) -> list[dict[str, Any] | None]: ...

    def put_many(self, entries: Mapping[str, dict[str, Any]]) -> None: ...

    def clear(self) -> int:
        """Forget every entry; returns how many there were."""

    def count(self) -> int: ...


def _pack(entry: dict[str, Any]) -> bytes:
    return zlib.compress(json.dumps(entry, separators=(",", ":")).encode(), 6)


def _unpack(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value: dict[str, Any] = json.loads(zlib.decompress(raw))
    except (zlib.error, ValueError):
        return None
    return value


class RedisLedger:
    """The fleet's ledger: one compressed value per answer, an index by age to stay within ``max_entries``."""

    def __init__(self, client: Any, *, ttl_s: float, max_entries: int) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.max_entries = max_entries

    def get_many(self, fingerprints: Sequence[str]) -> list[dict[str, Any] | None]:
        if not fingerprints:
            return []
        return [_unpack(raw) for raw in self.client.mget([LEDGER_PREFIX + fp for fp in fingerprints])]

    def put_many(self, entries: Mapping[str, dict[str, Any]]) -> None:
        if not entries:
            return
        now = time.time()
        with self.client.pipeline(transaction=False) as pipe:
            for fp, entry in entries.items():
                pipe.set(LEDGER_PREFIX + fp, _pack(entry), ex=int(self.ttl_s))
            pipe.zadd(_INDEX, dict.fromkeys(entries, now))
            pipe.zcard(_INDEX)
            size = int(pipe.execute()[-1])
        if size > self.max_entries:
            self._trim(size - self.max_entries)

    def _trim(self, excess: int) -> None:
        oldest = [fp.decode() if isinstance(fp, bytes) else fp for fp, _ in self.client.zpopmin(_INDEX, excess)]
        if oldest:
            self.client.delete(*[LEDGER_PREFIX + fp for fp in oldest])

    def clear(self) -> int:
        keys = list(self.client.scan_iter(match=LEDGER_PREFIX + "*", count=1000))
        for start in range(0, len(keys), 1000):
            self.client.delete(*keys[start : start + 1000])
        self.client.delete(_INDEX)
        return len(keys)

    def count(self) -> int:
        return int(self.client.zcard(_INDEX))


class SqliteLedger:
    """The embedded mode's ledger: a SQLite file, shared by kernels started in the same folder."""

    def __init__(self, path: Path, *, ttl_s: float, max_entries: int) -> None:
        self.path = Path(path)
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=5.0, check_same_thread=False)
            db.execute("CREATE TABLE IF NOT EXISTS ledger (fp TEXT PRIMARY KEY, value BLOB, at REAL)")
            db.execute("CREATE INDEX IF NOT EXISTS ledger_at ON ledger (at)")
            self._db = db
        return self._db

    def get_many(self, fingerprints: Sequence[str]) -> list[dict[str, Any] | None]:
        if not fingerprints:
            return []
        found: dict[str, bytes] = {}
        floor = time.time() - self.ttl_s
        with self._lock:
            db = self._connection()
            for start in range(0, len(fingerprints), 500):
                part = list(fingerprints[start : start + 500])
                marks = ",".join("?" * len(part))
                query = f"SELECT fp, value FROM ledger WHERE at >= ? AND fp IN ({marks})"
                found.update(db.execute(query, [floor, *part]).fetchall())
        return [_unpack(found.get(fp)) for fp in fingerprints]

    def put_many(self, entries: Mapping[str, dict[str, Any]]) -> None:
        if not entries:
            return
        now = time.time()
        with self._lock:
            db = self._connection()
            with db:
                db.executemany(
                    "INSERT OR REPLACE INTO ledger (fp, value, at) VALUES (?, ?, ?)",
                    [(fp, _pack(entry), now) for fp, entry in entries.items()],
                )
                (size,) = db.execute("SELECT COUNT(*) FROM ledger").fetchone()
                if size > self.max_entries:
                    db.execute(
                        "DELETE FROM ledger WHERE fp IN (SELECT fp FROM ledger ORDER BY at LIMIT ?)",
                        (size - self.max_entries,),
                    )

    def clear(self) -> int:
        with self._lock:
            db = self._connection()
            with db:
                (size,) = db.execute("SELECT COUNT(*) FROM ledger").fetchone()
                db.execute("DELETE FROM ledger")
        return int(size)

    def count(self) -> int:
        with self._lock:
            (size,) = self._connection().execute("SELECT COUNT(*) FROM ledger").fetchone()
        return int(size)
