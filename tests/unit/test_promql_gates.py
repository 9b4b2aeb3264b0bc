"""PromQL gates without Prometheus: templates, escaping, decisions from fetched values, NODATA."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from canaryflow.analysis.gates import judge_sample
from canaryflow.analysis.promql import (
    NO_PROMETHEUS,
    Fetched,
    PromQLGate,
    PromQLTarget,
    judge_promql,
)
from canaryflow.analysis.samples import RoleSample, WindowSample
from canaryflow.analysis.sources import instant_value, public_url
from canaryflow.contracts import Decision, GatePolicy, Label, Severity, combine
from canaryflow.contracts.policy import PromQLGateSpec
from canaryflow.contracts.promql import escape_string, placeholder_errors, render
from canaryflow.errors import PolicyError
from canaryflow.loading import load_policy

POLICIES = Path(__file__).resolve().parents[2] / "deployments" / "policies"
SELECT = 'service="{{service}}",version="{{version}}",role="{{role}}"'
ERRORS = f"sum(rate(errors_total{{{SELECT}}}[{{{{window}}}}]))"
END = datetime(2026, 1, 12, 12, 0, tzinfo=UTC)


def spec(**fields: Any) -> PromQLGateSpec:
    given: dict[str, Any] = {"name": "errors", "query": ERRORS, "severity": "hard", **fields}
    if not {"max", "min", "max_ratio"} & set(fields):
        given["max"] = 0.02
    return PromQLGateSpec.model_validate(given)


class FakePrometheus:
    """Answers from a table by version; records what was asked and when."""

    def __init__(self, values: dict[str, Fetched | float]) -> None:
        self.values = values
        self.asked: list[tuple[str, datetime]] = []

    def instant(self, promql: str, at: datetime) -> Fetched:
        self.asked.append((promql, at))
        for version, answer in self.values.items():
            if f'version="{version}"' in promql:
                return answer if isinstance(answer, Fetched) else Fetched(promql, value=answer)
        return Fetched(promql, problem="empty result: no series matched at the window's end")


def target(source: FakePrometheus | None) -> PromQLTarget:
    return PromQLTarget(service="svc", stable="1", candidate="2", source=source)


def judged(gate_spec: PromQLGateSpec, source: FakePrometheus | None) -> Any:
    start = END - timedelta(seconds=60)
    (result,) = judge_promql([gate_spec], target(source), start, END, "canary")
    return result


# --------------------------------------------------------------------------- templates


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"query": "  "}, "query is empty"),
        ({"query": 'x{service="{{namespace}}"}'}, "unknown placeholder '{{namespace}}'"),
        ({"query": "x{service={{service}}}"}, "must sit inside a double-quoted label value"),
        ({"query": "x{service='{{service}}'}"}, "must sit inside a double-quoted label value"),
        ({"query": 'x{service="{{window}}"}'}, "{{window}} is a duration"),
        ({"query": 'x{service="{{service}"}'}, "without its closing"),
        ({"query": "x" * 4001}, "at most 4000 characters"),
        ({"severity": "observability"}, "severity is hard or soft"),
        ({"max": 1.0, "max_ratio": 1.2}, "not both and not neither"),
        ({"min": 2.0, "max": 1.0}, "min 2 is above max 1"),
        ({"query": 'sum(x{service="{{service}}"})', "max_ratio": 1.2}, "must select by version"),
        ({"name": "Bad Name"}, "should match pattern"),
    ],
)
def test_a_bad_template_or_threshold_is_refused_at_load(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        spec(**fields)


def test_a_gate_needs_a_threshold() -> None:
    with pytest.raises(ValidationError, match="not both and not neither"):
        PromQLGateSpec(name="x", query="up", severity=Severity.HARD)


def test_policy_files_are_checked_when_loaded(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("promql:\n  - {name: e, query: 'x{s=\"{{nope}}\"}', severity: hard, max: 1}\n")
    with pytest.raises(PolicyError, match="unknown placeholder"):
        load_policy(bad)
    twice = [spec().model_dump(), spec().model_dump()]
    with pytest.raises(ValidationError, match="unique: errors repeated"):
        GatePolicy.model_validate({"promql": twice})


def test_the_shipped_promql_policy_loads_with_the_seed_gates() -> None:
    policy = load_policy(POLICIES / "promql.yaml")
    assert policy.live == GatePolicy().live
    assert [g.gate for g in policy.promql] == [
        "promql:error-ratio",
        "promql:operation-p95",
        "promql:output-tokens-per-operation",
    ]
    assert all(not placeholder_errors(g.query) for g in policy.promql)


def test_placeholders_render_with_spaces_and_the_window_in_seconds() -> None:
    query = 'rate(x{service="{{ service }}",role="{{role}}"}[{{ window }}])'
    rendered = render(query, {"service": "chat", "role": "canary"}, 59.6)
    assert rendered == 'rate(x{service="chat",role="canary"}[60s])'


@pytest.mark.parametrize(
    "hostile",
    ['x"} or vector(1) #', 'a\\"}', "two\nlines", "tab\there", "bell\x07"],
)
def test_label_values_cannot_leave_their_string(hostile: str) -> None:
    rendered = render('sum(x{version="{{version}}"})', {"version": hostile}, 60)
    inside = rendered[len('sum(x{version="') : -len('"})')]
    # Every quote and backslash the value brought is escaped: the string ends where it should.
    i = 0
    while i < len(inside):
        assert inside[i] != '"', rendered
        i += 2 if inside[i] == "\\" else 1
    assert i == len(inside)
    assert escape_string(hostile).encode().decode("unicode_escape") == hostile  # Go's escapes


def test_regex_matchers_get_literal_values() -> None:
    rendered = render('x{version=~"{{version}}"}', {"version": "1.2+a|b"}, 60)
    assert rendered == 'x{version=~"1\\\\.2\\\\+a\\\\|b"}'


def test_overlong_values_are_refused_not_truncated() -> None:
    with pytest.raises(ValueError, match="longer than 256"):
        render('x{service="{{service}}"}', {"service": "s" * 300}, 60)


# --------------------------------------------------------------------------- decisions


def test_threshold_gate_passes_fails_and_reviews() -> None:
    ok = judged(spec(max=0.02), FakePrometheus({"2": 0.01}))
    assert ok.label is Label.PASS and ok.gate == "promql:errors"
    assert ok.evidence.candidate == 0.01 and ok.evidence.threshold == 0.02
    assert ok.evidence.detail["query"] == 'sum(rate(errors_total{service="svc",version="2",' \
        'role="canary"}[60s]))'  # fmt: skip
    bad = judged(spec(max=0.02), FakePrometheus({"2": 0.05}))
    assert bad.label is Label.FAIL and "above max 0.02" in bad.reason
    soft = judged(spec(max=0.02, severity="soft"), FakePrometheus({"2": 0.05}))
    assert soft.label is Label.REVIEW and soft.severity is Severity.SOFT


def test_a_range_bounds_both_sides() -> None:
    gate = spec(min=10.0, max=100.0)
    assert judged(gate, FakePrometheus({"2": 50.0})).label is Label.PASS
    low = judged(gate, FakePrometheus({"2": 5.0}))
    assert low.label is Label.FAIL and "below min 10" in low.reason
    assert judged(spec(min=0.99), FakePrometheus({"2": math.inf})).label is Label.PASS


def test_ratio_gate_evaluates_the_template_for_stable_too() -> None:
    source = FakePrometheus({"1": 0.2, "2": 0.3})
    result = judged(spec(max_ratio=1.25), source)
    assert result.label is Label.FAIL
    assert result.evidence.estimate == pytest.approx(1.5)
    assert (result.evidence.baseline, result.evidence.candidate) == (0.2, 0.3)
    assert 'version="1",role="stable"' in result.evidence.detail["stable_query"]
    assert [at for _, at in source.asked] == [END, END]  # instant queries at the window's end
    assert judged(spec(max_ratio=1.6), source).label is Label.PASS


@pytest.mark.parametrize(
    ("stable", "candidate", "label"),
    [(0.0, 0.0, Label.PASS), (0.0, 0.1, Label.FAIL), (-1.0, 0.1, Label.NODATA)],
)
def test_ratio_edge_cases(stable: float, candidate: float, label: Label) -> None:
    result = judged(spec(max_ratio=1.2), FakePrometheus({"1": stable, "2": candidate}))
    assert result.label is label, result.reason


@pytest.mark.parametrize(
    "answer",
    [
        Fetched("q", problem="Prometheus at http://127.0.0.1:9 unreachable: ConnectError"),
        Fetched("q", problem="query error (bad_data): parse error"),
        Fetched("q", problem="Prometheus at http://127.0.0.1:9: timed out (10 s)"),
        Fetched("q", value=math.nan),
    ],
)
def test_no_value_is_nodata_in_the_observability_tier(answer: Fetched) -> None:
    result = judged(spec(severity="soft"), FakePrometheus({"2": answer}))
    assert result.label is Label.NODATA and result.severity is Severity.OBSERVABILITY
    assert (answer.problem or "NaN") in result.reason
    assert combine([result]) is Decision.INCONCLUSIVE  # never a pass, even for a soft gate


def test_a_missing_stable_value_is_nodata_for_a_ratio() -> None:
    result = judged(spec(max_ratio=1.2), FakePrometheus({"2": 0.1}))
    assert result.label is Label.NODATA and result.reason.startswith("stable query: empty result")


def test_no_prometheus_configured_says_to_set_it() -> None:
    for missing in (None, target(None)):
        (result,) = judge_promql([spec()], missing, END - timedelta(seconds=60), END, "canary")
        assert result.label is Label.NODATA and "set prometheus_url" in result.reason
        assert result.reason == NO_PROMETHEUS


def test_judge_gate_is_pure() -> None:
    gate = PromQLGate(spec(max_ratio=1.2))
    a = gate.judge(Fetched("c", value=1.0), Fetched("s", value=1.0))
    assert a == gate.judge(Fetched("c", value=1.0), Fetched("s", value=1.0))
    assert a.label is Label.PASS


# --------------------------------------------------------------------------- judge_sample


def sample() -> WindowSample:
    role = RoleSample(n=400, latencies_ms=tuple(float(x) for x in range(40, 440)))
    return WindowSample(role, role, start=END - timedelta(seconds=60), end=END,
                        candidate_role="canary")  # fmt: skip


def test_judge_sample_adds_promql_gates_only_when_declared() -> None:
    plain, _, _ = judge_sample(GatePolicy(), sample())
    assert not any(r.gate.startswith("promql:") for r in plain)
    policy = GatePolicy(promql=(spec(),))
    results, decision, _ = judge_sample(policy, sample())  # the old call: no Prometheus given
    assert results[-1].label is Label.NODATA and "prometheus_url" in results[-1].reason
    assert decision is not Decision.PASS
    results, _, _ = judge_sample(policy, sample(), promql=target(FakePrometheus({"2": 0.5})))
    assert results[-1].label is Label.FAIL and results[-1].gate == "promql:errors"
    assert [r.gate for r in results[:-1]] == [r.gate for r in plain]


# --------------------------------------------------------------------------- fetching


def answer(data: Any, status: str = "success") -> bytes:
    return json.dumps({"status": status, "data": data}).encode()


@pytest.mark.parametrize(
    ("body", "value", "problem"),
    [
        (answer({"resultType": "vector", "result": [{"metric": {}, "value": [1, "0.5"]}]}),
         0.5, None),
        (answer({"resultType": "scalar", "result": [1, "2"]}), 2.0, None),
        (answer({"resultType": "vector", "result": []}), None, "empty result"),
        (answer({"resultType": "vector", "result": [{"value": [1, "1"]}] * 2}), None,
         "2 series: aggregate"),
        (answer({"resultType": "matrix", "result": []}), None, "a matrix result"),
        (json.dumps({"status": "error", "errorType": "bad_data", "error": "parse error"}).encode(),
         None, "query error (bad_data): parse error"),
        (b"<html>", None, "without JSON"),
        (answer({"resultType": "vector", "result": [{"value": "x"}]}), None, "not in Prometheus"),
    ],
)  # fmt: skip
def test_instant_answers_become_a_value_or_a_problem(
    body: bytes, value: float | None, problem: str | None
) -> None:
    fetched = instant_value("q", 200, body)
    assert fetched.value == value
    assert (fetched.problem is None) if problem is None else problem in (fetched.problem or "")


def test_nan_from_prometheus_is_a_value_the_judge_refuses() -> None:
    nan = answer({"resultType": "vector", "result": [{"metric": {}, "value": [1, "NaN"]}]})
    fetched = instant_value("q", 200, nan)
    assert fetched.value is not None and math.isnan(fetched.value)
    assert PromQLGate(spec()).judge(fetched).label is Label.NODATA


def test_urls_in_verdicts_carry_no_credentials() -> None:
    assert public_url("https://user:secret@prom.example:9090/api?token=x") == (
        "https://prom.example:9090/api"
    )
