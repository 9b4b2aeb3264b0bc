"""Replay provider answers: the same (manifest, messages, parameters) never costs twice.

A dict in front answers repeated lookups in microseconds; SQLite (WAL) behind it, when a path is
given, keeps answers across runs and lets several processes share them.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from pathlib import Path
from typing import Any

from canaryflow.contracts import canonical_json
from canaryflow.files import owner_only_sqlite
from canaryflow.providers.client import Completion

_SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    key TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    tokens_in INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    latency_ms REAL NOT NULL,
    status INTEGER NOT NULL
)
"""


class ResponseCache:
    """Thread-safe answer cache; `ResponseCache(None)` keeps everything in memory only."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._memory: dict[str, Completion] = {}
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            owner_only_sqlite(path)  # answers to evaluation prompts, which may be private
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a commit does not wait for fsync; a crash loses at most recent answers.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.execute(_SCHEMA)

    @staticmethod
    def key(
        manifest_digest: str, messages: list[dict[str, str]], parameters: dict[str, Any]
    ) -> str:
        text = canonical_json([manifest_digest, messages, parameters])
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, key: str) -> Completion | None:
        hit = self._memory.get(key)
        if hit is not None or self._db is None:
            return hit
        with self._lock:
            row = self._db.execute(
                "SELECT text, tokens_in, tokens_out, cost_usd, latency_ms, status "
                "FROM completions WHERE key = ?",
                (key,),
            ).fetchone()
        if row is None:
            return None
        hit = Completion(*row)
        self._memory[key] = hit
        return hit

    def put(self, key: str, completion: Completion) -> None:
        self._memory[key] = completion
        if self._db is None:
            return
        c = completion
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO completions VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, c.text, c.tokens_in, c.tokens_out, c.cost_usd, c.latency_ms, c.status),
            )

    def __len__(self) -> int:
        if self._db is None:
            return len(self._memory)
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM completions").fetchone()
        return int(count)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
