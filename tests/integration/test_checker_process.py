"""The live checkers' own process: real child processes, real pipes, a real silent judge.

Results come back whole; a child that dies fails what it held at once (unchecked, never passed)
and is started again; offers made while it is down are dropped and counted; closing stops it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from canaryflow.contracts import (
    AuthStyle,
    LlmJudgeChecker,
    PatternsChecker,
    ProviderConfig,
    ProvidersFile,
)
from canaryflow.quality.remote import RemoteCheckers, checker_environment
from canaryflow.quality.verdicts import CheckItem, CheckResult, Outcome
from tests.waiting import async_wait_for

LEAK = CheckItem("r-1", "What is the key?", "Here: AKIA" + "A" * 16, role="canary")
CLEAN = CheckItem("r-2", "Capital of France?", "Paris.", role="canary")


@pytest.fixture
def silent_provider() -> Iterator[ProvidersFile]:
    """A provider that accepts connections and never answers: a judge call stays in flight."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    try:
        yield ProvidersFile(providers={"silent": ProviderConfig(base_url=url, auth=AuthStyle.NONE)})
    finally:
        listener.close()


@pytest.fixture
async def patterns() -> AsyncIterator[tuple[RemoteCheckers, list[CheckResult]]]:
    results: list[CheckResult] = []
    remote = RemoteCheckers([PatternsChecker(sample_rate=1.0)], None, results.append)
    await remote.start()
    try:
        yield remote, results
    finally:
        await remote.aclose()


async def test_results_come_back_from_the_child_with_their_verdicts(
    patterns: tuple[RemoteCheckers, list[CheckResult]],
) -> None:
    remote, results = patterns
    assert remote.submit_to(LEAK) == ["patterns"]
    assert remote.submit_to(CLEAN) == ["patterns"]
    await async_wait_for("two results", lambda: len(results) == 2, timeout_s=10)
    by_request = {r.item.request_id: r for r in results}
    assert by_request["r-1"].item is LEAK  # the caller's own item, to match its held record
    assert by_request["r-1"].flags()["secret_leak"] is True
    assert by_request["r-2"].flags()["secret_leak"] is False
    assert remote.counters["patterns"].judged == 2


async def test_closing_stops_the_child(
    patterns: tuple[RemoteCheckers, list[CheckResult]],
) -> None:
    remote, _ = patterns
    process = remote._process
    assert process is not None and process.returncode is None
    await remote.aclose()
    assert process.returncode is not None


async def test_a_dead_child_fails_what_it_held_drops_while_down_and_comes_back(
    silent_provider: ProvidersFile,
) -> None:
    results: list[CheckResult] = []
    judge = LlmJudgeChecker(provider="silent", model="m", sample_rate=1.0, timeout_s=20)
    remote = RemoteCheckers(
        [judge, PatternsChecker(sample_rate=1.0)], silent_provider, results.append
    )
    await remote.start()
    try:
        assert sorted(remote.submit_to(CLEAN)) == ["llm_judge", "patterns"]
        await async_wait_for("the patterns result", lambda: len(results) == 1, timeout_s=10)
        assert remote._process is not None
        remote._process.kill()  # the judge's call is still in flight
        await async_wait_for("the held judge result", lambda: len(results) == 2, timeout_s=10)
        failed = results[1]
        assert failed.checker == "llm_judge" and failed.unchecked
        assert "exited" in failed.verdicts[0].reason
        assert all(v.outcome is Outcome.UNCHECKED for v in failed.verdicts)

        assert remote.submit_to(LEAK) == []  # down: dropped, counted
        assert remote.counters["patterns"].dropped == 1

        await async_wait_for("the child back", remote._up.is_set, timeout_s=15)
        assert remote.restarts == 1
        assert "patterns" in remote.submit_to(LEAK)
        await async_wait_for(
            "a result from the new child",
            lambda: any(r.item is LEAK and r.checker == "patterns" for r in results),
            timeout_s=10,
        )
    finally:
        await remote.aclose()
    await asyncio.sleep(0)


def test_the_child_gets_its_judges_key_and_no_other_providers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODEL_KEY", "sk-model")
    monkeypatch.setenv("JUDGE_KEY", "sk-judge")
    monkeypatch.setenv("UNRELATED", "kept")
    providers = ProvidersFile(
        providers={
            "models": ProviderConfig(base_url="https://models.example/v1", api_key_env="MODEL_KEY"),
            "judge": ProviderConfig(base_url="https://judge.example/v1", api_key_env="JUDGE_KEY"),
        }
    )
    judge = LlmJudgeChecker(provider="judge", model="m")
    env = checker_environment([judge, PatternsChecker()], providers)
    assert env["JUDGE_KEY"] == "sk-judge" and env["UNRELATED"] == "kept"
    assert "MODEL_KEY" not in env
    assert "JUDGE_KEY" not in checker_environment([PatternsChecker()], providers)
