"""`canaryflow judge serve` over real HTTP: the command itself (uvicorn) in a process of its own,
on a free port, reading a real SQLite request store that this test fills with the project's own
writer; the answers are the policy's verdicts, as Argo Rollouts' web provider and Flagger read them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from canaryflow.contracts import RequestRecord, Role
from canaryflow.dataplane.store import Store
from canaryflow.local.processes import ManagedProcess, free_port, http_ok

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "deployments" / "policies" / "default.yaml"


@dataclass
class Judge:
    url: str
    store: Store
    client: httpx.Client

    def fill(self, service: str, version: str, role: Role, n: int, error_rate: float = 0.0) -> None:
        """`n` users' requests of the last 40 s, each checked and judged clean."""
        rng = np.random.default_rng(abs(hash((service, version, role.value))) % 2**32)
        now = datetime.now(UTC)
        errors = set(rng.choice(n, size=round(n * error_rate), replace=False).tolist())
        self.store.write(
            [
                RequestRecord(
                    request_id=f"{service}-{version}-{i}",
                    at=now - timedelta(seconds=float(rng.uniform(1.0, 40.0))),
                    service=service,
                    version=version,
                    role=role,
                    status=500 if i in errors else 200,
                    latency_ms=float(rng.uniform(40.0, 60.0)),
                    tokens_in=100,
                    tokens_out=50,
                    cost_usd=0.001,
                    checked=True,
                    hallucination=False,
                    unsafe=False,
                    injection_leak=False,
                    refusal=False,
                )
                for i in range(n)
            ]
        )

    def verdict(self, **params: str) -> httpx.Response:
        return self.client.get("/v1/verdict", params=params)

    def flagger(self, payload: dict[str, Any]) -> httpx.Response:
        return self.client.post("/v1/flagger/verdict", json=payload)


@pytest.fixture(scope="module")
def judge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Judge]:
    folder = tmp_path_factory.mktemp("judge-service")
    store_path = folder / "records.db"
    store = Store(store_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "canaryflow.app.cli", "judge", "serve", "--store", str(store_path),
        "--policy", str(POLICY), "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    process = ManagedProcess("judge", command, folder / "judge.log", http_ok(f"{url}/health"))
    process.start(timeout_s=60)
    client = httpx.Client(base_url=url, timeout=30)
    try:
        yield Judge(url, store, client)
    finally:
        client.close()
        process.stop()
        store.close()


def gates_of(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["gate"]: g for g in answer["gates"]}


def test_a_good_canary_passes_with_every_gate_and_its_evidence(judge: Judge) -> None:
    judge.fill("svc-good", "1", Role.STABLE, 300)
    judge.fill("svc-good", "2", Role.CANARY, 300)
    r = judge.verdict(service="svc-good", stable="1", canary="2", window="60s")
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["decision"] == "pass", answer["summary"]
    assert answer["policy"] == "default"
    assert answer["counts"]["requests"] == {"stable": 300, "canary": 300}
    assert answer["counts"]["errors"] == {"stable": 0, "canary": 0}
    assert answer["failed"] == []
    gates = gates_of(answer)
    assert {"observability", "latency_p95", "error_rate", "hallucination_rate"} <= set(gates)
    assert all(g["label"] == "pass" for g in gates.values()), gates
    assert gates["error_rate"]["evidence"]["n_candidate"] == 300
    window = answer["window"]
    start, end = datetime.fromisoformat(window["start"]), datetime.fromisoformat(window["end"])
    assert (end - start).total_seconds() == pytest.approx(60.0, abs=0.01)
    assert window["requested_seconds"] == 60 and window["number"] == 1
    # Flagger's webhook: its payload, the verdict in the status code (and the body)
    flagger = judge.flagger(
        {
            "name": "svc-good",
            "namespace": "models",
            "phase": "Progressing",
            "checksum": "abc123",
            "metadata": {"stable": "1", "canary": "2", "window": "1m"},
        }
    )
    assert flagger.status_code == 200, flagger.text
    assert flagger.json()["decision"] == "pass" and flagger.json()["run"] == "abc123"


def test_an_error_heavy_canary_fails_with_evidence(judge: Judge) -> None:
    judge.fill("svc-bad", "1", Role.STABLE, 300)
    judge.fill("svc-bad", "3", Role.CANARY, 300, error_rate=0.2)
    r = judge.verdict(service="svc-bad", stable="1", canary="3", window="60s")
    assert r.status_code == 200, r.text  # judged: Argo reads result.decision
    answer = r.json()
    assert answer["decision"] == "fail"
    assert "error_rate" in answer["failed"]
    gate = gates_of(answer)["error_rate"]
    assert gate["label"] == "fail" and gate["severity"] == "hard"
    evidence = gate["evidence"]
    assert evidence["n_candidate"] == 300 and evidence["candidate"] == pytest.approx(0.2)
    assert evidence["threshold"] == 0.02
    assert evidence["detail"]["e_value"] >= evidence["detail"]["reject_at_e"]
    assert answer["counts"]["errors"] == {"stable": 0, "canary": 60}
    assert "error_rate" in answer["summary"]
    # strict: the same verdict as a status code, for callers that read only that
    strict = judge.verdict(service="svc-bad", stable="1", canary="3", strict="1")
    assert strict.status_code == 412 and strict.json()["decision"] == "fail"
    flagger = judge.flagger(
        {"name": "svc-bad", "namespace": "models", "phase": "Progressing", "checksum": "x",
         "metadata": {"stable": "1", "canary": "3"}}
    )  # fmt: skip
    assert flagger.status_code == 412
    assert flagger.json()["decision"] == "fail" and "error_rate" in flagger.json()["failed"]


def test_no_records_is_inconclusive_never_a_pass(judge: Judge) -> None:
    for params in (
        {"service": "nobody-here", "stable": "1", "canary": "2"},
        {"service": "svc-good", "stable": "1", "canary": "99"},  # unknown version
    ):
        r = judge.verdict(**params)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["decision"] == "inconclusive", answer
        assert answer["counts"]["requests"]["canary"] == 0
        assert gates_of(answer)["observability"]["label"] == "nodata"
    flagger = judge.flagger(
        {"name": "nobody-here", "metadata": {"stable": "1", "canary": "2"}, "checksum": "y"}
    )
    assert flagger.status_code == 412 and flagger.json()["decision"] == "inconclusive"


def test_a_call_soon_after_the_last_is_answered_again_without_new_evidence(judge: Judge) -> None:
    judge.fill("svc-again", "1", Role.STABLE, 100)
    judge.fill("svc-again", "2", Role.CANARY, 100)
    first = judge.verdict(service="svc-again", stable="1", canary="2").json()
    again = judge.verdict(service="svc-again", stable="1", canary="2").json()
    assert again["repeated"] is True and first["repeated"] is False
    assert again["window"] == first["window"] and again["decision"] == first["decision"]


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"service": "svc", "stable": "1"}, "canary is missing"),
        ({"service": "svc", "stable": "1", "canary": "2", "window": "1s"}, "5s..24h"),
        ({"service": "svc", "stable": "1", "canary": "2", "window": "2d"}, "60s, 5m or 1h"),
        ({"service": "svc", "stable": "1", "canary": "2", "window": "25h"}, "5s..24h"),
        ({"service": "a b", "stable": "1", "canary": "2"}, "service is not a valid name"),
        ({"service": "s" * 200, "stable": "1", "canary": "2"}, "service is not a valid name"),
        ({"service": "svc", "stable": "1", "canary": "2", "role": "stable"}, "canary or shadow"),
        ({"service": "svc", "stable": "1", "canary": "2", "canray": "3"}, "1 unknown field(s)"),
    ],
)
def test_bad_input_is_400_with_what_to_send(
    judge: Judge, params: dict[str, str], says: str
) -> None:
    r = judge.verdict(**params)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert says in error and "send service, stable and canary" in error
    assert "a b" not in error and "canray" not in error  # the submitted values are not echoed


def test_bad_bodies_are_400(judge: Judge) -> None:
    big = judge.client.post("/v1/verdict", json={"service": "x" * 20_000})
    assert big.status_code == 400 and "bytes" in big.json()["error"]
    garbage = judge.client.post(
        "/v1/verdict", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert garbage.status_code == 400 and "not JSON" in garbage.json()["error"]
    flat = judge.client.post("/v1/verdict", json={"service": "svc", "stable": "1"})
    assert flat.status_code == 400 and "canary is missing" in flat.json()["error"]
    listed = judge.client.post("/v1/flagger/verdict", json=["svc"])
    assert listed.status_code == 400
    assert judge.client.get("/v1/flagger/verdict").status_code == 405  # Flagger POSTs
