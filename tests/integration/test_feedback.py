"""Users' ratings: `POST /v1/feedback` on a real model service over real HTTP (a real sandbox
provider, a real SQLite store), and the ratings table itself on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from canaryflow.analysis.sources import StoreSource
from canaryflow.contracts import FeedbackChecker, PatternsChecker, RequestRecord, Role
from canaryflow.dataplane.ratings import TABLE, Rating
from canaryflow.dataplane.resolver import CachedResolver
from canaryflow.dataplane.service import ServiceConfig, build_app
from canaryflow.dataplane.store import Store
from canaryflow.local.processes import ManagedProcess, free_port, http_ok
from tests.integration.test_service import SERVICE, Registry, ServiceUnderTest, running
from tests.waiting import wait_for

SCALE = FeedbackChecker(min_score=1, max_score=5)  # stars; below 3 is negative
LATER = datetime.now(UTC) + timedelta(days=1)
EARLIER = datetime.now(UTC) - timedelta(days=1)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = ManagedProcess(
        "sandbox",
        [sys.executable, "-m", "canaryflow.sandbox", "--host", "127.0.0.1", "--port", str(port)],
        tmp_path_factory.mktemp("sandbox") / "sandbox.log",
        http_ok(f"{url}/health"),
    ).start(timeout_s=30)
    yield url
    process.stop()


@pytest.fixture(scope="module")
def service(sandbox: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceUnderTest]:
    store = Store(str(tmp_path_factory.mktemp("store") / "records.db"))
    registry = Registry()
    config = ServiceConfig(
        service=SERVICE,
        provider_urls={"sandbox": sandbox},
        default_version="1",
        checkers=(SCALE, PatternsChecker()),  # the feedback entry is the route's, not a checker
        flush_every_s=0.05,
    )
    resolver = CachedResolver(registry.fetch, ttl_s=30, retry_s=0.05)
    with running(build_app(config, resolver=resolver, store=store)) as urls:
        yield ServiceUnderTest(urls, registry, store)
    store.close()


def answered(service: ServiceUnderTest, headers: dict[str, str] | None = None) -> str:
    """The request id of a fresh answer, once its record is in the store."""
    response = service.chat("What is the capital of France?", headers=headers)
    assert response.status_code == 200, response.text
    request_id = response.headers["x-request-id"]
    store: Store = service.store

    def stored() -> bool:
        return store.ratings.rated_request(SERVICE, request_id) is not None

    wait_for("the answer's record", stored, 10, 0.05)
    return request_id


def rate(service: ServiceUnderTest, request_id: str, score: object) -> httpx.Response:
    return service.client.post("/v1/feedback", json={"request_id": request_id, "score": score})


def test_a_rating_is_joined_to_its_request(service: ServiceUnderTest) -> None:
    before = service.metric("canaryflow_feedback_score_count", version="1", role="stable")
    request_id = answered(service)
    r = rate(service, request_id, 4)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "request_id": request_id,
        "score": 4.0,
        "negative": False,
        "replaced": False,
    }
    store: Store = service.store
    assert store.ratings.get(SERVICE, request_id) == (4.0, 0.75, False, 1)
    joined = store.ratings.window(SERVICE, Role.STABLE, "1", EARLIER.timestamp(), LATER.timestamp())
    assert Rating(0.75, False) in joined
    after = service.metric("canaryflow_feedback_score_count", version="1", role="stable")
    assert after == before + 1
    assert service.metric("canaryflow_feedback_calls_total", outcome="rated") >= 1


def test_rating_again_keeps_the_latest(service: ServiceUnderTest) -> None:
    request_id = answered(service)
    negatives = service.metric("canaryflow_feedback_negative_total", version="1", role="stable")
    assert rate(service, request_id, 5).status_code == 200
    again = rate(service, request_id, 1)
    assert again.status_code == 200, again.text
    assert again.json()["replaced"] is True and again.json()["negative"] is True
    store: Store = service.store
    assert store.ratings.get(SERVICE, request_id) == (1.0, 0.0, True, 2)
    assert rate(service, request_id, 1).json()["replaced"] is True  # the same again: no change
    assert store.ratings.get(SERVICE, request_id) == (1.0, 0.0, True, 3)
    count = store.ratings._backend.query(  # one row, whatever the number of ratings
        f"SELECT COUNT(*) FROM {TABLE} WHERE request_id = :id", {"id": request_id}
    )
    assert count[0][0] == 1
    after = service.metric("canaryflow_feedback_negative_total", version="1", role="stable")
    assert after == negatives + 2
    assert service.metric("canaryflow_feedback_calls_total", outcome="rerated") >= 2


def test_a_canary_answer_is_rated_as_the_canary_version(service: ServiceUnderTest) -> None:
    request_id = answered(service, {"x-canaryflow-role": "canary", "x-canaryflow-version": "2"})
    assert rate(service, request_id, 2.5).status_code == 200
    store: Store = service.store
    sample = StoreSource(store).window(SERVICE, "1", "2", EARLIER, LATER)
    assert sample.candidate.ratings == (0.375,) and sample.candidate.negative_ratings == 1
    assert sample.candidate_role == "canary"


def test_an_unknown_request_id_is_404_with_what_to_do(service: ServiceUnderTest) -> None:
    r = rate(service, f"never-{uuid.uuid4().hex}", 3)
    assert r.status_code == 404
    message = r.json()["error"]["message"]
    assert "x-request-id" in message and "retry" in message
    assert r.headers["retry-after"] == "5"
    assert r.json()["error"]["type"] == "unknown_request"


def test_a_shadows_answer_cannot_be_rated(service: ServiceUnderTest) -> None:
    request_id = f"shadow-only-{uuid.uuid4().hex}"
    mirrored = {
        "x-request-id": request_id,
        "host": f"{SERVICE}-shadow",
        "x-canaryflow-mirror": "1",
        "x-canaryflow-shadow-version": "2",
    }
    assert service.chat("hi", headers=mirrored).status_code == 200
    store: Store = service.store

    def shadow_stored() -> bool:
        return bool(store.records(SERVICE, EARLIER, LATER, role=Role.SHADOW, version="2"))

    wait_for("the shadow's record", shadow_stored, 10, 0.05)
    assert rate(service, request_id, 3).status_code == 404


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"score": 3}', "request_id must be a non-empty string"),
        (b'{"request_id": "", "score": 3}', "request_id must be a non-empty string"),
        (b'{"request_id": "x"}', "score must be a number"),
        (b'{"request_id": "x", "score": "4"}', "score must be a number"),
        (b'{"request_id": "x", "score": true}', "score must be a number"),
        (b'{"request_id": "x", "score": NaN}', "score must be a number"),
        (b'{"request_id": "x", "score": 0}', "outside this service's scale 1 to 5"),
        (b'{"request_id": "x", "score": 5.5}', "outside this service's scale 1 to 5"),
        (b'{"request_id": "x", "score": 3, "comment": "meh"}', "unknown field(s) comment"),
        (b'{"request_id": "' + b"x" * 201 + b'", "score": 3}', "at most 200"),
    ],
)
def test_a_bad_body_is_400_saying_what_to_send(
    service: ServiceUnderTest, body: bytes, says: str
) -> None:
    r = service.client.post(
        "/v1/feedback", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert says in message
    assert '"request_id"' in message and "from 1 to 5" in message  # what to send instead
    assert "meh" not in message


def test_an_oversized_body_is_413_and_not_echoed(service: ServiceUnderTest) -> None:
    secret = "do-not-echo-" + "x" * (1024 * 1024)
    r = service.client.post("/v1/feedback", json={"request_id": secret, "score": 3})
    assert r.status_code == 413
    assert "1048576 bytes" in r.text and "do-not-echo" not in r.text

    def chunks() -> Iterator[bytes]:  # no Content-Length: read up to the cap, then refused
        yield b'{"request_id": "do-not-echo'
        for _ in range(20):
            yield b"y" * 65536

    r = service.client.post("/v1/feedback", content=chunks())
    assert r.status_code == 413 and "do-not-echo" not in r.text
    assert service.metric("canaryflow_feedback_calls_total", outcome="too_large") >= 2


def test_only_post_is_served(service: ServiceUnderTest) -> None:
    assert service.client.get("/v1/feedback").status_code == 405


def test_a_service_without_a_store_says_so(sandbox: str) -> None:
    config = ServiceConfig(service=SERVICE, provider_urls={"sandbox": sandbox}, default_version="1")
    resolver = CachedResolver(Registry().fetch, ttl_s=30, retry_s=0.05)
    with running(build_app(config, resolver=resolver)) as (url, _admin):
        r = httpx.post(f"{url}/v1/feedback", json={"request_id": "abc", "score": 1})
    assert r.status_code == 503
    assert "--store" in r.json()["error"]["message"]


# --------------------------------------------------------------------------- the table


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        url, salt = f"sqlite:///{tmp_path / 'store.db'}", None
    else:
        url, salt = request.getfixturevalue("postgres_url"), tmp_path / "user-salt"
    with Store(url, salt_path=salt) as opened:
        yield opened


T0 = datetime(2026, 1, 12, 9, 0, tzinfo=UTC)


def record(service: str, n: int, role: Role = Role.STABLE, **fields: object) -> RequestRecord:
    return RequestRecord(
        request_id=f"req-{n}",
        at=T0 + timedelta(seconds=n),
        service=service,
        version="1" if role is Role.STABLE else "2",
        role=role,
        status=200,
        latency_ms=10.0,
        **fields,  # type: ignore[arg-type]
    )


def test_ratings_join_primary_user_answers_in_their_window(store: Store) -> None:
    service = f"svc-{uuid.uuid4().hex[:8]}"
    store.write(
        [
            record(service, 1),
            record(service, 2, Role.CANARY),
            record(service, 2, Role.SHADOW),  # the same request's mirrored copy
            record(service, 3, synthetic=True),
            record(service, 70),  # outside the window below
        ]
    )
    ratings = store.ratings
    for n, score in ((1, 1.0), (2, 0.0), (3, 1.0), (70, 0.5)):
        rated = ratings.rate(
            service, f"req-{n}", score=score, scaled=score, negative=score < 0.5, at=0
        )
        assert rated is not None
    assert ratings.rate(service, "req-404", score=1, scaled=1, negative=False, at=0) is None
    assert ratings.rate("another", "req-1", score=1, scaled=1, negative=False, at=0) is None
    since, until = T0.timestamp(), (T0 + timedelta(seconds=60)).timestamp()
    assert ratings.window(service, Role.STABLE, "1", since, until) == [Rating(1.0, False)]
    assert ratings.window(service, Role.CANARY, "2", since, until) == [Rating(0.0, True)]
    assert ratings.window(service, Role.SHADOW, "2", since, until) == []
    rated = ratings.rate(service, "req-2", score=1.0, scaled=1.0, negative=False, at=1)
    assert rated is not None and (rated.role, rated.version, rated.replaced) == (
        "canary",
        "2",
        True,
    )
    assert ratings.window(service, Role.CANARY, "2", since, until) == [Rating(1.0, False)]
    store.write([record(service, 1)])  # the record written again keeps its rating
    assert ratings.get(service, "req-1") == (1.0, 1.0, False, 1)


def test_a_store_made_before_ratings_gets_the_table_on_open(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with Store(path) as old:
        old.write([record("svc", 1)])
    with sqlite3.connect(path) as connection:
        connection.execute(f"DROP TABLE {TABLE}")  # as an older canaryflow left it
    with Store(path) as reopened:
        assert [r.request_id for r in reopened.records("svc", T0, T0 + timedelta(hours=1))] == [
            "req-1"
        ]
        rated = reopened.ratings.rate("svc", "req-1", score=3, scaled=0.5, negative=False, at=0)
        assert rated is not None and rated.role == "stable"
