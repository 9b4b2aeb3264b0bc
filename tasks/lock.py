"""One release per service at a time, held as a Prefect global concurrency limit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency

from canaryflow.errors import ReleaseBusy


def lock_name(service: str) -> str:
    return f"canaryflow-release-{service}"


@contextlib.contextmanager
def release_lock(service: str, wait_s: float) -> Iterator[None]:
    """Wait up to `wait_s` for the running release of `service`, then refuse with ReleaseBusy."""
    name = lock_name(service)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(
                concurrency(name, occupy=1, timeout_seconds=max(wait_s, 0.5), strict=True)
            )
        except TimeoutError as exc:  # only the acquisition: errors of the release pass through
            raise ReleaseBusy(
                f"another release of {service!r} is running (concurrency limit {name!r} is "
                f"full); waited {wait_s:g} s. Let it finish, or cancel its flow run in the "
                "Prefect UI, then start this release again."
            ) from exc
        yield
