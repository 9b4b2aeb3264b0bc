"""The paired request store: every request the model services saw, joined stable-to-shadow by id.

SQLite (WAL) by default; a `postgresql://` URL goes through SQLAlchemy when several services
write (`backends.py`: both speak the same SQL, so one set of queries serves both). A record is
keyed by (request_id, role, service): writing it again replaces it, which makes a retried batch
harmless.

Synthetic records (load a release asked for, marked by Envoy's synthetic listener) are stored
with `synthetic = 1` and every read leaves them out unless asked for them (`synthetic=None`: all,
`True`: only those): what a gate reads is user traffic only. A store made before the column
existed gets it on open (`_MIGRATIONS`), every old row a user's; so do the live checkers'
`unchecked` and `checks` columns (old rows: not unchecked, no checks named), and the probes'
`probe` and `probe_passed` (old rows: no probe).
Users' ratings (`/v1/feedback`) live in a table of their own, joined by request id
(`ratings.py`); an older store gets it on open too.

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
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from canaryflow.contracts import RequestRecord, Role
from canaryflow.dataplane.backends import open_backend, redact, sqlite_path
from canaryflow.dataplane.pii import mask_pii
from canaryflow.dataplane.ratings import Ratings
from canaryflow.dataplane.watermarks import Watermarks
from canaryflow.errors import ConfigError

__all__ = ["COLUMNS", "SALT_FILE", "Store", "hash_user", "load_salt", "mask_pii"]

TABLE = "request_records"
COLUMNS = tuple(RequestRecord.model_fields)  # the schema below lists each, in this order
_FLAGS = (
    "checked",
    "hallucination",
    "unsafe",
    "injection_leak",
    "refusal",
    "unchecked",
    "synthetic",
    "streamed",
    "probe_passed",
)
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
        refusal SMALLINT,
        unchecked SMALLINT NOT NULL DEFAULT 0,
        checks TEXT NOT NULL DEFAULT '',
        synthetic SMALLINT NOT NULL DEFAULT 0,
        streamed SMALLINT NOT NULL DEFAULT 0,
        ttft_ms DOUBLE PRECISION,
        inter_token_ms DOUBLE PRECISION,
        probe TEXT,
        probe_passed SMALLINT
    )""",
    f"CREATE UNIQUE INDEX IF NOT EXISTS {TABLE}_key ON {TABLE} ({', '.join(_KEY)})",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_service_at ON {TABLE} (service, at)",
)
_UPSERT = (
    f"INSERT INTO {TABLE} ({_COLS}) VALUES ({', '.join(f':{c}' for c in COLUMNS)}) "
    f"ON CONFLICT ({', '.join(_KEY)}) DO UPDATE SET "
    + ", ".join(f'"{c}" = excluded."{c}"' for c in COLUMNS if c not in _KEY)
)
# Columns added after the first schema: (name, declaration), added to an older store on open.
_MIGRATIONS = (
    ("synthetic", "SMALLINT NOT NULL DEFAULT 0"),
    ("streamed", "SMALLINT NOT NULL DEFAULT 0"),
    ("ttft_ms", "DOUBLE PRECISION"),
    ("inter_token_ms", "DOUBLE PRECISION"),
    ("unchecked", "SMALLINT NOT NULL DEFAULT 0"),
    ("checks", "TEXT NOT NULL DEFAULT ''"),
    ("probe", "TEXT"),
    ("probe_passed", "SMALLINT"),
)
# Probes only (a partial index: a few rows per minute), so a window's pooled probe counts never
# scan the users' rows; made after the migrations, which add its columns to an older store.
_PROBE_INDEX = (
    f"CREATE INDEX IF NOT EXISTS {TABLE}_probes ON {TABLE} (service, role, version, at) "
    "WHERE probe_passed IS NOT NULL"
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
        self._backend = open_backend(self.url)
        self._backend.create_schema(_SCHEMA)
        for column, declaration in _MIGRATIONS:
            self._backend.add_column(TABLE, column, declaration)
        self._backend.create_schema((_PROBE_INDEX,))
        self.watermarks = Watermarks(self._backend)
        self.ratings = Ratings(self._backend)  # users' ratings (`/v1/feedback`)
        self._salt_path = Path(salt_path) if salt_path is not None else None
        self._salt: bytes | None = None

    @property
    def salt_path(self) -> Path:
        """Where the user-id salt lives: the path given, else `user-salt` beside a SQLite file."""
        if self._salt_path is not None:
            return self._salt_path
        database = sqlite_path(self.url)
        if database is None:
            raise ConfigError(
                f"the store {redact(self.url)} needs a salt file for user ids "
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
        return f"Store({redact(self.url)!r})"

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
        synthetic: bool | None = False,
    ) -> list[RequestRecord]:
        """Records with since <= at < until, oldest first; users' only unless `synthetic`."""
        where, params = self._where(service, since, until, role, version, synthetic)
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
        synthetic: bool | None = False,
    ) -> int:
        where, params = self._where(service, since, until, role, version, synthetic)
        rows = self._backend.query(f"SELECT COUNT(*) FROM {TABLE} WHERE {where}", params)
        return int(rows[0][0])

    def user_traffic(self, service: str, since: datetime, until: datetime) -> tuple[int, float]:
        """Users' requests answered by stable or canary in the window, and the seconds from the
        first to the last of them: how busy the service is, without reading rows."""
        where, params = self._where(service, since, until, None, None, False)
        sql = (
            f"SELECT COUNT(*), MIN(at), MAX(at) FROM {TABLE} WHERE {where} "
            "AND role IN (:stable, :canary)"
        )
        params.update(stable=Role.STABLE.value, canary=Role.CANARY.value)
        count, first, last = self._backend.query(sql, params)[0]
        return int(count), 0.0 if first is None else float(last) - float(first)

    def probe_counts(
        self, service: str, role: Role, version: str, since: float, until: float
    ) -> tuple[int, int, float | None]:
        """Scored probes of one role and version with since <= at < until (epoch seconds):
        how many, how many passed, and when the first was answered (None: none)."""
        sql = (
            f"SELECT COUNT(*), SUM(probe_passed), MIN(at) FROM {TABLE} WHERE {_WINDOW} "
            "AND role = :role AND version = :version AND synthetic = 1 "
            "AND probe_passed IS NOT NULL"
        )
        params = {"service": service, "since": since, "until": until,
                  "role": Role(role).value, "version": version}  # fmt: skip
        count, passed, first = self._backend.query(sql, params)[0]
        return int(count), int(passed or 0), None if first is None else float(first)

    def pairs(
        self, service: str, since: datetime, until: datetime
    ) -> list[tuple[RequestRecord, RequestRecord]]:
        """(primary, shadow) per user request id; the primary (stable or canary) sets the
        window."""
        both = (
            ", ".join(f'p."{c}"' for c in COLUMNS) + ", " + ", ".join(f's."{c}"' for c in COLUMNS)
        )
        sql = (
            f"SELECT {both} FROM {TABLE} p JOIN {TABLE} s "
            "ON s.request_id = p.request_id AND s.service = p.service AND s.role = :shadow "
            "WHERE p.service = :service AND p.at >= :since AND p.at < :until "
            "AND p.role IN (:stable, :canary) AND p.synthetic = 0 ORDER BY p.at"
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
        synthetic: bool | None = False,
    ) -> list[RequestRecord]:
        """Up to n records drawn at random from the window, for a forensics bundle."""
        where, params = self._where(service, since, until, role, version, synthetic)
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
        synthetic: bool | None,
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
        if synthetic is not None:
            where += f" AND synthetic = {int(synthetic)}"
        return where, params
