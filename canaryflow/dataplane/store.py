"""The paired request store: every request the model services saw, joined stable-to-shadow by id.

SQLite (WAL) by default, one connection per thread so the service's writer and the analysis'
readers never share a cursor; a `postgresql://` URL goes through SQLAlchemy when several services
write. Both speak the same SQL (named `:params`, `ON CONFLICT` upsert), so one set of queries serves
both. A record is keyed by (request_id, role, service): writing it again replaces it, which makes a
retried batch harmless.

Nothing raw is stored: `row_of` masks the text (`pii.mask_pii`) and replaces the user id with
`u_` + the first 16 hex digits of HMAC-SHA256(salt, id). The salt is made once per install, in a
file only its owner can read (`user-salt` next to a SQLite database, or the path given with
`salt_path` / `canaryflow serve --user-salt`); the same user always maps to the same hash, so
sticky analysis still works, and the salt never goes into the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import sqlite3
import tempfile
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from canaryflow.contracts import RequestRecord, Role
from canaryflow.dataplane.pii import mask_pii
from canaryflow.dataplane.watermarks import Watermarks
from canaryflow.errors import ConfigError

__all__ = ["COLUMNS", "SALT_FILE", "Store", "hash_user", "load_salt", "mask_pii"]

TABLE = "request_records"
COLUMNS = tuple(RequestRecord.model_fields)  # the schema below lists each, in this order
_FLAGS = ("checked", "hallucination", "unsafe", "injection_leak", "refusal")
_KEY = ("request_id", "role", "service")

# "user" is reserved in PostgreSQL: always quoted.
_COLS = ", ".join(f'"{c}"' for c in COLUMNS)
_SCHEMA = (
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
        request_id TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        service TEXT NOT NULL,
        version TEXT NOT NULL,
        role TEXT NOT NULL,
        "user" TEXT,
        status INTEGER NOT NULL,
        latency_ms DOUBLE PRECISION NOT NULL,
        tokens_in INTEGER NOT NULL,
        tokens_out INTEGER NOT NULL,
        cost_usd DOUBLE PRECISION NOT NULL,
        prompt TEXT NOT NULL,
        response TEXT NOT NULL,
        checked SMALLINT NOT NULL,
        hallucination SMALLINT,
        unsafe SMALLINT,
        injection_leak SMALLINT,
        refusal SMALLINT
    )""",
    f"CREATE UNIQUE INDEX IF NOT EXISTS {TABLE}_key ON {TABLE} ({', '.join(_KEY)})",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_service_at ON {TABLE} (service, at)",
)
_UPSERT = (
    f"INSERT INTO {TABLE} ({_COLS}) VALUES ({', '.join(f':{c}' for c in COLUMNS)}) "
    f"ON CONFLICT ({', '.join(_KEY)}) DO UPDATE SET "
    + ", ".join(f'"{c}" = excluded."{c}"' for c in COLUMNS if c not in _KEY)
)
_WINDOW = "service = :service AND at >= :since AND at < :until"
SALT_FILE = "user-salt"
_SALT_HEX = 64  # 32 random bytes, written as hex


def load_salt(path: str | Path) -> bytes:
    """The install's salt for user ids: read from `path`, made there first if missing (0600).

    Two services starting at once race safely: each writes a private temporary file and links
    it into place; whoever loses the race reads the winner's salt.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)  # 0600
        try:
            with os.fdopen(fd, "w", encoding="ascii") as file:
                file.write(secrets.token_hex(_SALT_HEX // 2) + "\n")
                file.flush()
                os.fsync(file.fileno())
            with contextlib.suppress(FileExistsError):  # another process made it first
                os.link(temporary, path)
        finally:
            os.unlink(temporary)
    try:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)  # owner-only, whoever made it
        salt = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the user-id salt {path}: {exc}") from exc
    if len(salt) < 32:
        raise ConfigError(f"the user-id salt {path} is too short: remove it to make a new one")
    return salt.encode("ascii")


def hash_user(user: str | None, salt: bytes) -> str | None:
    """`u_` + 16 hex digits of HMAC-SHA256(salt, user); no user (None or empty) stays None."""
    if not user:
        return None
    return "u_" + hmac.new(salt, user.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


class _Backend(Protocol):
    def create_schema(self, statements: Sequence[str]) -> None: ...
    def write_many(self, sql: str, rows: list[dict[str, Any]]) -> None: ...
    def query(self, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]: ...
    def close(self) -> None: ...


class _SqliteBackend:
    """One connection per thread (WAL lets readers run while the writer commits)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
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

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for connection in self._connections:
                connection.close()
            self._connections.clear()


class _SqlAlchemyBackend:
    """PostgreSQL through SQLAlchemy (psycopg 3 unless the URL names a driver); the engine pools."""

    def __init__(self, url: str) -> None:
        try:
            import sqlalchemy
        except ImportError as exc:
            raise ConfigError(
                f"the store URL {_redact(url)} needs SQLAlchemy and psycopg: "
                "pip install canaryflow[postgres]"
            ) from exc
        self._sa = sqlalchemy
        if url.startswith(("postgresql://", "postgres://")):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        try:
            self._engine = sqlalchemy.create_engine(url, pool_pre_ping=True)
        except (ImportError, sqlalchemy.exc.NoSuchModuleError) as exc:
            raise ConfigError(
                f"the store URL {_redact(url)} needs a database driver ({exc}): "
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
                f"cannot open the store at {_redact(str(self._engine.url))}: {exc.orig}; "
                "check the URL and that the database is up"
            ) from exc

    def write_many(self, sql: str, rows: list[dict[str, Any]]) -> None:
        with self._engine.begin() as connection:
            connection.execute(self._sa.text(sql), rows)

    def query(self, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        with self._engine.connect() as connection:
            return [tuple(row) for row in connection.execute(self._sa.text(sql), dict(params))]

    def close(self) -> None:
        self._engine.dispose()


def _redact(url: str) -> str:
    """Hide a password in a URL before it reaches a message or a log."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url


def _sqlite_path(url: str) -> str | None:
    """The database file of a SQLite store URL; None for any other kind."""
    if url.startswith(("postgresql", "postgres://")):
        return None
    if url.startswith("sqlite:///"):
        return url.removeprefix("sqlite:///")
    return None if "://" in url else url


def _open(url: str) -> _Backend:
    if url.startswith(("postgresql", "postgres://")):
        return _SqlAlchemyBackend(url)
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
    elif "://" in url:
        raise ConfigError(
            f"unsupported store URL {_redact(url)}: use a file path, sqlite:///PATH "
            "or postgresql://USER@HOST/DB"
        )
    else:
        path = url
    if path in ("", ":memory:"):
        raise ConfigError(
            "the store needs a file: an in-memory SQLite database cannot be shared between the "
            "service's writer and the analysis' readers"
        )
    return _SqliteBackend(Path(path))


def _epoch(moment: datetime) -> float:
    """Naive datetimes are taken as UTC, so the same window means the same rows everywhere."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def row_of(record: RequestRecord, *, salt: bytes, masked: bool = False) -> dict[str, Any]:
    """The stored form of a record: text masked (again, unless the caller says it ran
    `mask_pii` on both texts already), user id hashed, flags as integers."""
    row = record.model_dump()
    row["at"] = _epoch(record.at)
    row["role"] = record.role.value
    row["user"] = hash_user(record.user, salt)
    if not masked:
        row["prompt"] = mask_pii(record.prompt)
        row["response"] = mask_pii(record.response)
    for flag in _FLAGS:
        if row[flag] is not None:
            row[flag] = int(row[flag])
    return row


def _record(values: Sequence[Any]) -> RequestRecord:
    data = dict(zip(COLUMNS, values, strict=True))
    data["at"] = datetime.fromtimestamp(data["at"], UTC)
    for flag in _FLAGS:
        if data[flag] is not None:
            data[flag] = bool(data[flag])
    return RequestRecord(**data)


class Store:
    """Write request records in batches; read them back by service and time window."""

    def __init__(self, url: str | Path, *, salt_path: str | Path | None = None) -> None:
        self.url = str(url)
        self._backend = _open(self.url)
        self._backend.create_schema(_SCHEMA)
        self.watermarks = Watermarks(self._backend)
        self._salt_path = Path(salt_path) if salt_path is not None else None
        self._salt: bytes | None = None

    @property
    def salt_path(self) -> Path:
        """Where the user-id salt lives: the path given, else `user-salt` beside a SQLite file."""
        if self._salt_path is not None:
            return self._salt_path
        database = _sqlite_path(self.url)
        if database is None:
            raise ConfigError(
                f"the store {_redact(self.url)} needs a salt file for user ids "
                "(Store(url, salt_path=...), canaryflow serve --user-salt PATH): the same file "
                "for every service writing to it, so a user hashes the same everywhere"
            )
        return Path(database).parent / SALT_FILE

    @property
    def user_salt(self) -> bytes:
        """The install's salt (made on first use, owner-only); readers never need it."""
        if self._salt is None:
            self._salt = load_salt(self.salt_path)
        return self._salt

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({_redact(self.url)!r})"

    def write(self, records: Sequence[RequestRecord]) -> None:
        """One transaction per batch; text is masked and user ids hashed here, from raw records."""
        salt = self.user_salt
        self.write_rows([row_of(r, salt=salt) for r in records])

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        """One transaction for rows made by `row_of` (the model service makes them on its event
        loop, so the thread that writes holds the GIL as briefly as possible)."""
        if rows:
            self._backend.write_many(_UPSERT, rows)

    def records(
        self,
        service: str,
        since: datetime,
        until: datetime,
        *,
        role: Role | None = None,
        version: str | None = None,
    ) -> list[RequestRecord]:
        """Records with since <= at < until, oldest first."""
        where, params = self._where(service, since, until, role, version)
        rows = self._backend.query(f"SELECT {_COLS} FROM {TABLE} WHERE {where} ORDER BY at", params)
        return [_record(row) for row in rows]

    def count(
        self,
        service: str,
        since: datetime,
        until: datetime,
        *,
        role: Role | None = None,
        version: str | None = None,
    ) -> int:
        where, params = self._where(service, since, until, role, version)
        rows = self._backend.query(f"SELECT COUNT(*) FROM {TABLE} WHERE {where}", params)
        return int(rows[0][0])

    def pairs(
        self, service: str, since: datetime, until: datetime
    ) -> list[tuple[RequestRecord, RequestRecord]]:
        """(primary, shadow) per request id; the primary (stable or canary) sets the window."""
        both = (
            ", ".join(f'p."{c}"' for c in COLUMNS) + ", " + ", ".join(f's."{c}"' for c in COLUMNS)
        )
        sql = (
            f"SELECT {both} FROM {TABLE} p JOIN {TABLE} s "
            "ON s.request_id = p.request_id AND s.service = p.service AND s.role = :shadow "
            "WHERE p.service = :service AND p.at >= :since AND p.at < :until "
            "AND p.role IN (:stable, :canary) ORDER BY p.at"
        )
        params = {
            "service": service,
            "since": _epoch(since),
            "until": _epoch(until),
            "shadow": Role.SHADOW.value,
            "stable": Role.STABLE.value,
            "canary": Role.CANARY.value,
        }
        width = len(COLUMNS)
        return [
            (_record(row[:width]), _record(row[width:])) for row in self._backend.query(sql, params)
        ]

    def sample(
        self,
        service: str,
        since: datetime,
        until: datetime,
        n: int,
        *,
        role: Role | None = None,
        version: str | None = None,
    ) -> list[RequestRecord]:
        """Up to n records drawn at random from the window, for a forensics bundle."""
        where, params = self._where(service, since, until, role, version)
        rows = self._backend.query(
            f"SELECT {_COLS} FROM {TABLE} WHERE {where} ORDER BY random() LIMIT :n",
            {**params, "n": max(0, int(n))},
        )
        return sorted((_record(row) for row in rows), key=lambda r: r.at)

    def close(self) -> None:
        self._backend.close()

    @staticmethod
    def _where(
        service: str,
        since: datetime,
        until: datetime,
        role: Role | None,
        version: str | None,
    ) -> tuple[str, dict[str, Any]]:
        where = _WINDOW
        params: dict[str, Any] = {
            "service": service,
            "since": _epoch(since),
            "until": _epoch(until),
        }
        if role is not None:
            where += " AND role = :role"
            params["role"] = Role(role).value
        if version is not None:
            where += " AND version = :version"
            params["version"] = version
        return where, params
