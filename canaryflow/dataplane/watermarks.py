"""Watermarks: how far each record writer's records are known to be in the store.

A window is judged only once every writer that was alive during it has stored everything that
completed before the window's end: a record carries its completion time, so a slow request lands
in the window it ended in, and a window is never read before its late records arrive. Each model
service's record worker is one writer; it moves its mark whenever its queue is empty (everything
submitted before that moment is stored) and at least every `idle_s` while idle, which doubles as
a heartbeat: a writer that stopped beating is not waited for.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from typing import Any, Protocol

TABLE = "canaryflow_watermarks"
SCHEMA = (
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
        writer TEXT PRIMARY KEY,
        service TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        beat DOUBLE PRECISION NOT NULL
    )""",
)
_UPSERT = (
    f"INSERT INTO {TABLE} (writer, service, at, beat) VALUES (:writer, :service, :at, :beat) "
    "ON CONFLICT (writer) DO UPDATE SET at = excluded.at, beat = excluded.beat"
)


class Backend(Protocol):
    def create_schema(self, statements: tuple[str, ...]) -> None: ...
    def write_many(self, sql: str, rows: list[dict[str, Any]]) -> None: ...
    def query(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]: ...


def writer_id(service: str) -> str:
    return f"{service}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Watermarks:
    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        backend.create_schema(SCHEMA)

    def mark(self, writer: str, service: str, at: float) -> None:
        """Every record of `writer` that completed before `at` (epoch seconds) is stored."""
        row = {"writer": writer, "service": service, "at": at, "beat": time.time()}
        self._backend.write_many(_UPSERT, [row])

    def lowest(self, service: str, alive_since: float) -> float | None:
        """The lowest mark of the writers that beat since `alive_since`; None: no live writer."""
        rows = self._backend.query(
            f"SELECT MIN(at) FROM {TABLE} WHERE service = :service AND beat >= :since",
            {"service": service, "since": alive_since},
        )
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    def wait_until(
        self, service: str, until: float, *, alive_since: float, timeout_s: float,
        poll_s: float = 0.05,
    ) -> bool:  # fmt: skip
        """Wait until every live writer has stored what completed before `until`.

        False when `timeout_s` passed first (the caller must not treat the window as complete).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            lowest = self.lowest(service, alive_since)
            if lowest is not None and lowest >= until:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
