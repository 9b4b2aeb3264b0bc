"""Probes are recorded with their suite item and scored when written.

A real model service (uvicorn) over a real sandbox provider and a real SQLite store, its policy
naming a probes suite (a file of this test's): a synthetic request carrying
`x-canaryflow-probe: <suite>/<item id>` is stored with that reference and the item's verdict;
an unknown item is stored unscored; the same header on a user's request is ignored.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from canaryflow.contracts import ProbesChecker, RequestRecord, Role
from canaryflow.dataplane.resolver import CachedResolver
from canaryflow.dataplane.service import ServiceConfig, build_app
from canaryflow.dataplane.store import _SCHEMA, Store
from tests.integration.test_service import SERVICE, Registry, ServiceUnderTest, running, sandbox
from tests.waiting import wait_for

__all__ = ["sandbox"]  # the provider fixture, shared with test_service

SYNTHETIC = {"x-canaryflow-synthetic": "1", "x-canaryflow-role": "stable"}
ITEMS = [  # any answer passes the first; none can be exactly the second's text
    {"id": "any", "suite": "live", "kind": "fact", "input": "What is the capital of France?",
     "scorer": "regex", "expected": {"pattern": "\\S"}},
    {"id": "never", "suite": "live", "kind": "fact", "input": "What is the capital of Cuba?",
     "scorer": "exact", "expected": {"text": "no model answers with this sentence"}},
]  # fmt: skip


@pytest.fixture(scope="module")
def service(sandbox: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceUnderTest]:
    home = tmp_path_factory.mktemp("probes")
    suite = home / "live.jsonl"
    suite.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    store = Store(str(home / "records.db"))
    config = ServiceConfig(
        service=SERVICE,
        provider_urls={"sandbox": sandbox},
        default_version="1",
        checkers=(ProbesChecker(suite=str(suite)),),
        flush_every_s=0.05,
    )
    resolver = CachedResolver(Registry().fetch, ttl_s=60, retry_s=0.05)
    with running(build_app(config, resolver=resolver, store=store)) as urls:
        yield ServiceUnderTest(urls, Registry(), store)
    store.close()


def _stored(service: ServiceUnderTest, since: datetime, ids: set[str]) -> list[RequestRecord]:
    found = service.store.records(SERVICE, since, datetime.now(UTC), synthetic=None)
    return found if ids <= {r.request_id for r in found} else []


def test_a_probe_is_recorded_with_its_item_and_scored(service: ServiceUnderTest) -> None:
    start = datetime.now(UTC) - timedelta(milliseconds=1)
    sent = {
        "pass": ("live/any", SYNTHETIC),
        "fail": ("live/never", SYNTHETIC),
        "unknown": ("live/missing", SYNTHETIC),
        "user": ("live/any", {"x-canaryflow-role": "stable"}),  # not marked by Envoy
    }
    ids = {}
    for name, (ref, headers) in sent.items():
        probe = {**headers, "x-canaryflow-probe": ref}
        response = service.chat("What is the capital of France?", probe)
        assert response.status_code == 200, response.text
        ids[name] = response.headers["x-request-id"]
    records = wait_for(
        "4 records in the store", lambda: _stored(service, start, set(ids.values())), 10, 0.05
    )
    by_id = {r.request_id: r for r in records}
    got = {
        name: (by_id[i].probe, by_id[i].probe_passed, by_id[i].synthetic) for name, i in ids.items()
    }
    assert got == {
        "pass": ("live/any", True, True),
        "fail": ("live/never", False, True),
        "unknown": ("live/missing", None, True),
        "user": (None, None, False),
    }
    # What the probe_accuracy gate reads: the scored probes of stable version 1, one passed.
    count, passed, first = service.store.probe_counts(
        SERVICE, Role.STABLE, "1", start.timestamp(), datetime.now(UTC).timestamp()
    )
    assert (count, passed) == (2, 1) and first is not None
    # The users' reads never see a probe: it is synthetic.
    users = service.store.records(SERVICE, start, datetime.now(UTC))
    assert [r.request_id for r in users] == [ids["user"]]


def test_an_older_store_gets_the_probe_columns_on_open(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    before = _SCHEMA[0].replace(",\n        probe TEXT,\n        probe_passed SMALLINT", "")
    assert "probe" not in before  # the table as it was before probes
    with sqlite3.connect(path) as db:
        db.execute(before)
    with Store(str(path)) as store:
        sql = "EXPLAIN QUERY PLAN SELECT COUNT(*) FROM request_records WHERE service = 's' AND "
        sql += "role = 'stable' AND version = '1' AND at >= 0 AND probe_passed IS NOT NULL"
        plan = " ".join(str(row) for row in store._backend.query(sql, {}))
        assert "request_records_probes" in plan  # the probes' partial index, not a scan
    with sqlite3.connect(path) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(request_records)")}
    assert {"probe", "probe_passed"} <= columns
