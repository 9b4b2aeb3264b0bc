"""Waiting on a condition instead of on the clock: poll until it holds, fail clearly if not.

A test that sleeps "long enough" and then counts is either slow or flaky on a loaded machine; a
test that waits for the condition it needs is neither, and when the condition never comes its
failure says what was awaited, for how long, and what was seen last.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import NoReturn, TypeVar

import pytest

T = TypeVar("T")


def _timed_out(what: str, timeout_s: float, last: object) -> NoReturn:
    pytest.fail(f"timed out after {timeout_s:g} s waiting for {what} (last seen: {last!r})")


def wait_for(
    what: str, check: Callable[[], T], timeout_s: float = 10.0, interval_s: float = 0.05
) -> T:
    """Call `check` until it returns something truthy and return that; fail the test after
    `timeout_s`, naming `what` and the last value seen. `check` runs once more after the
    deadline has passed, so a slow poll never loses a condition that did come true."""
    deadline = time.monotonic() + timeout_s
    while True:
        expired = time.monotonic() >= deadline
        found = check()
        if found:
            return found
        if expired:
            _timed_out(what, timeout_s, found)
        time.sleep(interval_s)


async def async_wait_for(
    what: str, check: Callable[[], T], timeout_s: float = 10.0, interval_s: float = 0.02
) -> T:
    """`wait_for` inside a coroutine: the event loop keeps running between the polls."""
    deadline = time.monotonic() + timeout_s
    while True:
        expired = time.monotonic() >= deadline
        found = check()
        if found:
            return found
        if expired:
            _timed_out(what, timeout_s, found)
        await asyncio.sleep(interval_s)
