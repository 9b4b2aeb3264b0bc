"""The paired store against real SQLite files and a real, throwaway PostgreSQL cluster."""

from __future__ import annotations

import re
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from canaryflow.contracts import RequestRecord, Role
from canaryflow.dataplane.store import COLUMNS, SALT_FILE, Store, hash_user, load_salt
from canaryflow.errors import ConfigError
from canaryflow.local.processes import free_port

T0 = datetime(2026, 1, 12, 9, 0, tzinfo=UTC)


def record(n: int, **fields: Any) -> RequestRecord:
    base: dict[str, Any] = {
        "request_id": f"req-{n}",
        "at": T0 + timedelta(seconds=n),
        "service": "svc",
        "version": "1",
        "role": Role.STABLE,
        "status": 200,
        "latency_ms": 10.0 + n,
    }
    return RequestRecord(**{**base, **fields})


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def salt_path(store_url: str, tmp_path: Path) -> Path | None:
    """SQLite keeps its salt beside the database; a PostgreSQL store is told where it is."""
    return None if store_url.startswith("sqlite") else tmp_path / "user-salt"


@pytest.fixture
def store(store_url: str, salt_path: Path | None) -> Iterator[Store]:
    with Store(store_url, salt_path=salt_path) as opened:
        yield opened


@pytest.fixture
def service() -> str:
    """Every test gets its own service: the PostgreSQL database is shared by the session."""
    return f"svc-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- both backends


def test_schema_names_every_request_record_field() -> None:
    assert set(COLUMNS) == set(RequestRecord.model_fields)


def test_records_round_trip_every_field(store: Store, service: str) -> None:
    original = record(
        1,
        service=service,
        role=Role.CANARY,
        version="7",
        user="user-3",
        status=502,
        latency_ms=123.456,
        tokens_in=11,
        tokens_out=22,
        cost_usd=0.00042,
        prompt="What is the capital of France?",
        response="Paris.",
        checked=True,
        hallucination=False,
        unsafe=None,
        injection_leak=True,
        refusal=False,
        at=T0.replace(microsecond=123456),
    )
    store.write([original])
    (back,) = store.records(service, T0, T0 + timedelta(minutes=1))
    assert back == original.model_copy(update={"user": hash_user("user-3", store.user_salt)})


def test_window_is_half_open_and_filters_by_role_and_version(store: Store, service: str) -> None:
    store.write(
        [
            record(0, service=service),
            record(1, service=service, role=Role.CANARY, version="2"),
            record(2, service=service, role=Role.SHADOW, version="2"),
            record(3, service=service),
            record(3, service="someone-else"),
        ]
    )
    since, until = T0, T0 + timedelta(seconds=3)
    assert [r.request_id for r in store.records(service, since, until)] == [
        "req-0",
        "req-1",
        "req-2",
    ]
    assert [r.request_id for r in store.records(service, since, until, role=Role.CANARY)] == [
        "req-1"
    ]
    assert store.count(service, since, until, version="2") == 2
    assert store.count(service, since, until, role=Role.STABLE, version="1") == 1
    assert store.count(service, T0 - timedelta(hours=1), T0) == 0


def test_naive_datetimes_are_read_as_utc(store: Store, service: str) -> None:
    store.write([record(5, service=service)])
    naive = T0.replace(tzinfo=None)
    assert store.count(service, naive, naive + timedelta(seconds=6)) == 1


def test_pairs_join_each_primary_with_its_shadow(store: Store, service: str) -> None:
    store.write(
        [
            record(1, service=service, response="stable answer"),
            record(1, service=service, role=Role.SHADOW, version="2", response="shadow answer"),
            record(2, service=service, role=Role.CANARY, version="2"),
            record(2, service=service, role=Role.SHADOW, version="3"),
            record(3, service=service),  # its shadow never arrived
            record(4, service=service, role=Role.SHADOW, version="2"),  # shadow without a primary
            record(1, service="other", role=Role.SHADOW, version="2"),  # same id, other service
        ]
    )
    pairs = store.pairs(service, T0, T0 + timedelta(minutes=1))
    assert [(p.request_id, p.role, s.role, s.version) for p, s in pairs] == [
        ("req-1", Role.STABLE, Role.SHADOW, "2"),
        ("req-2", Role.CANARY, Role.SHADOW, "3"),
    ]
    assert (pairs[0][0].response, pairs[0][1].response) == ("stable answer", "shadow answer")


def test_write_masks_pii_even_when_the_caller_did_not(store: Store, service: str) -> None:
    store.write(
        [
            record(
                1,
                service=service,
                prompt="I am jane@example.com, card 4111 1111 1111 1111",
                response="Use Bearer sk-abcdefghijklmnopqrstuv or call +44 20 7946 0958",
            )
        ]
    )
    (back,) = store.records(service, T0, T0 + timedelta(minutes=1))
    assert back.prompt == "I am [EMAIL], card [CARD]"
    assert back.response == "Use [SECRET] or call [PHONE]"


def test_writing_a_record_again_replaces_it(store: Store, service: str) -> None:
    store.write([record(1, service=service, checked=False)])
    store.write([record(1, service=service, checked=True, hallucination=True)])
    (back,) = store.records(service, T0, T0 + timedelta(minutes=1))
    assert back.checked and back.hallucination


def test_sample_draws_at_most_n_from_the_window(store: Store, service: str) -> None:
    store.write([record(n, service=service) for n in range(30)])
    picked = store.sample(service, T0, T0 + timedelta(seconds=20), 5)
    assert len(picked) == 5
    assert len({r.request_id for r in picked}) == 5
    assert all(T0 <= r.at < T0 + timedelta(seconds=20) for r in picked)
    assert len(store.sample(service, T0, T0 + timedelta(seconds=3), 10)) == 3


def test_reopening_keeps_the_schema_and_the_data(
    store_url: str, salt_path: Path | None, service: str
) -> None:
    with Store(store_url, salt_path=salt_path) as first:
        first.write([record(1, service=service)])
    with Store(store_url) as second:  # a reader needs no salt
        assert second.count(service, T0, T0 + timedelta(minutes=1)) == 1


def test_user_ids_are_stored_hashed_and_the_same_user_hashes_the_same(
    store_url: str, salt_path: Path | None, service: str
) -> None:
    with Store(store_url, salt_path=salt_path) as first:
        first.write([record(1, service=service, user="alice@corp"), record(2, service=service)])
    with Store(store_url, salt_path=salt_path) as second:  # reopened: same salt, same hash
        second.write([record(3, service=service, user="alice@corp")])
        second.write([record(4, service=service, user="bob")])
        users = [r.user for r in second.records(service, T0, T0 + timedelta(minutes=1))]
    alice, nobody, again, bob = users
    assert alice is not None and re.fullmatch(r"u_[0-9a-f]{16}", alice)
    assert (nobody, again) == (None, alice)
    assert bob != alice and bob is not None and bob.startswith("u_")
    assert not any("alice" in str(u) or u == "bob" for u in users)


def test_the_salt_is_made_once_owner_only_beside_a_sqlite_store(tmp_path: Path) -> None:
    with Store(tmp_path / "records.db") as first:
        first.write([record(1, user="user-9")])
        salt = first.user_salt
    path = tmp_path / SALT_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    with Store(f"sqlite:///{tmp_path / 'records.db'}") as second:
        assert second.user_salt == salt  # read back, not made again
        (back,) = second.records("svc", T0, T0 + timedelta(minutes=1))
    assert back.user == hash_user("user-9", salt)
    assert b"user-9" not in (tmp_path / "records.db").read_bytes()
    assert salt.decode() not in (tmp_path / "records.db").read_bytes().decode("latin-1")


def test_a_salt_file_left_readable_by_others_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "salt"
    path.write_text("f" * 64)
    path.chmod(0o644)
    assert load_salt(path) == b"f" * 64
    assert path.stat().st_mode & 0o777 == 0o600


def test_services_starting_at_once_share_one_salt(tmp_path: Path) -> None:
    path = tmp_path / "shared" / "user-salt"
    salts: list[bytes] = []
    threads = [threading.Thread(target=lambda: salts.append(load_salt(path))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(salts) == 8 and len(set(salts)) == 1
    assert [p.name for p in path.parent.iterdir()] == ["user-salt"]  # no temporary left


def test_a_postgresql_store_without_a_salt_path_refuses_to_write(postgres_url: str) -> None:
    with Store(postgres_url) as store:
        assert store.count("nobody", T0, T0 + timedelta(minutes=1)) == 0  # reading is fine
        with pytest.raises(ConfigError, match="salt file for user ids"):
            store.write([record(1, service=f"svc-{uuid.uuid4().hex[:8]}", user="u")])


def test_a_writer_thread_and_a_reader_thread_share_the_store(store: Store, service: str) -> None:
    batches, size = 40, 25
    seen: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def write() -> None:
        try:
            for b in range(batches):
                store.write([record(b * size + i, service=service) for i in range(size)])
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    def read() -> None:
        try:
            while not done.is_set():
                seen.append(store.count(service, T0, T0 + timedelta(days=1)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write), threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert seen == sorted(seen)  # readers see whole batches, in order
    assert all(count % size == 0 for count in seen)
    assert store.count(service, T0, T0 + timedelta(days=1)) == batches * size


# --------------------------------------------------------------------------- SQLite specifics


def test_sqlite_runs_in_wal_mode_with_a_bare_path(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "records.db"
    with Store(str(path)):
        pass
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    index_names = {
        row[0] for row in sqlite3.connect(path).execute("SELECT name FROM sqlite_master")
    }
    assert {"request_records_key", "request_records_service_at"} <= index_names


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://u:secret@host/db", "unsupported store URL"),
        (":memory:", "needs a file"),
        ("postgresql+nosuchdriver://u@host/db", "pip install canaryflow[postgres]"),
    ],
)
def test_bad_store_urls_say_what_to_do(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as caught:
        Store(url)
    assert "secret" not in str(caught.value)


def test_an_unreachable_postgresql_is_a_clear_error() -> None:
    # `make test` installs the [postgres] extra: a missing driver fails here, it never skips.
    with pytest.raises(ConfigError, match="check the URL and that the database is up"):
        Store(f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/postgres")


def test_user_traffic_counts_primary_users_and_their_span(store: Store, service: str) -> None:
    records = [record(n, service=service) for n in range(10)]  # one a second, stable
    records += [record(n, service=service, role=Role.CANARY) for n in range(10, 15)]
    records += [record(n, service=service, role=Role.SHADOW) for n in range(15, 40)]  # mirror
    records += [record(n, service=service, synthetic=True) for n in range(40, 60)]  # not users
    store.write(records)
    since, until = T0 - timedelta(seconds=1), T0 + timedelta(seconds=100)
    assert store.user_traffic(service, since, until) == (15, pytest.approx(14.0))
    assert store.user_traffic(service, until, until + timedelta(seconds=5)) == (0, 0.0)
