"""Users' ratings of answers (`POST /v1/feedback`), joined to their requests by request id.

A table of its own rather than columns of `request_records`: the record worker rewrites a
record whole (a retried batch, a late verdict), which would wipe a rating stored beside it. One
row per (request_id, service); rating again replaces the score (the latest counts) and counts
the change in `ratings`. A store made before ratings existed gets the table when it is opened
(`CREATE TABLE IF NOT EXISTS`, the store's migration step for a new table), its records intact.

Only the rating is kept: the score as sent, the same score on 0 (worst) .. 1 (best) and whether
it was negative, both from the service's scale (`FeedbackChecker`), so a reader needs no scale
of its own. A rating's role and version are its request's, read by the join; only a primary
answer (stable or canary) can be rated, since users never see a shadow's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from canaryflow.contracts import Role

TABLE = "request_feedback"
RECORDS = "request_records"  # the store's table (store.TABLE; not imported: store imports this)
SCHEMA = (
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
        request_id TEXT NOT NULL,
        service TEXT NOT NULL,
        score DOUBLE PRECISION NOT NULL,
        scaled DOUBLE PRECISION NOT NULL,
        negative SMALLINT NOT NULL,
        rated_at DOUBLE PRECISION NOT NULL,
        ratings INTEGER NOT NULL DEFAULT 1,
        PRIMARY KEY (request_id, service)
    )""",
)
_UPSERT = (
    f"INSERT INTO {TABLE} (request_id, service, score, scaled, negative, rated_at, ratings) "
    "VALUES (:request_id, :service, :score, :scaled, :negative, :rated_at, 1) "
    "ON CONFLICT (request_id, service) DO UPDATE SET score = excluded.score, "
    f"scaled = excluded.scaled, negative = excluded.negative, rated_at = excluded.rated_at, "
    f"ratings = {TABLE}.ratings + 1"
)
_PRIMARY = f"r.role IN ('{Role.STABLE.value}', '{Role.CANARY.value}')"


class Backend(Protocol):
    def create_schema(self, statements: tuple[str, ...]) -> None: ...
    def write_many(self, sql: str, rows: list[dict[str, Any]]) -> None: ...
    def query(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]: ...


@dataclass(frozen=True)
class Rated:
    """The request a rating was joined to, and whether it replaced an earlier rating."""

    role: str
    version: str
    synthetic: bool
    replaced: bool


@dataclass(frozen=True)
class Rating:
    """One stored rating as the analysis reads it: on 0..1, and whether it was negative."""

    scaled: float
    negative: bool


class Ratings:
    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        backend.create_schema(SCHEMA)

    def rated_request(self, service: str, request_id: str) -> tuple[str, str, bool] | None:
        """(role, version, synthetic) of the answer a user saw; None: no such request stored."""
        rows = self._backend.query(
            f"SELECT r.role, r.version, r.synthetic FROM {RECORDS} r "
            f"WHERE r.request_id = :request_id AND r.service = :service AND {_PRIMARY} LIMIT 1",
            {"request_id": request_id, "service": service},
        )
        return (str(rows[0][0]), str(rows[0][1]), bool(rows[0][2])) if rows else None

    def rate(
        self,
        service: str,
        request_id: str,
        *,
        score: float,
        scaled: float,
        negative: bool,
        at: float,
    ) -> Rated | None:
        """Store (or replace) the rating of a stored request; None when the request is unknown
        (nothing is written)."""
        found = self.rated_request(service, request_id)
        if found is None:
            return None
        before = self._backend.query(
            f"SELECT 1 FROM {TABLE} WHERE request_id = :request_id AND service = :service",
            {"request_id": request_id, "service": service},
        )
        row = {
            "request_id": request_id,
            "service": service,
            "score": float(score),
            "scaled": float(scaled),
            "negative": int(negative),
            "rated_at": at,
        }
        self._backend.write_many(_UPSERT, [row])
        role, version, synthetic = found
        return Rated(role, version, synthetic, replaced=bool(before))

    def window(
        self, service: str, role: Role | str, version: str, since: float, until: float
    ) -> list[Rating]:
        """Ratings of the users' (not synthetic) `role` answers of `version` whose requests
        completed in [since, until): a rating counts in its answer's window, however late. A
        shadow has none: its copy shares the request id, but the rating is of the primary."""
        rows = self._backend.query(
            f"SELECT f.scaled, f.negative FROM {TABLE} f JOIN {RECORDS} r "
            "ON r.request_id = f.request_id AND r.service = f.service "
            "WHERE r.service = :service AND r.role = :role AND r.version = :version "
            f"AND r.at >= :since AND r.at < :until AND r.synthetic = 0 AND {_PRIMARY} "
            "ORDER BY r.at",
            {
                "service": service,
                "role": Role(role).value,
                "version": version,
                "since": since,
                "until": until,
            },
        )
        return [Rating(float(scaled), bool(negative)) for scaled, negative in rows]

    def get(self, service: str, request_id: str) -> tuple[float, float, bool, int] | None:
        """(score, scaled, negative, times rated) of one request's rating; None: not rated."""
        rows = self._backend.query(
            f"SELECT score, scaled, negative, ratings FROM {TABLE} "
            "WHERE request_id = :request_id AND service = :service",
            {"request_id": request_id, "service": service},
        )
        if not rows:
            return None
        score, scaled, negative, ratings = rows[0]
        return float(score), float(scaled), bool(negative), int(ratings)
