"""Where the request store's SQL runs: SQLite (WAL, a connection per thread) or PostgreSQL.

Both take the same SQL (named `:params`, `ON CONFLICT` upsert); `Store` picks one from its URL
with `open_backend`. `add_column` is the one migration step: a store made by an older canaryflow
gets the columns added since, and a store that has them is left alone.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from canaryflow.errors import ConfigError
from canaryflow.files import owner_only_sqlite


class Backend(Protocol):
    def create_schema(self, statements: Sequence[str]) -> None: ...
    def write_many(self, sql: str, rows: list[dict[str, Any]]) -> None: ...
    def query(self, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]: ...
    def add_column(self, table: str, column: str, declaration: str) -> None: ...
    def close(self) -> None: ...


class SqliteBackend:
    """One connection per thread (WAL lets readers run while the writer commits)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        owner_only_sqlite(path)  # prompts and answers: the users' data
        self._path = path
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()  # guards _connections; serialises this process's writers
        self._closed = False

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is not None:
            return connection
        with self._lock:
            if self._closed:
                raise ConfigError(f"store {self._path} is closed: open a new Store")
            connection = sqlite3.connect(
                self._path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            self._connections.append(connection)
        self._local.connection = connection
        return connection

    def create_schema(self, statements: Sequence[str]) -> None:
        for statement in statements:
            self._connection().execute(statement)

    def write_many(self, sql: str, rows: list[dict[str, Any]]) -> None:
        connection = self._connection()
        with self._lock:
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.executemany(sql, rows)
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def query(self, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        return self._connection().execute(sql, params).fetchall()

    def add_column(self, table: str, column: str, declaration: str) -> None:
        connection = self._connection()
        if column in {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}:
            return
        with self._lock:
            try:
                connection.execute(f'ALTER TABLE {table} ADD COLUMN "{column}" {declaration}')
            except sqlite3.OperationalError as exc:  # another process added it meanwhile
                if "duplicate column" not in str(exc):
                    raise

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for connection in self._connections:
                connection.close()
            self._connections.clear()


class SqlAlchemyBackend:
    """PostgreSQL through SQLAlchemy (psycopg 3 unless the URL names a driver); the engine pools."""

    def __init__(self, url: str) -> None:
        try:
            import sqlalchemy
        except ImportError as exc:
            raise ConfigError(
                f"the store URL {redact(url)} needs SQLAlchemy and psycopg: "
                "pip install canaryflow[postgres]"
            ) from exc
        self._sa = sqlalchemy
        if url.startswith(("postgresql://", "postgres://")):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        try:
            self._engine = sqlalchemy.create_engine(url, pool_pre_ping=True)
        except (ImportError, sqlalchemy.exc.NoSuchModuleError) as exc:
            raise ConfigError(
                f"the store URL {redact(url)} needs a database driver ({exc}): "
                "pip install canaryflow[postgres]"
            ) from exc

    def create_schema(self, statements: Sequence[str]) -> None:
        try:
            with self._engine.begin() as connection:
                # Two services opening the store at once would race on CREATE TABLE.
                connection.execute(self._sa.text("SELECT pg_advisory_xact_lock(7161993)"))
                for statement in statements:
                    connection.execute(self._sa.text(statement))
        except self._sa.exc.OperationalError as exc:
            raise ConfigError(
                f"cannot open the store at {redact(str(self._engine.url))}: {exc.orig}; "
                "check the URL and that the database is up"
            ) from exc

    def write_many(self, sql: str, rows: list[dict[str, Any]]) -> None:
        with self._engine.begin() as connection:
            connection.execute(self._sa.text(sql), rows)

    def query(self, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        with self._engine.connect() as connection:
            return [tuple(row) for row in connection.execute(self._sa.text(sql), dict(params))]

    def add_column(self, table: str, column: str, declaration: str) -> None:
        found = self.query(
            "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = :table AND column_name = :column",
            {"table": table, "column": column},
        )
        if not found:  # under create_schema's lock; IF NOT EXISTS for whoever raced past
            self.create_schema(
                (f'ALTER TABLE {table} ADD COLUMN IF NOT EXISTS "{column}" {declaration}',)
            )

    def close(self) -> None:
        self._engine.dispose()


def redact(url: str) -> str:
    """Hide a password in a URL before it reaches a message or a log."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url


def sqlite_path(url: str) -> str | None:
    """The database file of a SQLite store URL; None for any other kind."""
    if url.startswith(("postgresql", "postgres://")):
        return None
    if url.startswith("sqlite:///"):
        return url.removeprefix("sqlite:///")
    return None if "://" in url else url


def open_backend(url: str) -> Backend:
    if url.startswith(("postgresql", "postgres://")):
        return SqlAlchemyBackend(url)
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
    elif "://" in url:
        raise ConfigError(
            f"unsupported store URL {redact(url)}: use a file path, sqlite:///PATH "
            "or postgresql://USER@HOST/DB"
        )
    else:
        path = url
    if path in ("", ":memory:"):
        raise ConfigError(
            "the store needs a file: an in-memory SQLite database cannot be shared between the "
            "service's writer and the analysis' readers"
        )
    return SqliteBackend(Path(path))
