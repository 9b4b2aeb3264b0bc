"""The one definition of retryable, and the retry helper, with the clock injected: no test waits."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from canaryflow import retries
from canaryflow.errors import (
    ConfigError,
    ProviderResponseError,
    TransientProviderError,
    TransientRegistryError,
)
from canaryflow.retries import RetryPolicy

REQUEST = httpx.Request("POST", "http://prefect.test/api/flow_runs/1/resume")
NO_JITTER = RetryPolicy(delays_s=(0.5, 1.0, 2.0))


def response(status: int, retry_after: str | None = None) -> httpx.Response:
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    return httpx.Response(status, headers=headers, request=REQUEST)


def status_error(status: int) -> httpx.HTTPStatusError:
    return httpx.HTTPStatusError(f"HTTP {status}", request=REQUEST, response=response(status))


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (TransientProviderError("429 after the client's retries"), True),
        (TransientRegistryError("registry down"), True),
        (httpx.ConnectError("refused", request=REQUEST), True),
        (httpx.ReadTimeout("slow", request=REQUEST), True),
        (httpx.RemoteProtocolError("peer closed", request=REQUEST), True),
        (status_error(503), True),
        (status_error(429), True),
        (status_error(408), True),
        (status_error(404), False),
        (status_error(400), False),
        (status_error(501), False),
        (ProviderResponseError("garbage"), False),
        (ConfigError("bad spec"), False),
        (ValueError("a bug"), False),
        (KeyboardInterrupt(), False),
    ],
)
def test_is_retryable(error: BaseException, retryable: bool) -> None:
    assert retries.is_retryable(error) is retryable


def test_retryable_statuses() -> None:
    assert {408, 425, 429, 500, 502, 503, 504} == retries.RETRYABLE_STATUSES
    assert [
        s for s in (200, 201, 301, 400, 404, 409, 422, 501) if retries.is_retryable_status(s)
    ] == []
    assert all(retries.is_retryable_status(s) for s in (408, 425, 429, 500, 502, 503, 504))


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("0", 0.0),
        ("3", 3.0),
        ("0.25", 0.25),
        ("120", 120.0),  # the policy caps it, not the parser
        ("-1", None),
        ("soon", None),
        ("", None),
        ("nan", None),
        ("inf", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),  # an HTTP date: the policy's delay applies
    ],
)
def test_retry_after_header(header: str | None, seconds: float | None) -> None:
    assert retries.retry_after(header) == seconds


def test_delay_follows_the_policy_honours_retry_after_and_caps_both() -> None:
    policy = RetryPolicy(delays_s=(0.5, 1.0, 90.0), max_delay_s=60.0)
    assert [policy.delay(n) for n in range(4)] == [0.5, 1.0, 60.0, 60.0]
    assert policy.delay(0, retry_after=7.0) == 7.0
    assert policy.delay(0, retry_after=0.0) == 0.0
    assert policy.delay(0, retry_after=600.0) == 60.0
    assert policy.attempts == 4


def test_jitter_spreads_the_delay_within_its_fraction() -> None:
    policy = RetryPolicy(delays_s=(1.0,), jitter=0.5)
    delays = {policy.delay(0) for _ in range(200)}
    assert all(0.5 <= d <= 1.5 for d in delays) and len(delays) > 100
    assert policy.delay(0, retry_after=2.0) == 2.0  # the server's word is not jittered


def test_the_task_policy_is_what_prefect_tasks_read() -> None:
    assert retries.TASK_RETRY.delays_s == (1.0, 3.0, 9.0)
    assert RetryPolicy() == retries.DEFAULT


class Script:
    """Plays outcomes in order, as `fn` for `call`; records the sleeps asked for."""

    def __init__(self, *outcomes: httpx.Response | Exception) -> None:
        self._outcomes: Iterator[httpx.Response | Exception] = iter(outcomes)
        self.calls = 0
        self.waits: list[float] = []

    def __call__(self) -> httpx.Response:
        self.calls += 1
        outcome = next(self._outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def acall(self) -> httpx.Response:
        return self()

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)

    async def asleep(self, seconds: float) -> None:
        self.waits.append(seconds)


def test_retryable_answers_are_retried_with_the_policys_delays() -> None:
    script = Script(response(503), response(502), response(200))
    assert retries.call(script, NO_JITTER, sleep=script.sleep).status_code == 200
    assert script.waits == [0.5, 1.0] and script.calls == 3


def test_retry_after_replaces_the_policys_delay() -> None:
    script = Script(response(429, "3"), response(503, "soon"), response(200))
    retries.call(script, NO_JITTER, sleep=script.sleep)
    assert script.waits == [3.0, 1.0]


def test_an_http_date_retry_after_falls_back_to_the_policy() -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    script = Script(response(503, later), response(200))
    retries.call(script, NO_JITTER, sleep=script.sleep)
    assert script.waits == [0.5]


def test_the_last_attempts_response_is_the_callers() -> None:
    script = Script(*(response(503, "0") for _ in range(3)), response(503, "99"))
    last = retries.call(script, NO_JITTER, sleep=script.sleep)
    assert (last.status_code, last.headers["retry-after"]) == (503, "99")
    assert script.calls == NO_JITTER.attempts == 4 and script.waits == [0.0, 0.0, 0.0]


def test_the_last_attempts_exception_is_raised() -> None:
    errors = [httpx.ConnectError(f"refused {n}", request=REQUEST) for n in range(4)]
    script = Script(*errors)
    with pytest.raises(httpx.ConnectError, match="refused 3"):
        retries.call(script, NO_JITTER, sleep=script.sleep)
    assert script.calls == 4 and script.waits == [0.5, 1.0, 2.0]


def test_an_error_then_an_answer_returns_the_answer() -> None:
    script = Script(httpx.ReadTimeout("slow", request=REQUEST), response(201))
    assert retries.call(script, NO_JITTER, sleep=script.sleep).status_code == 201
    assert script.waits == [0.5]


@pytest.mark.parametrize(
    "outcome", [response(404), response(400), response(200), ValueError("a bug")]
)
def test_what_is_not_retryable_comes_back_at_once(outcome: httpx.Response | Exception) -> None:
    script = Script(outcome, response(200))
    if isinstance(outcome, Exception):
        with pytest.raises(ValueError, match="a bug"):
            retries.call(script, NO_JITTER, sleep=script.sleep)
    else:
        assert retries.call(script, NO_JITTER, sleep=script.sleep) is outcome
    assert script.calls == 1 and script.waits == []


def test_retry_on_decides_for_exceptions() -> None:
    script = Script(ValueError("flaky"), response(200))
    retry_values = retries.call(
        script, NO_JITTER, retry_on=lambda e: isinstance(e, ValueError), sleep=script.sleep
    )
    assert retry_values.status_code == 200 and script.waits == [0.5]
    never = Script(httpx.ConnectError("refused", request=REQUEST))
    with pytest.raises(httpx.ConnectError):
        retries.call(never, NO_JITTER, retry_on=lambda e: False, sleep=never.sleep)
    assert never.calls == 1


def test_a_policy_without_delays_tries_once() -> None:
    script = Script(response(503))
    assert retries.call(script, RetryPolicy(delays_s=()), sleep=script.sleep).status_code == 503
    assert script.calls == 1 and script.waits == []


async def test_acall_retries_the_same_way_without_blocking() -> None:
    script = Script(response(503), httpx.ConnectError("refused", request=REQUEST), response(200))
    answer = await retries.acall(script.acall, NO_JITTER, sleep=script.asleep)
    assert answer.status_code == 200 and script.waits == [0.5, 1.0]
    failing = Script(*(response(504) for _ in range(4)))
    last = await retries.acall(failing.acall, NO_JITTER, sleep=failing.asleep)
    assert last.status_code == 504 and failing.calls == 4
    refused = Script(ConfigError("bad"))
    with pytest.raises(ConfigError):
        await retries.acall(refused.acall, NO_JITTER, sleep=refused.asleep)
    assert refused.calls == 1
